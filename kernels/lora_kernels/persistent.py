"""Launcher of the single-launch persistent LoRA linear, and its grid-barrier state.

Shape legend: M rows, W weight entries, n slices (≤ 4), R rank, K input width, N output
width. The barrier needs a few int32s that are zero before first use and that no other
launch touches while this one runs. They live in one zeroed slab per device, allocated on
the first call outside a CUDA-graph capture, with one 128-byte slot per CUDA stream seen
(launches on one stream never overlap, so a slot is reused safely; graphs captured on one
stream share its slot and must not be replayed concurrently with each other). A call made
while capturing before any slab exists runs the two-launch split path instead, or call
``prepare_barriers(device)`` before capture.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache

import torch

from lora_kernels import config as cfg
from lora_kernels.meta import LoRAMeta

SLOTS = 64
SLOT_INTS = 32  # one 128-byte line per slot: slots of different streams share no line
MAX_SPINS = 1 << 22  # ~seconds of polling; past it the kernel flags the barrier broken

_lock = threading.Lock()
_slabs: dict[str, torch.Tensor] = {}
_slots: dict[tuple[str, int], int] = {}


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def _stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def prepare_barriers(device: torch.device | str) -> torch.Tensor:
    """Allocate (once) and return the device's zeroed barrier slab; call outside capture."""
    dev = torch.device(device)
    key = _device_key(dev)
    with _lock:
        slab = _slabs.get(key)
        if slab is None:
            slab = torch.zeros(SLOTS * SLOT_INTS, dtype=torch.int32, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)  # zeroed before a launch on any other stream
            _slabs[key] = slab
    return slab


def barrier_for(device: torch.device) -> torch.Tensor | None:
    """This stream's barrier slot [3] (arrived, generation, timed-out flag), or None while
    capturing before the slab exists (allocating then would record, not run, the zeroing)."""
    key = _device_key(device)
    slab = _slabs.get(key)
    if slab is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        slab = prepare_barriers(device)
    stream = _stream_id(device)
    with _lock:
        slot = _slots.get((key, stream))
        if slot is None:
            slot = sum(1 for k, _ in _slots if k == key) % SLOTS
            _slots[(key, stream)] = slot
    return slab[slot * SLOT_INTS: slot * SLOT_INTS + 3]


def barrier_timed_out(device: torch.device | str) -> bool:
    """Whether any persistent launch on the device gave up waiting at its barrier (reads the
    device; for tests and health checks, never on the hot path)."""
    slab = _slabs.get(_device_key(torch.device(device)))
    return slab is not None and bool(slab.view(SLOTS, SLOT_INTS)[:, 2].any())


@lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def grid_size(config: cfg.PersistentConfig, rows: int, entries: int, k: int, n_cols: int,
              device: torch.device) -> int:
    """Programs of one launch: ≤ the SM count (all co-resident), ≤ the most items either
    phase can have; one on CPU, where the interpreter runs programs one after another."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    tiles = cfg.tile_bound(rows, entries, config.bm)
    _, k_progs = _k_chunks(k, config.split_k, config.bk)
    work = tiles * max(k_progs, cfg.cdiv(n_cols, config.bn))
    want = config.programs if config.programs > 0 else sms
    return max(1, min(want, sms, work))


def _k_chunks(k: int, split_k: int, bk: int) -> tuple[int, int]:
    per = cfg.round_up(cfg.cdiv(k, split_k), bk)
    return per, cfg.cdiv(k, per)


def launch_persistent(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, meta: LoRAMeta, slice_offsets: Sequence[int],
                      inner: tuple[int, int, int], aligned: bool, config: cfg.PersistentConfig,
                      y: torch.Tensor, barrier: torch.Tensor) -> None:
    """One launch of ``persistent_lora_kernel``; y: float32 [k_progs, n, M, R] scratch."""
    from lora_kernels.triton_persistent import persistent_lora_kernel

    n, w_count, rank, k = lora_a.shape
    m, n_cols = out.shape
    per, k_progs = _k_chunks(k, config.split_k, config.bk)
    grid = (grid_size(config, m, w_count, k, n_cols, x.device),)
    persistent_lora_kernel[grid](
        x, lora_a, lora_b, out, y, barrier,
        meta.sorted_rows, meta.seg_counts, meta.seg_starts, w_count, m,
        k, n_cols, *inner, rank, n, per, k_progs,
        x.stride(0), x.stride(1), *lora_a.stride(), *lora_b.stride(), *out.stride(),
        y.stride(0), y.stride(1), y.stride(2),
        NS_PAD=cfg.next_pow2(n), R_PAD=cfg.rank_pad(rank), W_PAD=cfg.next_pow2(w_count),
        BM=config.bm, BK=config.bk, BN=config.bn, EVEN_K=k % per == 0, ALIGNED=aligned,
        DOT_PREC=cfg.dot_precision(x.dtype), MAX_SPINS=MAX_SPINS,
        num_warps=config.warps, num_stages=config.stages,
    )

"""Triton attention over a paged KV cache: decode (with split-KV) and varlen causal prefill.

Layouts: q / out [T, h, D] (last dim contiguous); k_cache / v_cache [NB, BS, g, D]; block
tables [B, P] int32, the cache blocks of each sequence in order; context lengths [B] int32.
GQA: query head ``kvh · G + i`` (G = h / g) reads KV head kvh. A program takes a KV head's
whole query group, so every K/V tile it loads is read once for the group.

Semantics (those of ``lora_cluster.model.paged_attention``'s torch path): a query at position
p of sequence b attends its cached keys j with j <= p (and j > p - window with a sliding
window), softmax in float32. A context of 0 reads as 1 (a padding row sees key 0: finite).
No launcher reads a device value: grids come from shapes and host bounds, so every call is
capturable in a CUDA graph and replays correctly for any lengths within those bounds.

Shape legend: T rows, N decode items, B sequences, h query heads, g KV heads, G = h / g,
D head dim, NB cache blocks, BS block size, P blocks per sequence, S KV splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from lora_kernels import config as cfg

LOG2E = 1.4426950408889634
MIN_PARTITION = 256  # keys per split at least: below that the reduce costs more than it buys
MAX_SPLITS = 64


@dataclass(frozen=True)
class DecodeConfig:
    """Decode launch: keys per tile, and KV splits (None: ``decode_splits`` decides)."""

    block_n: int = 64
    num_splits: int | None = None
    warps: int = 4
    stages: int = 2


@dataclass(frozen=True)
class PrefillConfig:
    """Prefill launch: query rows × group heads per program (block_m), keys per tile."""

    block_m: int = 64
    block_n: int = 64
    warps: int = 4
    stages: int = 2


@lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return cfg.NUM_SMS_DEFAULT
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def decode_splits(num_items: int, num_kv_heads: int, max_context_len: int,
                  device: torch.device, block_n: int = 64,
                  num_splits: int | None = None) -> tuple[int, int]:
    """(splits, partition keys) from shapes alone: split only while the grid underfills the
    device (two programs per SM), in partitions of at least ``MIN_PARTITION`` keys."""
    bound = max(int(max_context_len), 1)
    if num_splits is None:
        programs = max(num_items * num_kv_heads, 1)
        target = 2 * _num_sms(device)
        num_splits = 1
        if programs < target and bound >= 2 * MIN_PARTITION:
            num_splits = min(cfg.cdiv(target, programs), bound // MIN_PARTITION, MAX_SPLITS)
    partition = cfg.round_up(cfg.cdiv(bound, max(int(num_splits), 1)), block_n)
    return cfg.cdiv(bound, partition), partition


@triton.jit
def _split_range(split, num_splits, partition, lo, ctx):
    """Keys [start, end) of a split; the last split runs to the context end."""
    start = tl.maximum(split * partition, lo)
    end = tl.where(split == num_splits - 1, ctx, tl.minimum((split + 1) * partition, ctx))
    return start, end


@triton.jit
def _attend_tile(q, m_i, l_i, acc, k_ptrs, v_ptrs, kv_mask, ok, scale_log2,
                 DOT_PREC: tl.constexpr):
    """One online-softmax step over a key tile (scores in the log2 domain, float32)."""
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, po_ptr, pml_ptr, bt_ptr, ctx_ptr, rows_ptr, seqs_ptr,
    scale_log2, window, partition, num_splits, num_heads,
    sqt, sqh, skb, sks, skh, svb, svs, svh, sbt, sot, soh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, G_PAD: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
    INDIRECT: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program (item, kvh, split): the item's query group over one split of its keys."""
    item = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if INDIRECT:
        row = tl.load(rows_ptr + item)
        seq = tl.load(seqs_ptr + item)
    else:
        row = item
        seq = item
    ctx = tl.maximum(tl.load(ctx_ptr + seq), 1)
    lo = ctx * 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    start, end = _split_range(split, num_splits, partition, lo, ctx)
    if start < end:  # splits past the sequence's keys exit here
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        heads = kvh * G + offs_g
        hd_mask = (offs_g < G)[:, None] & (offs_d < D)[None, :]
        q = tl.load(q_ptr + row.to(tl.int64) * sqt + heads[:, None] * sqh + offs_d[None, :],
                    mask=hd_mask, other=0.0)
        m_i = tl.full([G_PAD], -1e30, tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        bt_row = bt_ptr + seq.to(tl.int64) * sbt
        for k0 in range(start, end, BLOCK_N):
            offs_n = k0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
            slot = offs_n % BLOCK_SIZE
            kv_mask = n_ok[:, None] & (offs_d < D)[None, :]
            k_ptrs = k_ptr + blk[:, None] * skb + slot[:, None] * sks + kvh * skh + offs_d[None, :]
            v_ptrs = v_ptr + blk[:, None] * svb + slot[:, None] * svs + kvh * svh + offs_d[None, :]
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_ptrs, v_ptrs, kv_mask,
                                         n_ok[None, :], scale_log2, DOT_PREC)
        o = acc / l_i[:, None]
        if SPLIT:
            part = (item.to(tl.int64) * num_heads + heads) * num_splits + split
            tl.store(po_ptr + part[:, None] * D + offs_d[None, :], o, mask=hd_mask)
            tl.store(pml_ptr + part * 2, m_i, mask=offs_g < G)
            tl.store(pml_ptr + part * 2 + 1, l_i, mask=offs_g < G)
        else:
            tl.store(out_ptr + row.to(tl.int64) * sot + heads[:, None] * soh + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=hd_mask)


@triton.jit
def _reduce_kernel(
    po_ptr, pml_ptr, out_ptr, ctx_ptr, rows_ptr, seqs_ptr, window, partition, num_splits,
    num_heads, sot, soh,
    D: tl.constexpr, S_PAD: tl.constexpr, D_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
    INDIRECT: tl.constexpr,
):
    """Program (item, head): merge the live splits' (o, max, sum) into the output row."""
    item = tl.program_id(0)
    head = tl.program_id(1)
    if INDIRECT:
        row = tl.load(rows_ptr + item)
        seq = tl.load(seqs_ptr + item)
    else:
        row = item
        seq = item
    ctx = tl.maximum(tl.load(ctx_ptr + seq), 1)
    lo = ctx * 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    start, end = _split_range(offs_s, num_splits, partition, lo, ctx)
    live = (offs_s < num_splits) & (start < end)  # exactly the splits whose programs wrote
    part = (item.to(tl.int64) * num_heads + head) * num_splits + offs_s
    m = tl.load(pml_ptr + part * 2, mask=live, other=float("-inf"))
    l_s = tl.load(pml_ptr + part * 2 + 1, mask=live, other=0.0)
    w = tl.where(live, l_s * tl.exp2(m - tl.max(m, 0)), 0.0)
    o = tl.load(po_ptr + part[:, None] * D + offs_d[None, :],
                mask=live[:, None] & (offs_d < D)[None, :], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + row.to(tl.int64) * sot + head * soh + offs_d, res.to(
        out_ptr.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, spans_ptr, scale_log2, window, num_row_tiles,
    sqt, sqh, skb, sks, skh, svb, svs, svh, sbt, sot, soh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, G_PAD: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program (span, row tile, kvh): BLOCK_R query rows × the group's heads, causal."""
    span = tl.program_id(0)
    tile = num_row_tiles - 1 - tl.program_id(1)  # late tiles see more keys: start them first
    kvh = tl.program_id(2)
    meta = spans_ptr + span * 4
    seq = tl.load(meta)
    row0 = tl.load(meta + 1)
    n = tl.load(meta + 2)
    ctx = tl.load(meta + 3)
    r_lo = tile * BLOCK_R
    if r_lo < n:
        M: tl.constexpr = BLOCK_R * G_PAD
        offs_m = tl.arange(0, M)
        offs_d = tl.arange(0, D_PAD)
        r = r_lo + offs_m // G_PAD
        gi = offs_m % G_PAD
        m_ok = (r < n) & (gi < G)
        qpos = ctx - n + r
        heads = kvh * G + gi
        q_mask = m_ok[:, None] & (offs_d < D)[None, :]
        rows = (row0 + r).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * sqt + heads[:, None] * sqh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        m_i = tl.full([M], -1e30, tl.float32)
        l_i = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, D_PAD], tl.float32)
        hi = ctx - n + tl.minimum(r_lo + BLOCK_R, n)  # one past the tile's last position
        lo = hi * 0
        if HAS_WINDOW:
            lo = tl.maximum(ctx - n + r_lo - window + 1, 0)
        bt_row = bt_ptr + seq.to(tl.int64) * sbt
        for k0 in range(lo, hi, BLOCK_N):
            offs_n = k0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
            slot = offs_n % BLOCK_SIZE
            kv_mask = n_ok[:, None] & (offs_d < D)[None, :]
            k_ptrs = k_ptr + blk[:, None] * skb + slot[:, None] * sks + kvh * skh + offs_d[None, :]
            v_ptrs = v_ptr + blk[:, None] * svb + slot[:, None] * svs + kvh * svh + offs_d[None, :]
            ok = (offs_n[None, :] <= qpos[:, None]) & n_ok[None, :]
            if HAS_WINDOW:
                ok = ok & (offs_n[None, :] > qpos[:, None] - window)
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_ptrs, v_ptrs, kv_mask, ok,
                                         scale_log2, DOT_PREC)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * sot + heads[:, None] * soh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=q_mask)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           out: torch.Tensor) -> tuple[int, int, int]:
    """(G, D, BS) after checking the layouts the kernels assume."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [T, h, D] and k/v caches [NB, BS, g, D] alike, got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    _, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != dim or heads % kv_heads:
        raise ValueError(f"q heads {heads} × dim {dim} do not fit KV heads {kv_heads} × dim "
                         f"{k_cache.shape[3]} (query heads must be a multiple of KV heads)")
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} "
                         f"{out.dtype}")
    if out.stride(-1) != 1 or not (
            k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged attention needs contiguous caches and unit-stride head dims")
    return heads // kv_heads, dim, k_cache.shape[1]


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    return (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, max_context_len: int,
                 scale: float, window: int | None, *, out: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None, seqs: torch.Tensor | None = None,
                 config: DecodeConfig | None = None) -> torch.Tensor:
    """One query row per item over its sequence's paged keys; returns ``out``.

    Semantics:
        for i in range(N):   # N = q.shape[0], or len(rows) when rows / seqs are given
            r, b = (rows[i], seqs[i]) if rows is not None else (i, i)
            c = max(context_lens[b], 1); keys = [j < c with j >= c - window if window]
            for head x: K, V = cache[block_tables[b, j // BS], j % BS, x // G] for j in keys
                out[r, x] = softmax(q[r, x] · Kᵀ · scale) @ V
    ``max_context_len`` bounds context_lens (a host value: it only sizes the KV splits);
    programs past a sequence's own length exit at once. Rows of ``out`` no item names are
    left as they were.
    """
    config = config or DecodeConfig()
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q) if out is None else out
    group, dim, block_size = _check(q, k_cache, v_cache, out)
    if (rows is None) != (seqs is None):
        raise ValueError("rows and seqs go together")
    items = q.shape[0] if rows is None else rows.shape[0]
    if items == 0:
        return out
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    splits, partition = decode_splits(items, kv_heads, max_context_len, q.device,
                                      config.block_n, config.num_splits)
    d_pad = max(16, cfg.next_pow2(dim))
    indirect = rows is not None
    if splits > 1:
        po = torch.empty(items * heads * splits * dim, dtype=torch.float32, device=q.device)
        pml = torch.empty(items * heads * splits * 2, dtype=torch.float32, device=q.device)
    else:
        po = pml = out  # unused
    win = int(window) if window is not None else 0
    _decode_kernel[(items, kv_heads, splits)](
        q, k_cache, v_cache, out, po, pml, block_tables, context_lens,
        rows if indirect else context_lens, seqs if indirect else context_lens,
        scale * LOG2E, win, partition, splits, heads,
        q.stride(0), q.stride(1), *_cache_strides(k_cache, v_cache), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=group, D=dim, BLOCK_SIZE=block_size, G_PAD=max(16, cfg.next_pow2(group)),
        D_PAD=d_pad, BLOCK_N=config.block_n, HAS_WINDOW=window is not None,
        INDIRECT=indirect, SPLIT=splits > 1, DOT_PREC=cfg.dot_precision(q.dtype),
        num_warps=config.warps, num_stages=config.stages,
    )
    if splits > 1:
        _reduce_kernel[(items, heads)](
            po, pml, out, context_lens, rows if indirect else context_lens,
            seqs if indirect else context_lens, win, partition, splits, heads,
            out.stride(0), out.stride(1),
            D=dim, S_PAD=max(2, cfg.next_pow2(splits)), D_PAD=d_pad,
            HAS_WINDOW=window is not None, INDIRECT=indirect, num_warps=4,
        )
    return out


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, spans: torch.Tensor, max_span_rows: int,
                  scale: float, window: int | None, *, out: torch.Tensor | None = None,
                  config: PrefillConfig | None = None) -> torch.Tensor:
    """Causal attention of every span's rows over its own sequence's keys, one launch.

    Semantics:
        for (b, row_start, n, c) in spans:          # spans: [num_spans, 4] int64, on device
            for i in range(n):
                p = c - n + i; keys = [j <= p with j > p - window if window]
                out[row_start + i] = decode-style attention of q[row_start + i] over keys of b
    ``max_span_rows`` (host int >= every n) sizes the grid; other rows of ``out`` are left.
    """
    config = config or PrefillConfig()
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q) if out is None else out
    group, dim, block_size = _check(q, k_cache, v_cache, out)
    if spans.dim() != 2 or spans.shape[1] != 4 or not spans.is_contiguous():
        raise ValueError(f"spans must be a contiguous [num_spans, 4] tensor, got "
                         f"{tuple(spans.shape)}")
    if spans.shape[0] == 0 or max_span_rows < 1:
        return out
    g_pad = cfg.next_pow2(group)
    block_r = max(1, config.block_m // g_pad)
    if block_r * g_pad < 16:  # the dot's minimum tile
        block_r = 16 // g_pad
    tiles = cfg.cdiv(int(max_span_rows), block_r)
    kv_heads = k_cache.shape[2]
    _prefill_kernel[(spans.shape[0], tiles, kv_heads)](
        q, k_cache, v_cache, out, block_tables, spans, scale * LOG2E,
        int(window) if window is not None else 0, tiles,
        q.stride(0), q.stride(1), *_cache_strides(k_cache, v_cache), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=group, D=dim, BLOCK_SIZE=block_size, G_PAD=g_pad, D_PAD=max(16, cfg.next_pow2(dim)),
        BLOCK_R=block_r, BLOCK_N=config.block_n, HAS_WINDOW=window is not None,
        DOT_PREC=cfg.dot_precision(q.dtype), num_warps=config.warps, num_stages=config.stages,
    )
    return out

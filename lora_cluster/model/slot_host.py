"""Host copies of adapters laid out for slot writes: slot-ready, packed into a few pages.

Slot-ready: the model's dtype, ``scaling`` folded into ``b`` (in float32, then one cast), so a
slot write is plain copies. Packed: every tensor is a view into one of a few large page
buffers (page-locked on GPU hosts), so activating the adapter moves a handful of big DMAs
instead of hundreds of small ones (see ``slot_transfer``). Two kinds are stored the way the
slot buffers hold them, so their device-side copy is dense too:

* ``embed_tokens`` A [r, V] is the transposed view of a [V, r] block (slots hold [V, R]);
* one layer's ``experts.gate_proj`` and ``experts.up_proj`` B [E, I, r] interleave per expert
  in one [E, 2, I, r] block (``ExpertLoRA.b13`` holds [E, 2I, R]).

Pages are ``PAGE_BYTES`` each: the pinned allocator rounds a request up to a power of two and
keeps freed blocks for reuse, so equal power-of-two pages waste nothing and serve the next
adapter; a block larger than a page gets a page of its own size.

Shape legend: r a module's rank, E local experts, I local expert intermediate, V local vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

ModuleKey = tuple[int | None, str]
Pair = tuple[torch.Tensor, torch.Tensor]

PAGE_BYTES = 64 << 20
ALIGN = 256  # every block starts on this many bytes (DMA- and vector-friendly)
GATE, UP = "experts.gate_proj", "experts.up_proj"


@dataclass(frozen=True)
class _Block:
    numel: int
    fill: Callable[[torch.Tensor], dict[ModuleKey, Pair]]  # flat view → views of its modules


def _fold_into(dst: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """``dst`` ← ``b`` · ``scaling``, folded in float32 before the cast so low-precision
    models lose nothing extra; float32 to float32 multiplies straight into ``dst`` (the same
    elementwise product, without a temporary)."""
    if scaling == 1.0:
        dst.copy_(b)
    elif b.dtype == torch.float32 and dst.dtype == torch.float32:
        torch.mul(b, scaling, out=dst)
    else:
        dst.copy_(b.to(torch.float32) * scaling)


def _plain(key: ModuleKey, a: torch.Tensor, b: torch.Tensor, scaling: float) -> _Block:
    na = a.numel()
    transposed = key[1] == "embed_tokens"

    def fill(flat: torch.Tensor) -> dict[ModuleKey, Pair]:
        if transposed:
            a_view = flat[:na].view(a.shape[1], a.shape[0]).T
        else:
            a_view = flat[:na].view(a.shape)
        a_view.copy_(a)
        b_view = flat[na:].view(b.shape)
        _fold_into(b_view, b, scaling)
        return {key: (a_view, b_view)}
    return _Block(na + b.numel(), fill)


def _gate_up(gate_key: ModuleKey, gate: tuple[torch.Tensor, torch.Tensor, float],
             up_key: ModuleKey, up: tuple[torch.Tensor, torch.Tensor, float]) -> _Block:
    """[a_gate | a_up | B pair [E, 2, I, r]]: the pair is b13's slot layout at r == R."""
    (ga, gb, gs), (ua, ub, us) = gate, up
    n_ga, n_ua = ga.numel(), ua.numel()
    e, i, r = gb.shape

    def fill(flat: torch.Tensor) -> dict[ModuleKey, Pair]:
        ga_view = flat[:n_ga].view(ga.shape)
        ua_view = flat[n_ga:n_ga + n_ua].view(ua.shape)
        pair = flat[n_ga + n_ua:].view(e, 2, i, r)
        ga_view.copy_(ga)
        ua_view.copy_(ua)
        _fold_into(pair[:, 0], gb, gs)
        _fold_into(pair[:, 1], ub, us)
        return {gate_key: (ga_view, pair[:, 0]), up_key: (ua_view, pair[:, 1])}
    return _Block(n_ga + n_ua + 2 * gb.numel(), fill)


def _blocks(modules: Mapping[ModuleKey, tuple[torch.Tensor, torch.Tensor, float]]
            ) -> list[_Block]:
    blocks = []
    for key, (a, b, s) in modules.items():
        layer, kind = key
        if kind == UP and (layer, GATE) in modules:
            continue  # packed with its gate
        up = modules.get((layer, UP)) if kind == GATE else None
        if up is not None and up[1].shape == b.shape and b.dim() == 3:
            blocks.append(_gate_up(key, (a, b, s), (layer, UP), up))
        else:
            if up is not None:  # shapes differ (ragged ranks): both go plain
                blocks.append(_plain((layer, UP), *up))
            blocks.append(_plain(key, a, b, s))
    return blocks


def _place(sizes: list[int], page_bytes: int) -> tuple[list[int], list[tuple[int, int]]]:
    """First-fit of byte sizes into pages: (bytes used per page, (page, offset) per size)."""
    used: list[int] = []
    caps: list[int] = []
    where = []
    for n in sizes:
        for p, u in enumerate(used):
            off = -(-u // ALIGN) * ALIGN
            if off + n <= caps[p]:
                used[p] = off + n
                where.append((p, off))
                break
        else:
            used.append(n)
            caps.append(max(page_bytes, n))
            where.append((len(used) - 1, 0))
    return used, where


def pack_slot_ready(modules: Mapping[ModuleKey, tuple[torch.Tensor, torch.Tensor, float]],
                    dtype: torch.dtype, *, pin: bool,
                    page_bytes: int = PAGE_BYTES) -> dict[ModuleKey, Pair]:
    """Slot-ready (a, b) views of ``modules`` ((a, b, scaling) each), packed into pages of
    ``page_bytes`` (pinned when ``pin``); keys keep their order."""
    blocks = _blocks(modules)
    elsize = torch.empty((), dtype=dtype).element_size()
    used, where = _place([blk.numel * elsize for blk in blocks], page_bytes)
    pages = [torch.empty(n, dtype=torch.uint8, pin_memory=pin).view(dtype) for n in used]
    packed: dict[ModuleKey, Pair] = {}
    for blk, (p, off) in zip(blocks, where):
        start = off // elsize
        packed.update(blk.fill(pages[p][start:start + blk.numel]))
    return {key: packed[key] for key in modules}

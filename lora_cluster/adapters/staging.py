"""Which layers of an adapter update have only partly arrived, and one warning when they pile up.

An update is staged layer by layer: a layer is staged once every one of its expected parts
(a module's LoRA pair, as the source delivers it) has arrived. When a source delivers tensors
out of layer order — a file whose tensor order interleaves layers, a stream sending them
non-sequentially — several layers are partly arrived at once and their tensors wait in memory.

    arrivals = LayerArrivals("sql@v2", expected={0: 7, 1: 7, None: 1})
    if arrivals.arrive(layer, [lora.a, lora.b]):   # True: that completed the layer
        ...stage it...
    arrivals.close()                               # update finished or failed

The tracker holds only weak references to the tensors (the staging area owns them): a tensor
freed early — e.g. the staging of a failed update is dropped — stops counting at once, and the
tracker never keeps memory alive. A *buffering episode* starts when two or more layers are
partly arrived at the same time and ends when fewer than two are (or at ``close``); the first
episode of an update logs ONE warning on ``lora_cluster.adapters`` naming the layers buffered
at its peak and the bytes they held then. Later episodes only update ``peak``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

logger = logging.getLogger("lora_cluster.adapters")

Layer = int | None  # None: the model-wide targets (embed_tokens, lm_head)


@dataclass(frozen=True)
class BufferedLayers:
    """A snapshot of partly arrived layers: which ones, and the bytes their tensors held."""

    layers: tuple[Layer, ...]
    nbytes: int

    def describe(self) -> str:
        names = ", ".join("model-wide" if x is None else str(x) for x in self.layers)
        return f"layers [{names}] holding {self.nbytes / 2**20:.2f} MB ({self.nbytes} bytes)"


def _layer_order(layer: Layer) -> tuple[int, int]:
    return (1, 0) if layer is None else (0, layer)


class _Partial:
    """One partly arrived layer: parts still missing and weak refs to what arrived."""

    __slots__ = ("missing", "nbytes", "refs")

    def __init__(self, missing: int) -> None:
        self.missing = missing
        self.nbytes = 0
        self.refs: list[weakref.ref[torch.Tensor]] = []


class LayerArrivals:
    """Partly arrived layers of one update, tracked by weak reference (see module docstring)."""

    def __init__(self, what: str, expected: Mapping[Layer, int]) -> None:
        bad = {k: v for k, v in expected.items() if v < 1}
        if bad:
            raise ValueError(f"{what}: every expected layer needs at least one part, got {bad}")
        self.what = what
        self._expected = dict(expected)
        self._partial: dict[Layer, _Partial] = {}
        self._held = 0  # bytes of live tensors in partial layers (kept by weakref callbacks)
        self._episode: BufferedLayers | None = None
        self.peak: BufferedLayers | None = None  # the largest buffering seen (bytes)
        self.warned = False
        self.completed: set[Layer] = set()

    # ---------------------------------------------------------------- arrivals
    def arrive(self, layer: Layer, tensors: Iterable[torch.Tensor]) -> bool:
        """One expected part of ``layer`` arrived (its tensors, possibly none on this rank).

        Returns True when this part completes the layer (it is then no longer tracked).
        """
        if layer not in self._expected:
            raise KeyError(f"{self.what}: layer {layer} is not part of this update")
        if layer in self.completed:
            raise ValueError(f"{self.what}: layer {layer} already complete, got another part")
        part = self._partial.get(layer)
        if part is None:
            part = self._partial[layer] = _Partial(self._expected[layer])
        part.missing -= 1
        if part.missing == 0:
            del self._partial[layer]
            self._held -= part.nbytes
            part.nbytes = 0  # late callbacks of its refs must not subtract again
            part.refs.clear()
            self.completed.add(layer)
            self._after_change()
            return True
        for t in tensors:
            n = t.numel() * t.element_size()
            part.refs.append(weakref.ref(t, self._freed_callback(part, n)))
            part.nbytes += n
            self._held += n
        self._after_change()
        return False

    def _freed_callback(self, part: _Partial, n: int):  # type: ignore[no-untyped-def]
        tracker = weakref.ref(self)

        def freed(_: weakref.ref[torch.Tensor]) -> None:
            me = tracker()
            if me is not None and part.nbytes >= n and part.refs:
                part.nbytes -= n
                me._held -= n
        return freed

    def _after_change(self) -> None:
        if len(self._partial) >= 2:
            if self._episode is None or self._held > self._episode.nbytes:
                self._episode = BufferedLayers(
                    tuple(sorted(self._partial, key=_layer_order)), self._held)
        elif self._episode is not None:
            self._end_episode()

    def _end_episode(self) -> None:
        episode, self._episode = self._episode, None
        assert episode is not None
        if self.peak is None or episode.nbytes > self.peak.nbytes:
            self.peak = episode
        if not self.warned:
            self.warned = True
            logger.warning(
                "adapter update %s: tensors arrived out of layer order; %s were buffered at once "
                "until their other tensors arrived", self.what, episode.describe())

    # ---------------------------------------------------------------- views, end
    def buffered(self) -> dict[Layer, int]:
        """Partly arrived layers now → bytes their (still live) tensors hold."""
        return {layer: p.nbytes for layer, p in self._partial.items()}

    @property
    def held_bytes(self) -> int:
        return self._held

    def missing_layers(self) -> list[Layer]:
        """Expected layers not complete yet, in layer order (model-wide last)."""
        return sorted((x for x in self._expected if x not in self.completed), key=_layer_order)

    def __len__(self) -> int:
        """How many layers are partly arrived now."""
        return len(self._partial)

    def close(self) -> None:
        """The update finished or failed: report an open episode, then forget everything."""
        if self._episode is not None:
            self._end_episode()
        for part in self._partial.values():
            part.nbytes = 0
            part.refs.clear()
        self._partial.clear()
        self._held = 0

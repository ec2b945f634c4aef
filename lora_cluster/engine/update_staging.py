"""A rank's staging area for one in-place adapter update (the ``UpdateAdapter`` commands).

The first command of a version opens the file once (header parsed, whole adapter validated);
each command reads only the layers it names, parts arriving in file order. A part waits in
``_partial`` until its layer is complete — ``LayerArrivals`` tracks those layers by weak
reference and warns once per update when two or more pile up — and a complete layer moves to
``staged`` as slot-ready host copies (model dtype, scale folded, pinned on GPU hosts, so
activating it later is plain copies / an async DMA).
The final command reads whatever layers remain (all of them for a one-command update, the
model-wide targets otherwise) and turns ``staged`` into the version's host-cache entry.

Nothing here touches the serving state: the old version keeps serving until the controller
flips its pointer, and a failed or abandoned update is dropped with ``close``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

from lora_cluster.adapters.layer_stream import LayerStream
from lora_cluster.adapters.staging import Layer, LayerArrivals
from lora_cluster.adapters.weights import AdapterWeights, LoRATensors, ModuleKey
from lora_cluster.engine.slot_activation import slot_ready
from lora_cluster.errors import ClusterError
from lora_cluster.model.parallel import ParallelInfo
from lora_cluster.model.spec import ModelSpec


class StagedUpdate:
    """One adapter version being staged on one rank (see module docstring)."""

    def __init__(self, path: str, spec: ModelSpec, parallel: ParallelInfo, *, name: str,
                 version: int, max_lora_rank: int, dtype: torch.dtype, pin: bool,
                 check: Callable[[AdapterWeights], None] | None = None) -> None:
        self.name, self.version, self.dtype, self.pin = name, version, dtype, pin
        self.check = check  # e.g. the model's slot-table shape check, per staged layer
        self.rank = parallel.rank
        self.stream = LayerStream(path, spec, parallel, name=name, version=version,
                                  max_lora_rank=max_lora_rank)
        self.arrivals = LayerArrivals(f"{name!r} v{version} (rank {parallel.rank})",
                                      self.stream.expected())
        self.staged: dict[ModuleKey, LoRATensors] = {}
        self._partial: dict[Layer, dict[ModuleKey, LoRATensors]] = {}
        self.pin_ms = 0.0
        self.commands = 0

    def stage(self, layers: Iterable[Layer] | None) -> None:
        """Read these layers (None: every layer not staged yet) into staging."""
        self.commands += 1
        todo = self.arrivals.missing_layers() if layers is None else list(layers)
        for layer, modules in self.stream.read(todo):
            held = self._partial.setdefault(layer, {})
            held.update(modules)
            if self.arrivals.arrive(layer, [x for m in modules.values() for x in (m.a, m.b)]):
                done = self._partial.pop(layer)
                if self.check is not None:  # a typed refusal now, not at activation time
                    self.check(AdapterWeights(self.name, self.version, self.stream.rank, done))
                t0 = time.perf_counter()
                self.staged.update(slot_ready(done, self.dtype, pin=self.pin))
                self.pin_ms += (time.perf_counter() - t0) * 1e3

    def finish(self) -> tuple[AdapterWeights, tuple[tuple[str, float], ...]]:
        """Stage what remains; the complete version and where the time went (all commands)."""
        self.stage(None)
        missing = self.arrivals.missing_layers()
        if missing:  # stage() raises on a bad read; this is a broken stream, not a bad file
            raise ClusterError(f"rank {self.rank}: update of {self.name!r} v{self.version} "
                               f"finished with layers {missing} incomplete", name=self.name)
        weights = AdapterWeights(self.name, self.version, self.stream.rank, dict(self.staged))
        breakdown = dict(self.stream.stats.breakdown())
        if self.pin:
            breakdown["pin"] = self.pin_ms  # cast, fold and page-lock
        else:
            breakdown["convert"] += self.pin_ms
        self.close()
        return weights, tuple(breakdown.items())

    @property
    def nbytes(self) -> int:
        """Bytes staged or waiting for their layer (this rank's share)."""
        waiting = sum(t.nbytes for mods in self._partial.values() for t in mods.values())
        return waiting + sum(t.nbytes for t in self.staged.values())

    def close(self) -> None:
        """Free everything (idempotent); the tracker reports an open buffering episode."""
        self._partial.clear()
        self.staged = {}
        self.arrivals.close()
        self.stream.close()

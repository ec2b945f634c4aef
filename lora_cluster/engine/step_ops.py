"""Adapter commands that ride on the next ``Step`` instead of each being a round trip.

While the controller plans a step (``ControllerCore._step``), the slot placements and host
drops it decides are recorded here in order instead of being sent one by one; the ``Step``
carries them (``Step.adapter_ops``) and every rank applies them, in that order, before the
step's forward — through the same code paths as the standalone commands. A rank that cannot
apply one raises ``op_failure``'s ClusterError, so the step fails into the controller's
recovery path (rank group rebuilt), which reads the failed op back with ``failed_op`` and
fails the requests that needed it with the rank's typed cause (``op_cause``).

Loads ride too, but only for a version whose read-ahead the output rank reported finished
(``PrefetchBook.ready``): every rank then only files what it read (and validated and
planned) beside the stream, so nothing is left to fail but a lost read, which the step's
failure path covers. Any other load stays a standalone command: a read that may fail must
give its request a typed error without failing the step.

Order against standalone commands sent while planning (a ``LoadAdapter``): drops go to the
ranks first (the load may need the room they free); placements and ridden loads keep riding
(a load never touches a slot). A drop of a version whose placement is still pending (never
seen in practice: the placement's request holds it) turns that placement into an
``EvictSlot``, which is what placing and then dropping leaves on a rank; a ridden load of it
is taken off the step (the drop also discards the rank's read-ahead of it).
No torch here: the controller and the ranks both use it.
"""

from __future__ import annotations

from lora_cluster.engine.messages import (
    AdapterCommand,
    AdapterKey,
    DropAdapter,
    EvictSlot,
    LoadAdapter,
    PlaceAdapter,
)
from lora_cluster.errors import ALL_ERRORS, ClusterError, LoRAClusterError

# A ridden op is ordered by its place in its step, not by the stream: its own seq is unused.
RIDES = -1
StepOp = PlaceAdapter | DropAdapter | LoadAdapter


class StepOps:
    """Placements and drops decided while planning one step (caller holds the state lock)."""

    def __init__(self) -> None:
        self.open = False
        self.ops: list[StepOp] = []

    def begin(self) -> None:
        assert not self.ops, "ops of an earlier step were never sent"
        self.open = True

    def take(self) -> tuple[StepOp, ...]:
        """Close planning; the ops for the step, in decision order."""
        ops, self.ops, self.open = tuple(self.ops), [], False
        return ops

    def place(self, key: AdapterKey, slot: int) -> None:
        self.ops.append(PlaceAdapter(seq=RIDES, name=key[0], version=key[1], slot=slot))

    def drop(self, key: AdapterKey) -> None:
        self.ops.append(DropAdapter(seq=RIDES, name=key[0], version=key[1]))

    def load(self, key: AdapterKey, path: str) -> None:
        """A load whose read-ahead is done on the ranks (see module docstring)."""
        self.ops.append(LoadAdapter(seq=RIDES, name=key[0], version=key[1], path=path))

    def take_drops(self) -> list[AdapterCommand]:
        """The pending drops, to send now ahead of a standalone command; placements stay."""
        if not any(isinstance(op, DropAdapter) for op in self.ops):
            return []
        dropped = {op.key for op in self.ops if isinstance(op, DropAdapter)}
        out: list[AdapterCommand] = []
        keep: list[StepOp] = []
        for op in self.ops:
            if isinstance(op, DropAdapter):
                out.append(op)
            elif op.key in dropped:
                if isinstance(op, PlaceAdapter):
                    out.append(EvictSlot(seq=RIDES, slot=op.slot))  # placed, then dropped
                # (a ridden load of a dropped version: loaded, then dropped — nothing to do)
            else:
                keep.append(op)
        self.ops = keep
        return out


def op_failure(rank: int, step_seq: int, index: int, op: StepOp,
               err: BaseException) -> ClusterError:
    """The error a rank raises for a ridden op it could not apply (fails the whole step)."""
    code = err.code if isinstance(err, LoRAClusterError) else "internal_error"
    what = f"{type(op).__name__} {op.name}@v{op.version}"
    if isinstance(op, PlaceAdapter):
        what += f" → slot {op.slot}"
    elif isinstance(op, LoadAdapter):
        what += f" from {op.path}"
    return ClusterError(f"rank {rank}: step {step_seq}: {what} (op {index}) failed: "
                        f"{type(err).__name__}: {err}", rank=rank, op_index=index,
                        op_name=op.name, op_version=op.version, cause_type=type(err).__name__,
                        cause_code=code, cause=str(err))


def failed_op(err: LoRAClusterError, ops: tuple[StepOp, ...]) -> StepOp | None:
    """The ridden op ``err`` (a failed step) names, if the step failed on one of its ops."""
    index = err.details.get("op_index")
    if not isinstance(index, int) or not 0 <= index < len(ops):
        return None
    op = ops[index]
    if (op.name, op.version) != (err.details.get("op_name"), err.details.get("op_version")):
        return None
    return op


def op_cause(err: LoRAClusterError) -> LoRAClusterError:
    """The rank's typed error behind a failed ridden op (ClusterError if it was untyped)."""
    name = err.details.get("cause_type")
    cls = next((c for c in ALL_ERRORS if c.__name__ == name), ClusterError)
    details = {k: v for k, v in err.details.items() if k in ("rank", "op_name", "op_version")}
    return cls(f"adapter {err.details.get('op_name')!r} could not be activated on rank "
               f"{err.details.get('rank')}: {err.details.get('cause')}", **details)

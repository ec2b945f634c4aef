"""Rank failure in ``ControllerCore``: rebuild the rank group and recompute what was running.

A mixin: ``ControllerCore`` provides the state it uses; the threading model is the core's
(see ``engine/controller_core.py``). A step that raises ClusterError makes the core restart
the rank group, reload the adapters that were resident, and re-run in-flight requests from
their tokens so far (recompute). A second failure in a row fails the requests of that step
with the error. A step that failed on an adapter op it carried (a ridden placement or load)
fails only the requests that needed that adapter, with the rank's typed cause.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lora_cluster.engine.adapter_control import AdapterControl, tier_id
from lora_cluster.engine.async_steps import Planned
from lora_cluster.engine.block_manager import BlockManager
from lora_cluster.engine.messages import LoadAdapter, PlaceAdapter
from lora_cluster.engine.rank_group import RankGroup
from lora_cluster.engine.scheduler import ScheduledStep, Scheduler, SeqEvent
from lora_cluster.engine.step_ops import failed_op, op_cause
from lora_cluster.errors import ClusterError, LoRAClusterError, RequestError

logger = logging.getLogger("lora_cluster.engine")


class RankRecovery:
    """Recovery from a failed step (mixed into ``ControllerCore``)."""

    group: RankGroup
    adapters: AdapterControl
    scheduler: Scheduler
    _lock: threading.RLock
    _counters: collections.Counter[str]
    _failures_in_a_row: int
    _broken: LoRAClusterError | None

    if TYPE_CHECKING:  # provided by ControllerCore
        def _publish(self, events: list[SeqEvent]) -> None: ...

        def _fail_all(self, err: LoRAClusterError) -> None: ...

    def _recover(self, planned: Planned, err: ClusterError,
                 abandoned: Sequence[Planned] = ()) -> None:
        """Rebuild the rank group after a failed step (caller holds ``_exec``); ``abandoned``:
        steps sent after it, lost with the ranks."""
        with self._lock:
            self._failures_in_a_row += 1
            self._counters["rank_group_restarts"] += 1
            self._counters["steps_abandoned"] += len(abandoned)
            self.scheduler.preempt_all()
            failed = failed_op(err, planned.command.adapter_ops)
            if isinstance(failed, PlaceAdapter | LoadAdapter):
                self._fail_placement(planned.step, failed, op_cause(err))
            if self._failures_in_a_row > 1:
                for lost in (planned, *abandoned):
                    for seq, _ in lost.step.entries:
                        self.scheduler.abort(seq, error=err)
                self._publish(self.scheduler.take_events())
        try:
            info = self.group.restart()
            with self._lock:
                self._resize_blocks(info.num_kv_blocks)
                self.adapters.restore_locked()
        except LoRAClusterError as fatal:
            with self._lock:
                self._broken = ClusterError(f"rank group could not be rebuilt: {fatal}")
                self._fail_all(self._broken)

    def _fail_placement(self, step: ScheduledStep, op: PlaceAdapter | LoadAdapter,
                        cause: LoRAClusterError) -> None:
        """A ridden placement (or load) failed on a rank: the step's requests that needed it
        fail with the rank's typed cause; the rebuilt group does not re-place it (the next
        request for it places it again). Caller holds ``_lock``, after ``preempt_all``."""
        self._counters["step_op_failures"] += 1
        if isinstance(op, LoadAdapter):
            self.adapters.ridden_load_failed(op.key, cause)
        logger.warning("step failed on its placement of %s@v%d: %s", op.name, op.version, cause)
        for seq, _ in step.entries:
            if seq.adapter == op.key:
                self.scheduler.abort(seq, error=cause)
        self._publish(self.scheduler.take_events())
        with contextlib.suppress(RequestError):  # still held (a pin): restore re-places it
            self.adapters.tiers.evict_device(tier_id(op.key))

    def _resize_blocks(self, num_blocks: int) -> None:
        if num_blocks < self.scheduler.cfg.num_blocks:
            raise ClusterError(f"rebuilt rank group has {num_blocks} KV blocks, fewer than the "
                               f"{self.scheduler.cfg.num_blocks} planned for")
        self.scheduler.blocks = BlockManager(self.scheduler.cfg.num_blocks,
                                             self.scheduler.cfg.block_size)

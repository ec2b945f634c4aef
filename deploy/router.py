"""``AdapterAffinityRouter``: Serve's request-router hook running ``deploy.affinity``'s policy.

Runs inside whatever process holds the ``LoRAServer`` handle (the ingress). Requests carry
their adapter as ``multiplexed_model_id``; each replica publishes the adapters it holds by
tier through ``record_routing_stats``; the load of a replica is the router's own count of
ongoing requests there (fresh on every send), else the replica's last report. Decisions are
counted once per routed request (``on_request_routed``) in a process-wide tally
(``deploy.affinity.routing_decisions``) that the ingress reports to the directory.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

# Serve pickles this module *by value* into every process holding a handle, so it must not
# hold state: the tally lives in deploy.affinity, which is imported there by reference.
from deploy.affinity import ReplicaLoad, classify, rank_replicas, record_decision


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Prefer replicas holding the request's adapter; spill when they are saturated.

    The mixins only change how a chosen replica is handed to a waiting request: first to one
    for the same adapter, else in arrival order. The base class matches by request id, which
    concurrent calls made while serving one request share — the second of them would wait
    forever.
    """

    def initialize_state(self, spill_threshold: int = 64, **_: Any) -> None:
        self.spill_threshold = int(spill_threshold)

    def _view(self, replica: RunningReplica) -> ReplicaLoad:
        stats = replica.routing_stats or {}
        load = self.replica_queue_len_cache.get(replica.replica_id)
        if load is None:
            load = int(stats.get("ongoing", 0))
        return ReplicaLoad(replica_id=replica.replica_id, load=load,
                           device=frozenset(stats.get("device", ())),
                           host=frozenset(stats.get("host", ())),
                           disk=frozenset(stats.get("disk", ())))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        adapter = ""
        if pending_request is not None:
            adapter = pending_request.metadata.multiplexed_model_id
            # Back off between rounds when no ranked replica accepts (probes time out, queues
            # are full); without it Serve's routing loop spins and starves the process.
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id: r for r in candidate_replicas}
        ranks = rank_replicas(adapter or None, [self._view(r) for r in candidate_replicas],
                              getattr(self, "spill_threshold", 64))
        return [[by_id[rid] for rid in rank if rid in by_id] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        adapter = pending_request.metadata.multiplexed_model_id or None
        views = [self._view(r) for r in self.curr_replicas.values()]
        chosen = next((v for v in views if v.replica_id == replica_id), None)
        record_decision(classify(adapter, chosen, views))

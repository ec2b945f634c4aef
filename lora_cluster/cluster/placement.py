"""One placement group per replica: a bundle for the controller and one per rank."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lora_cluster.config import ClusterConfig
from lora_cluster.errors import ClusterError

CONTROLLER_CPUS = 0.1
PG_PREFIX = "lora_cluster_pg:"


@dataclass(frozen=True)
class ReplicaPlacement:
    """The placement group and the resources each rank actor asks for inside it."""

    group: PlacementGroup
    rank_cpus: float
    rank_gpus: int

    def controller_strategy(self) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=0)

    def rank_strategy(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank + 1)

    def remove(self) -> None:
        remove_placement_group(self.group)


def rank_resources(config: ClusterConfig) -> tuple[float, int]:
    """(CPUs, GPUs) per rank: a GPU each on CUDA; on CPU-only hosts a fraction of the CPUs."""
    if config.device == "cuda":
        return config.num_cpus_per_rank, 1
    total = float(ray.cluster_resources().get("CPU", 1.0))
    share = (total - CONTROLLER_CPUS) / config.world_size
    # floor to Ray's 0.01 granularity so the bundles always fit what is there
    return max(0.01, math.floor(min(config.num_cpus_per_rank, share) * 100) / 100), 0


def create_placement(config: ClusterConfig, *, name: str | None = None,
                     timeout_s: float = 120.0) -> ReplicaPlacement:
    """Reserve the replica's bundles (PACK: ranks of one replica stay together when possible).

    A named replica gets a detached, named group that outlives the creating process.
    """
    cpus, gpus = rank_resources(config)
    rank_bundle: dict[str, float] = {"CPU": cpus}
    if gpus:
        rank_bundle["GPU"] = float(gpus)
    bundles = [{"CPU": CONTROLLER_CPUS}] + [dict(rank_bundle) for _ in range(config.world_size)]
    if name is not None:
        group = placement_group(bundles, strategy="PACK", name=PG_PREFIX + name,
                                lifetime="detached")
    else:
        group = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ClusterError(
            f"placement: could not reserve {config.world_size} rank bundles of {rank_bundle} "
            f"within {timeout_s:.0f}s (cluster resources: {ray.cluster_resources()})",
            bundles=bundles,
        )
    return ReplicaPlacement(group, cpus, gpus)


def remove_named_placement(name: str | None) -> None:
    """Free the detached group of a named replica (no-op when it is already gone)."""
    if name is None:
        return
    try:
        group = get_placement_group(PG_PREFIX + name)
    except ValueError:
        return
    remove_placement_group(group)

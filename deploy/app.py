"""Application builders: ``build_app(config, ...)`` for Python, ``app(args)`` for ``serve run``.

    serve run deploy.app:app model=/models/qwen3-moe tp_size=2 replicas=2
    serve deploy deploy/serve_config.yaml

The application: ``OpenAIIngress`` → ``LoRAServer`` (N replicas, each with its own placement
group of rank bundles, routed by ``AdapterAffinityRouter``) + the ``AdapterDirectory``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from deploy.directory import AdapterDirectory
from deploy.ingress import OpenAIIngress
from deploy.router import AdapterAffinityRouter
from deploy.server import LoRAServer
from deploy.settings import AppSettings, split_args
from lora_cluster.config import ClusterConfig
from lora_cluster.errors import ConfigError


def served_model_name(config: ClusterConfig) -> str:
    """The base model's name in ``model`` fields: the configured one, else the dir's name."""
    return config.served_model_name or Path(config.model.rstrip("/")).name or config.model


def _cuda_available() -> bool:
    """Whether the cluster (when connected) or this host has GPUs, for device="auto"."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return bool(torch.cuda.is_available())


def replica_bundles(config: ClusterConfig, settings: AppSettings) -> list[dict[str, float]]:
    """Bundle 0 for the replica itself, then one per rank (a GPU each on CUDA).

    On CPU hosts a rank gets ``num_cpus_per_rank``, capped so every replica fits the
    cluster when Ray is connected (rank actors ask for exactly what their bundle holds).
    """
    rank: dict[str, float] = {"CPU": _rank_cpus(config, settings)}
    if config.device == "cuda":
        rank["GPU"] = 1.0
    return [{"CPU": settings.replica_cpus}] + [dict(rank) for _ in range(config.world_size)]


def _rank_cpus(config: ClusterConfig, settings: AppSettings) -> float:
    if config.device == "cuda":
        return config.num_cpus_per_rank
    import ray

    cpus = config.num_cpus_per_rank
    if ray.is_initialized():
        total = float(ray.cluster_resources().get("CPU", 1.0))
        spare = total - settings.replica_cpus * (settings.replicas + settings.ingress_replicas)
        cpus = min(cpus, spare / (settings.replicas * config.world_size))
    return round(max(0.01, cpus), 2)


def build_app(config: ClusterConfig | dict[str, Any], **settings: Any) -> serve.Application:
    """The Serve application for ``config`` (keyword settings: see ``AppSettings``)."""
    if isinstance(config, dict):
        config, app_settings = split_args({**config, **settings})
    else:
        app_settings = AppSettings(**settings)
    if not isinstance(config, ClusterConfig):
        raise ConfigError(f"config: expected a ClusterConfig or a dict, got "
                          f"{type(config).__name__}", field="config")
    # An explicit "cuda" needs no GPU in sight now: the rank bundles wait for GPU nodes.
    config = config.resolved(cuda_available=config.device == "cuda" or _cuda_available())
    bundles = replica_bundles(config, app_settings)
    # RayRankGroup asks rank_resources(config) for each actor: make it ask for the bundle.
    config = config.replace(num_cpus_per_rank=bundles[1]["CPU"])
    router: dict[str, Any] = {
        "request_router_class": AdapterAffinityRouter,
        "request_router_kwargs": {"spill_threshold": app_settings.spill_for(config)},
        "request_routing_stats_period_s": app_settings.routing_stats_period_s,
        "request_routing_stats_timeout_s": max(5.0, 5 * app_settings.routing_stats_period_s),
    }
    directory = AdapterDirectory.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": 0},
    ).bind(stale_after_s=3 * app_settings.report_period_s + 2.0)
    server = LoRAServer.options(  # type: ignore[attr-defined]
        num_replicas=app_settings.replicas,
        max_ongoing_requests=app_settings.max_ongoing_for(config),
        ray_actor_options={"num_cpus": app_settings.replica_cpus},
        placement_group_bundles=bundles,
        placement_group_strategy="PACK",
        health_check_period_s=app_settings.health_check_period_s,
        health_check_timeout_s=app_settings.health_check_timeout_s,
        graceful_shutdown_timeout_s=30,
        request_router_config=RequestRouterConfig(**router),
    ).bind(config, directory, app_settings)
    return OpenAIIngress.options(  # type: ignore[attr-defined]
        num_replicas=app_settings.ingress_replicas,
        ray_actor_options={"num_cpus": app_settings.replica_cpus},
        max_ongoing_requests=max(256, 4 * app_settings.max_ongoing_for(config)),
    ).bind(server, directory, app_settings, served_model_name(config), config.model)


def app(args: dict[str, Any]) -> serve.Application:
    """``serve run deploy.app:app model=DIR [key=value ...]`` (Serve's one-argument builder)."""
    return build_app(dict(args))

"""Controller-side check of an adapter before any rank reads it: resolve, then validate the
config and the safetensors header against the model (no tensor data is read)."""

from __future__ import annotations

from lora_cluster.config import ClusterConfig
from lora_cluster.engine.registry import AdapterMeta
from lora_cluster.model.spec import ModelSpec


def inspect_adapter(source: str, spec: ModelSpec, config: ClusterConfig) -> tuple[str, AdapterMeta]:
    """(local adapter directory, its metadata), or the typed error that refuses it."""
    from lora_cluster.adapters.source import resolve_source
    from lora_cluster.adapters.validate import validate_adapter

    path = resolve_source(source, roots=config.adapter_roots)
    report = validate_adapter(path, spec, max_lora_rank=config.max_lora_rank)
    cfg = report.config
    return str(path), AdapterMeta(
        rank=int(report.max_rank), alpha=float(cfg.lora_alpha), scaling=float(cfg.default_scaling),
        use_rslora=bool(cfg.use_rslora), target_modules=tuple(cfg.target_names()))

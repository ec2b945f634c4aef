"""Controller-side check of an adapter before any rank reads it: resolve the source, then
validate the config and the safetensors header against the model (no tensor data is read)."""

from __future__ import annotations

from lora_cluster.adapters import inspect_adapter as inspect_plan
from lora_cluster.adapters import resolve_source
from lora_cluster.adapters.layer_stream import layer_bytes
from lora_cluster.config import ClusterConfig
from lora_cluster.engine.registry import AdapterMeta
from lora_cluster.model.spec import ModelSpec


def inspect_adapter(name: str, source: str, spec: ModelSpec,
                    config: ClusterConfig) -> tuple[str, AdapterMeta]:
    """(local adapter directory, its metadata), or the typed error that refuses it.

    Emits the loader's one summary warning about ignored modules, if any.
    """
    path = resolve_source(source, adapter_roots=config.adapter_roots)
    plan = inspect_plan(path, spec, max_lora_rank=config.max_lora_rank, subfolder=name)
    cfg = plan.config
    return str(path), AdapterMeta(
        rank=int(plan.rank), alpha=float(cfg.lora_alpha), scaling=float(cfg.default_scaling),
        use_rslora=bool(cfg.use_rslora), target_modules=tuple(cfg.target_names()),
        layer_bytes=tuple(sorted((k, v) for k, v in layer_bytes(plan).items() if k is not None)))

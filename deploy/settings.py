"""The Serve app's settings: ``AppSettings`` beside the ``ClusterConfig`` of each replica.

``split_args`` turns a builder's argument dict (from ``serve run ... key=value`` — all strings —
or from a YAML config — typed) into a validated ``ClusterConfig`` and ``AppSettings``,
converting by each field's declared type and naming the key at fault.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any

from lora_cluster.config import ClusterConfig
from lora_cluster.errors import ConfigError

ADMIN_TOKEN_ENV = "LORA_CLUSTER_ADMIN_TOKEN"


@dataclass(frozen=True, kw_only=True)
class AppSettings:
    """How the Serve app runs its replicas (the model side lives in ``ClusterConfig``)."""

    replicas: int = 1
    # Admin routes (load/unload) need ``Authorization: Bearer <token>`` when set; None reads
    # LORA_CLUSTER_ADMIN_TOKEN in the ingress process, so a Kubernetes Secret can supply it.
    admin_token: str | None = None
    # A replica holding the adapter is "saturated" at this many ongoing requests; then the
    # least-loaded other replicas are offered too. None: the engine's max_num_seqs.
    spill_threshold: int | None = None
    # Serve's per-replica cap; None: twice max_num_seqs (at least 16).
    max_ongoing_requests: int | None = None
    routing_stats_period_s: float = 1.0
    report_period_s: float = 1.0
    unload_ack_timeout_s: float = 10.0
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 60.0
    ingress_replicas: int = 1
    replica_cpus: float = 0.1

    def __post_init__(self) -> None:
        for name in ("replicas", "ingress_replicas"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{name}: must be an int >= 1, got {value!r}", field=name)
        for name in ("spill_threshold", "max_ongoing_requests"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{name}: must be an int >= 1, got {value!r}", field=name)
        for name in ("routing_stats_period_s", "report_period_s", "unload_ack_timeout_s",
                     "health_check_period_s", "health_check_timeout_s", "replica_cpus"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"{name}: must be > 0, got {value!r}", field=name)
        if self.admin_token is not None and not self.admin_token:
            raise ConfigError("admin_token: must be non-empty when given", field="admin_token")

    def spill_for(self, config: ClusterConfig) -> int:
        return self.spill_threshold or config.max_num_seqs

    def max_ongoing_for(self, config: ClusterConfig) -> int:
        return self.max_ongoing_requests or max(16, 2 * config.max_num_seqs)

    def resolved_admin_token(self) -> str | None:
        """The configured token, else the environment's (read where the ingress runs)."""
        return self.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None


def split_args(args: dict[str, Any]) -> tuple[ClusterConfig, AppSettings]:
    """A builder's argument dict → (ClusterConfig, AppSettings); unknown keys are refused."""
    cluster_fields = {f.name: f for f in dataclasses.fields(ClusterConfig)}
    app_fields = {f.name: f for f in dataclasses.fields(AppSettings)}
    cluster_hints = typing.get_type_hints(ClusterConfig)
    app_hints = typing.get_type_hints(AppSettings)
    cluster_values: dict[str, Any] = {}
    app_values: dict[str, Any] = {}
    for key, raw in args.items():
        name = str(key).replace("-", "_")
        if name in cluster_fields:
            cluster_values[name] = _coerce(name, raw, cluster_hints[name])
        elif name in app_fields:
            app_values[name] = _coerce(name, raw, app_hints[name])
        else:
            known = sorted([*cluster_fields, *app_fields])
            raise ConfigError(f"{key}: unknown setting (known: {', '.join(known)})", field=name)
    if "model" not in cluster_values:
        raise ConfigError("model: the app needs a model directory (model=...)", field="model")
    return ClusterConfig(**cluster_values), AppSettings(**app_values)


def _coerce(name: str, raw: Any, hint: Any) -> Any:
    """Convert ``raw`` to the field's type; strings from ``serve run key=value`` included."""
    members = typing.get_args(hint)
    optional = type(None) in members
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required", field=name)
    origin = typing.get_origin(hint)
    if optional:
        hint = next(a for a in members if a is not type(None))
        origin = typing.get_origin(hint)
    try:
        if origin is typing.Literal:
            return str(raw)
        if origin is tuple:
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            if name == "extra_env":
                return tuple(tuple(str(x).split("=", 1)) if isinstance(x, str) else tuple(x)
                             for x in items if x)
            return tuple(str(x).strip() for x in items if str(x).strip())
        if hint is bool:
            return _to_bool(name, raw)
        if hint is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError("not an integer")
            return int(raw)
        if hint is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot use {raw!r} ({exc})", field=name) from None


def _to_bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected a boolean, got {raw!r}", field=name)

"""One small exception hierarchy; every class survives pickling across Ray actors.

Each class carries the HTTP status the serving layer maps it to (one place: ``http_status``)
and a short machine-readable ``code``. Messages name the file, key or field at fault.
"""

from __future__ import annotations

from typing import Any


class LoRAClusterError(Exception):
    """Root of every error lora_cluster raises on purpose."""

    http_status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = dict(details)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from (message, details) so subclasses pickle without custom code.
        return (_rebuild, (type(self), self.message, self.details))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[LoRAClusterError], message: str, details: dict[str, Any]) -> LoRAClusterError:
    err = cls.__new__(cls)
    LoRAClusterError.__init__(err, message, **details)
    return err


class ConfigError(LoRAClusterError):
    """A configuration field has an invalid value."""

    http_status = 400
    code = "invalid_config"


class RequestError(LoRAClusterError):
    """A request is malformed: bad sampling params, prompt longer than the context, ..."""

    http_status = 400
    code = "invalid_request"


class AuthError(LoRAClusterError):
    """Missing or wrong admin token."""

    http_status = 401
    code = "unauthorized"


class UnknownAdapterError(LoRAClusterError):
    """No adapter with this name is registered."""

    http_status = 404
    code = "adapter_not_found"


class AdapterError(LoRAClusterError):
    """An adapter could not be loaded; the registry is left unchanged."""

    http_status = 422
    code = "invalid_adapter"


class AdapterNotFoundError(AdapterError):
    """The adapter's source (directory, file or hub id) does not exist."""

    code = "adapter_source_missing"


class AdapterAccessError(AdapterError):
    """The adapter's path escapes the configured ``adapter_roots``."""

    http_status = 403
    code = "adapter_path_forbidden"


class AdapterFormatError(AdapterError):
    """Corrupt or unreadable adapter files (config JSON, safetensors header, ...)."""

    code = "adapter_format"


class AdapterShapeError(AdapterError):
    """A tensor's shape does not match the model module it targets."""

    code = "adapter_shape_mismatch"


class AdapterRankError(AdapterError):
    """The adapter's rank exceeds ``max_lora_rank``."""

    code = "adapter_rank_too_large"


class UnsupportedAdapterError(AdapterError):
    """The adapter uses a feature that is not served (DoRA, bias, unknown target module, ...)."""

    code = "adapter_unsupported"


class ModelLoadError(LoRAClusterError):
    """The base model directory is missing, corrupt or of an unsupported family."""

    http_status = 500
    code = "model_load_failed"


class CapacityError(LoRAClusterError):
    """No room: every device slot is pinned, or the KV cache cannot ever fit the request."""

    http_status = 503
    code = "no_capacity"


class ClusterError(LoRAClusterError):
    """The cluster is not running, a rank group failed and could not be rebuilt, or timed out."""

    http_status = 503
    code = "cluster_unavailable"


ALL_ERRORS: tuple[type[LoRAClusterError], ...] = (
    LoRAClusterError,
    ConfigError,
    RequestError,
    AuthError,
    UnknownAdapterError,
    AdapterError,
    AdapterNotFoundError,
    AdapterAccessError,
    AdapterFormatError,
    AdapterShapeError,
    AdapterRankError,
    UnsupportedAdapterError,
    ModelLoadError,
    CapacityError,
    ClusterError,
)

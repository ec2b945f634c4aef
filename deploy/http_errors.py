"""The one place errors become HTTP responses: ``{"error": {message, type, code, param}}``.

Status codes come from each ``lora_cluster.errors`` class's ``http_status``. Errors that
crossed a Serve handle arrive wrapped by Ray (``RayTaskError`` carrying ``.cause``);
``as_typed`` unwraps them, and maps Serve's own failures (no replica, back-pressure, a dead
actor) to ``ClusterError`` (503).
"""

from __future__ import annotations

import logging
from typing import Any

from lora_cluster.errors import AuthError, ClusterError, LoRAClusterError, RequestError

logger = logging.getLogger("lora_cluster.deploy")

# OpenAI-style error "type" per status (what its SDKs switch on).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    422: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable_error",
}


class ForbiddenError(AuthError):
    """An admin token was given but is wrong."""

    http_status = 403
    code = "forbidden"


def as_typed(exc: BaseException) -> LoRAClusterError:
    """The typed error behind ``exc`` (unwrapping Ray); anything else becomes a 500/503."""
    seen = 0
    while seen < 4:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and cause is not exc:
            exc, seen = cause, seen + 1
            continue
        break
    if isinstance(exc, LoRAClusterError):
        return exc
    name = type(exc).__name__
    if name in ("BackPressureError", "DeploymentUnavailableError", "ActorDiedError",
                "ActorUnavailableError", "RayActorError", "GetTimeoutError", "TimeoutError"):
        return ClusterError(f"replica unavailable: {name}: {exc}")
    if name == "ValidationError":  # pydantic, raised while reading a request body
        return RequestError(f"invalid request: {exc}")
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return LoRAClusterError(f"internal error: {name}: {exc}")


def error_body(err: LoRAClusterError) -> dict[str, Any]:
    """The JSON body of an error response."""
    field = err.details.get("field")
    return {"error": {"message": err.message, "type": _TYPES.get(err.http_status, "error"),
                      "code": err.code, "param": field if isinstance(field, str) else None}}


def error_response(exc: BaseException) -> Any:
    """A FastAPI JSONResponse for ``exc`` with its class's status."""
    from fastapi.responses import JSONResponse

    err = as_typed(exc)
    headers = {"WWW-Authenticate": "Bearer"} if err.http_status == 401 else None
    return JSONResponse(error_body(err), status_code=err.http_status, headers=headers)

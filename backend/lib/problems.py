"""Errors as problem+json (RFC 9457), with field errors, for every failure the API reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ExceptionHandlersMap
from sqlalchemy.exc import IntegrityError

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://docs.contactcenter.test/problems/"

log = structlog.get_logger(__name__)


class FieldError(msgspec.Struct):
    """One field that is wrong, and why."""

    field: str
    message: str


class ProblemDocument(msgspec.Struct):
    """The shape of every error body (RFC 9457), for the OpenAPI document."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldError] | None = None


class Problem(Exception):
    """A failure the client can act on; rendered as problem+json with its status."""

    status: int = 400
    kind: str = "bad-request"
    title: str = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        errors: Sequence[Mapping[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        kind: str | None = None,
        status: int | None = None,
        title: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors or [])
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        if kind:
            self.kind = kind
        if status:
            self.status = status
        if title:
            self.title = title


class InvalidInput(Problem):
    """The request is well-formed but a field's value is not acceptable."""

    status = 422
    kind = "invalid-input"
    title = "Invalid input"

    @classmethod
    def field(cls, field: str, message: str) -> InvalidInput:
        """One field is wrong."""
        return cls(f"{field}: {message}", errors=[{"field": field, "message": message}])


class Unauthenticated(Problem):
    """No valid credentials: sign in again."""

    status = 401
    kind = "unauthenticated"
    title = "Authentication required"


class Forbidden(Problem):
    """Valid credentials that do not allow this."""

    status = 403
    kind = "forbidden"
    title = "Forbidden"


class NotFound(Problem):
    """Nothing by that id here (also what another tenant's ids look like)."""

    status = 404
    kind = "not-found"
    title = "Not found"


class Conflict(Problem):
    """The request clashes with the current state (a duplicate, a rule such as the last owner)."""

    status = 409
    kind = "conflict"
    title = "Conflict"


class TooManyRequests(Problem):
    """Slow down; `Retry-After` says for how long."""

    status = 429
    kind = "too-many-requests"
    title = "Too many requests"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})


def problem_response(
    status: int,
    kind: str,
    title: str,
    detail: str,
    *,
    request: Request[Any, Any, Any] | None = None,
    errors: Sequence[Mapping[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response[dict[str, Any]]:
    """The one way the API renders an error."""
    body: dict[str, Any] = {"type": PROBLEM_BASE + kind, "title": title, "status": status, "detail": detail}
    if request is not None:
        body["instance"] = request.url.path
        request_id = request.scope.get("state", {}).get("request_id")
        if request_id:
            body["request_id"] = request_id
    if errors:
        body["errors"] = list(errors)
    if extra:
        body.update(extra)
    return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=dict(headers or {}))


def _problem_handler(request: Request[Any, Any, Any], exc: Problem) -> Response[dict[str, Any]]:
    return problem_response(
        exc.status,
        exc.kind,
        exc.title,
        exc.detail,
        request=request,
        errors=exc.errors,
        headers=exc.headers,
        extra=exc.extra,
    )


def _field_name(item: Mapping[str, Any]) -> str:
    key = item.get("key")
    if key:
        return str(key).removeprefix("$.")
    message = str(item.get("message", ""))
    # msgspec reports the path at the end of its message: "... - at `$.email`"
    if "at `$." in message:
        return message.rsplit("at `$.", 1)[1].rstrip("`")
    return "body" if item.get("source") == "body" else str(item.get("source") or "request")


def _validation_handler(request: Request[Any, Any, Any], exc: ValidationException) -> Response[dict[str, Any]]:
    errors: list[dict[str, str]] = []
    if isinstance(exc.extra, list):
        for item in exc.extra:
            if isinstance(item, Mapping):
                message = str(item.get("message", "invalid"))
                errors.append({"field": _field_name(item), "message": message.split(" - at `", maxsplit=1)[0]})
    detail = exc.detail or "The request is not valid"
    if errors:
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem_response(400, "validation", "Request validation failed", detail, request=request, errors=errors)


_HTTP_KINDS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthenticated", "Authentication required"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    429: ("too-many-requests", "Too many requests"),
}


def _http_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    if isinstance(exc, ValidationException):
        return _validation_handler(request, exc)
    kind, title = _HTTP_KINDS.get(exc.status_code, ("error", "Error"))
    if isinstance(exc, NotAuthorizedException):
        kind, title = _HTTP_KINDS[401]
    elif isinstance(exc, PermissionDeniedException):
        kind, title = _HTTP_KINDS[403]
    return problem_response(
        exc.status_code, kind, title, exc.detail or title, request=request, headers=exc.headers or None
    )


def _integrity_handler(request: Request[Any, Any, Any], exc: IntegrityError) -> Response[dict[str, Any]]:
    constraint = getattr(getattr(exc.orig, "__cause__", None), "constraint_name", None) or ""
    log.warning("integrity_error", constraint=constraint, path=request.url.path)
    return problem_response(409, "conflict", "Conflict", "The change conflicts with existing data", request=request)


def _unexpected_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled_error", path=request.url.path, error=type(exc).__name__)
    return problem_response(
        HTTP_500_INTERNAL_SERVER_ERROR,
        "internal",
        "Internal error",
        "Something went wrong on our side; the request id identifies it in our logs",
        request=request,
    )


exception_handlers: ExceptionHandlersMap = {
    Problem: _problem_handler,
    HTTPException: _http_handler,
    IntegrityError: _integrity_handler,
    Exception: _unexpected_handler,
}

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "Conflict",
    "Forbidden",
    "InvalidInput",
    "MediaType",
    "NotFound",
    "Problem",
    "TooManyRequests",
    "Unauthenticated",
    "exception_handlers",
    "problem_response",
]

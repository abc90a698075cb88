"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from backend.lib.problems import problem_response


@get("/healthz", access="public", operation_id="healthz", tags=["operations"], include_in_schema=True)
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@get("/readyz", access="public", operation_id="readyz", tags=["operations"])
async def readyz(request: Request[Any, Any, Any]) -> Response[Any]:
    """PostgreSQL and Redis are reachable: the process can serve traffic."""
    failures: list[dict[str, str]] = []
    try:
        async with request.app.state.sessionmaker() as session:
            await session.execute(text("SELECT 1"))
    except Exception as exc:
        failures.append({"field": "postgresql", "message": type(exc).__name__})
    try:
        await request.app.state.redis.ping()
    except Exception as exc:
        failures.append({"field": "redis", "message": type(exc).__name__})
    if failures:
        return problem_response(
            HTTP_503_SERVICE_UNAVAILABLE,
            "not-ready",
            "Not ready",
            "A dependency is unreachable",
            request=request,
            errors=failures,
        )
    return Response({"status": "ready", "postgresql": "ok", "redis": "ok"})


@get("/metrics", access="public", operation_id="metrics", tags=["operations"], media_type=CONTENT_TYPE_LATEST)
async def metrics() -> Response[bytes]:
    """Prometheus metrics of this process."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

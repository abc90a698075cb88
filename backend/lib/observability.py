"""Structured JSON logs with a request id, Prometheus metrics, and overload protection."""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid

import structlog
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from litestar.types.asgi_types import HTTPResponseBodyEvent, HTTPResponseStartEvent
from prometheus_client import Counter, Histogram

from backend.config import Settings
from backend.lib.context import client_ip_var, request_id_var

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

REQUESTS = Counter("cc_http_requests_total", "HTTP requests served", ["method", "route", "status"])
LATENCY = Histogram(
    "cc_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SHED = Counter("cc_http_requests_shed_total", "Requests refused with 429 because the process was at capacity")


def configure_logging(settings: Settings) -> None:
    """structlog for our lines and the standard library's, one JSON object per line."""
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if settings.log_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=shared))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "sqlalchemy.engine"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RequestContextMiddleware(ASGIMiddleware):
    """Gives each request an id (or keeps a sane one the client sent), logs it, and counts it."""

    scopes = (ScopeType.HTTP, ScopeType.WEBSOCKET)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        incoming = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), None)
        request_id = incoming if incoming and _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        client = scope.get("client")
        ip = client[0] if client else None
        scope.setdefault("state", {})["request_id"] = request_id
        request_id_var.set(request_id)
        client_ip_var.set(ip)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        route = getattr(scope.get("route_handler"), "paths", None)
        route_name = sorted(route)[0] if route else "unmatched"
        method = scope.get("method", "WS")
        status_holder = {"status": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        started = time.perf_counter()
        try:
            await next_app(scope, receive, send_with_id)
        finally:
            if scope["type"] == ScopeType.HTTP:
                elapsed = time.perf_counter() - started
                REQUESTS.labels(method, route_name, str(status_holder["status"])).inc()
                LATENCY.labels(method, route_name).observe(elapsed)
            structlog.contextvars.unbind_contextvars("request_id")


class OverloadMiddleware:
    """Refuses requests beyond a process's capacity with 429 and Retry-After, instead of queueing until time-out.

    A plain ASGI wrapper around the whole application, so shedding costs almost nothing.
    """

    def __init__(self, app: ASGIApp, max_inflight: int) -> None:
        self.app = app
        self.max_inflight = max_inflight
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            SHED.inc()
            body = (
                b'{"type":"https://docs.contactcenter.test/problems/overloaded","title":"Overloaded",'
                b'"status":429,"detail":"The server is at capacity; retry shortly"}'
            )
            start: HTTPResponseStartEvent = {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"retry-after", b"1"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
            await send(start)
            end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
            await send(end)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1

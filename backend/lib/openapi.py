"""Writes each route's access rule, permission and error responses into the OpenAPI document."""

from __future__ import annotations

import inspect

from litestar import Litestar
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec

from backend.lib.problems import PROBLEM_MEDIA_TYPE, ProblemDocument

_PROBLEM_STATUSES = {
    400: "Malformed request or failed validation (problem+json with field errors)",
    401: "Missing, invalid, expired or revoked credentials",
    403: "Not allowed: missing permission, suspended tenant, or second factor required",
    404: "No such object in this tenant",
    409: "Conflicts with current state (duplicate, rule such as the last owner or the seat cap)",
    413: "Request body larger than the route's limit",
    422: "A field's value is not acceptable",
    429: "Too many requests or the server is at capacity; see Retry-After",
}


def _describe(handler: HTTPRouteHandler) -> str:
    access = handler.opt.get("access", "tenant")
    if access == "tenant":
        permission = handler.opt.get("permission")
        rule = "any signed-in member" if permission == "self" else f"permission `{permission}`"
        extra = " Allowed while the tenant is suspended." if handler.opt.get("allow_suspended") else ""
        return f"**Access:** tenant credentials (bearer token or API key), {rule}.{extra}"
    return {
        "public": "**Access:** public.",
        "provider": "**Access:** provider operators only.",
        "switch": (
            "**Access:** FreeSWITCH nodes: the shared secret (`x-switch-secret` header or HTTP basic-auth "
            "password) from an address registered for a switch node."
        ),
    }.get(access, f"**Access:** {access}.")


def document_routes(app: Litestar, schema_path: str) -> None:
    """Add the access rule to each operation's description and the problem responses it can give.

    The OpenAPI document's own routes are made by Litestar; they are public.
    """
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if not isinstance(handler, HTTPRouteHandler):
                continue
            if route.path == schema_path or route.path.startswith(schema_path + "/"):
                handler.opt.setdefault("access", "public")
                continue
            rule = _describe(handler)
            base = handler.description or inspect.cleandoc(getattr(handler.fn, "__doc__", None) or "")
            if rule not in base:
                handler.description = f"{base}\n\n{rule}".strip()
            responses = dict(handler.responses or {})
            access = handler.opt.get("access", "tenant")
            for status, text in _PROBLEM_STATUSES.items():
                if access == "public" and status in {401, 403}:
                    continue
                responses.setdefault(
                    status,
                    ResponseSpec(data_container=ProblemDocument, description=text, media_type=PROBLEM_MEDIA_TYPE),
                )
            handler.responses = responses

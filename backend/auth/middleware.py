"""Authentication middleware: every route declares who may call it (`access`), and this enforces it.

`access` is one of `public`, `tenant`, `provider` or `switch`; a route that
names none is treated as `tenant` (fail closed). The cross-tenant test fails
for any route that does not name one.

Switch routes need the shared secret, either in the `x-switch-secret` header or
as the HTTP basic-auth password (mod_xml_curl's `gateway-credentials` and
mod_json_cdr's `cred` can send nothing else), and the request must come from an
address registered for a switch node (`app.state.switch_sources`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Protocol

import structlog
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from backend.auth.authenticate import Authenticator
from backend.auth.principal import Principal
from backend.lib.problems import Forbidden, Unauthenticated

ACCESS_KINDS = frozenset({"public", "tenant", "provider", "switch"})
SWITCH_SECRET_HEADER = "x-switch-secret"

log = structlog.get_logger("auth")


class SwitchSources(Protocol):
    """Knows which addresses the registered switch nodes send their requests from."""

    async def is_known(self, address: str) -> bool:
        """Whether a registered node may call from `address`."""
        ...


def _switch_secret(scope: Scope) -> str | None:
    """The secret a switch node presented: the header, or the password of HTTP basic authentication."""
    header = _header(scope, SWITCH_SECRET_HEADER.encode())
    if header is not None:
        return header
    authorization = _header(scope, b"authorization")
    if authorization is None:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, separator, password = decoded.partition(":")
    return password if separator else None


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
            return None
        if name == b"x-api-key":
            return value.decode("latin-1").strip() or None
    return None


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return value.decode("latin-1")
    return None


def _ws_ticket(scope: Scope) -> str | None:
    query = scope.get("query_string", b"").decode("latin-1")
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == "ticket" and value:
            return value
    return None


class AuthenticationMiddleware(ASGIMiddleware):
    """Puts the caller's `Principal` (or None on public routes) in `scope["user"]`."""

    scopes = (ScopeType.HTTP, ScopeType.WEBSOCKET)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        handler = scope["route_handler"]
        access = handler.opt.get("access", "tenant")
        authenticator: Authenticator = scope["litestar_app"].state.authenticator
        principal: Principal | None = None
        if access == "public":
            principal = None
        elif access == "switch":
            client = scope.get("client")
            address = str(client[0]) if client else ""
            if not authenticator.switch_secret_ok(_switch_secret(scope)):
                log.warning("switch_request_bad_secret", source=address, path=scope.get("path", ""))
                raise Unauthenticated("Unknown switch node")
            sources: SwitchSources | None = getattr(scope["litestar_app"].state, "switch_sources", None)
            if sources is None or not address or not await sources.is_known(address):
                log.warning("switch_request_unknown_source", source=address, path=scope.get("path", ""))
                raise Forbidden("Requests from this address are not from a registered switch node")
            principal = Principal(kind="switch", tenant_id=None, user_id=None)
        else:
            token = _bearer(scope)
            if token is None and scope["type"] == ScopeType.WEBSOCKET and access == "tenant":
                ticket = _ws_ticket(scope)
                if ticket is None:
                    raise Unauthenticated("A WebSocket ticket or bearer token is required")
                principal = await authenticator.redeem_ws_ticket(ticket)
            elif token is None:
                raise Unauthenticated("A bearer token or API key is required")
            elif access == "provider":
                principal = await authenticator.provider_bearer(token)
            else:
                principal = await authenticator.tenant_bearer(token)
        scope["user"] = principal
        await next_app(scope, receive, send)


def current_principal(scope: dict[str, Any]) -> Principal | None:
    """The principal the middleware authenticated, if any."""
    user = scope.get("user")
    return user if isinstance(user, Principal) else None

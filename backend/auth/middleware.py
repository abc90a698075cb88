"""Authentication middleware: every route declares who may call it (`access`), and this enforces it.

`access` is one of `public`, `tenant`, `provider` or `switch`; a route that
names none is treated as `tenant` (fail closed). The cross-tenant test fails
for any route that does not name one.
"""

from __future__ import annotations

from typing import Any

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from backend.auth.authenticate import Authenticator
from backend.auth.principal import Principal
from backend.lib.problems import Unauthenticated

ACCESS_KINDS = frozenset({"public", "tenant", "provider", "switch"})
SWITCH_SECRET_HEADER = "x-switch-secret"


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
            if not authenticator.switch_secret_ok(_header(scope, SWITCH_SECRET_HEADER.encode())):
                raise Unauthenticated("Unknown switch node")
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

"""The one guard every route passes: tenant status, pending MFA enrolment, and the route's permission."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from backend.auth.principal import Principal
from backend.lib.problems import Forbidden, Unauthenticated

ANY_MEMBER = "self"
"""A tenant route any signed-in member may call (their own profile, their own sessions)."""


async def access_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Enforce what the route declares in its `opt`: `access`, `permission`, `allow_suspended`."""
    # Async although it never awaits: Litestar runs a sync guard in its thread pool, and that hand-off cost
    # more CPU on every request than the checks themselves.
    access = handler.opt.get("access", "tenant")
    if access in {"public", "switch"}:
        return
    principal = connection.scope.get("user")
    if not isinstance(principal, Principal):
        raise Unauthenticated("Authentication required")
    if access == "provider":
        if principal.kind != "provider":
            raise Forbidden("Provider operators only")
        return
    if principal.kind not in {"user", "api_key"}:
        raise Forbidden("Tenant credentials required")
    if principal.tenant_status == "suspended" and not handler.opt.get("allow_suspended", False):
        raise Forbidden(
            "This workspace is suspended; only its status can be read",
            kind="tenant-suspended",
            title="Tenant suspended",
        )
    if principal.mfa_pending and not handler.opt.get("allow_mfa_pending", False):
        raise Forbidden(
            "Your workspace requires a second factor: enrol an authenticator app first",
            kind="mfa-enrolment-required",
            title="Second factor required",
        )
    permission = handler.opt.get("permission")
    if permission is None:
        raise Forbidden("This route declares no permission")  # fail closed on a misdeclared route
    if permission != ANY_MEMBER and not principal.can(permission):
        raise Forbidden(f"Requires permission {permission}", extra={"permission": permission})

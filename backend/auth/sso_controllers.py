"""Routes of single sign-on: the tenant's IdP settings, and the browser's round trip through the IdP."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, put
from litestar.di import Provide
from litestar.params import Parameter
from litestar.response import Redirect
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.principal import Principal
from backend.auth.schemas import SsoConfigIn, SsoStatus, TokenPair
from backend.auth.sso import SsoService


def provide_sso_service(request: Request[Any, Any, Any]) -> SsoService:
    """The SSO service, built once per application."""
    sso: SsoService = request.app.state.sso_service
    return sso


class SsoConfigController(Controller):
    """The tenant's OpenID Connect identity provider."""

    path = "/api/v1/sso"
    tags = ["single sign-on"]
    opt = {"access": "tenant"}
    dependencies = {"sso": Provide(provide_sso_service, sync_to_thread=False)}

    @get("/", permission="sso:read", operation_id="get_sso")
    async def get_config(self, db_session: AsyncSession, sso: SsoService) -> SsoStatus:
        """Whether SSO is configured, and how (the client secret is never returned)."""
        return await sso.status(db_session)

    @put("/", permission="sso:write", operation_id="configure_sso")
    async def configure(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, sso: SsoService, data: SsoConfigIn
    ) -> SsoStatus:
        """Set the IdP: issuer URL, client id and secret, whether unknown users are created as agents."""
        return await sso.configure(db_session, request.user, data)

    @delete("/", permission="sso:write", operation_id="delete_sso")
    async def remove(self, request: Request[Principal, Any, Any], db_session: AsyncSession, sso: SsoService) -> None:
        """Turn SSO off and forget the IdP."""
        await sso.remove(db_session, request.user)


class SsoLoginController(Controller):
    """The browser's sign-in through the tenant's IdP."""

    path = "/api/v1/auth/sso"
    tags = ["single sign-on"]
    opt = {"access": "public"}
    dependencies = {"sso": Provide(provide_sso_service, sync_to_thread=False)}

    @get("/{workspace:str}/login", operation_id="sso_login", status_code=302)
    async def login(self, sso: SsoService, workspace: str = Parameter(max_length=64)) -> Redirect:
        """Redirect to the workspace's IdP (authorization code flow with PKCE, state and nonce)."""
        return Redirect(await sso.begin(workspace), status_code=302)

    @get("/callback", operation_id="sso_callback")
    async def callback(
        self,
        sso: SsoService,
        code: str = Parameter(min_length=1, max_length=2000),
        oauth_state: str = Parameter(query="state", min_length=1, max_length=200),
    ) -> TokenPair:
        """The IdP sends the browser back here; answers our own tokens."""
        return (await sso.complete(code, oauth_state)).tokens

"""Routes of the auth domain: sign-in, sessions, passwords, TOTP, API keys, WebSocket tickets."""

from __future__ import annotations

import uuid
from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.di import Provide
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.principal import Principal
from backend.auth.schemas import (
    AcceptInvite,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    LoginRequest,
    MeOut,
    PasswordChange,
    PasswordResetConfirm,
    PasswordResetRequest,
    ProviderLoginRequest,
    RefreshRequest,
    TokenPair,
    TokenRequest,
    TotpConfirm,
    TotpDisable,
    TotpEnrolment,
    WsTicket,
)
from backend.auth.service import AuthService
from backend.db.session import after_commit
from backend.lib.pagination import Page, PageRequest
from backend.tenants import service as tenants


def provide_auth_service(request: Request[Any, Any, Any]) -> AuthService:
    """The auth service, built once per application."""
    service: AuthService = request.app.state.auth_service
    return service


def client_address(request: Request[Any, Any, Any]) -> str:
    """The caller's address as the throttles see it."""
    return request.client.host if request.client else "unknown"


SELF = {"access": "tenant", "permission": "self"}


class AuthController(Controller):
    """Sign-in and session management for tenant users."""

    path = "/api/v1/auth"
    tags = ["auth"]
    dependencies = {"auth": Provide(provide_auth_service, sync_to_thread=False)}

    @post("/login", access="public", operation_id="login", status_code=200)
    async def login(self, request: Request[Any, Any, Any], data: LoginRequest, auth: AuthService) -> TokenPair:
        """Sign in with workspace, e-mail, password and (when enrolled) a TOTP code."""
        return (await auth.login(data, client_address(request))).tokens

    @post("/refresh", access="public", operation_id="refresh", status_code=200)
    async def refresh(self, data: RefreshRequest, auth: AuthService) -> TokenPair:
        """Exchange a refresh token for new tokens; the old refresh token dies."""
        return await auth.refresh(data.refresh_token)

    @post(
        "/logout",
        opt={**SELF, "allow_suspended": True, "allow_mfa_pending": True},
        operation_id="logout",
        status_code=HTTP_204_NO_CONTENT,
    )
    async def logout(self, request: Request[Principal, Any, Any], auth: AuthService) -> None:
        """End this session everywhere: refresh and access tokens stop working now."""
        await auth.logout(request.user)

    @get("/me", opt={**SELF, "allow_suspended": True, "allow_mfa_pending": True}, operation_id="me")
    async def me(self, request: Request[Principal, Any, Any], auth: AuthService) -> MeOut:
        """Who the caller is and what they may do."""
        return await auth.me(request.user)

    @post("/verify-email", access="public", operation_id="verify_email", status_code=HTTP_204_NO_CONTENT)
    async def verify_email(self, data: TokenRequest, db_session: AsyncSession) -> None:
        """Confirm an e-mail address with the mailed token."""
        await tenants.verify_email(db_session, data.token)

    @post("/accept-invite", access="public", operation_id="accept_invite", status_code=200)
    async def accept_invite(self, data: AcceptInvite, auth: AuthService) -> TokenPair:
        """Accept an invitation by choosing a password; signs the new user in."""
        async with auth.sessionmaker() as session, session.begin():
            tenant_id, user_id = await tenants.accept_invite(session, data.token, data.password, auth.settings)
        return (await auth.sign_in_user(tenant_id, user_id, "invite")).tokens

    @post(
        "/password-reset",
        access="public",
        operation_id="request_password_reset",
        status_code=HTTP_202_ACCEPTED,
    )
    async def request_password_reset(self, data: PasswordResetRequest, auth: AuthService) -> dict[str, str]:
        """E-mail a reset link if the account exists; answers the same whether it does or not."""
        await auth.request_password_reset(data.workspace, data.email)
        return {"status": "If the account exists, a reset link is on its way"}

    @post(
        "/password-reset/confirm",
        access="public",
        operation_id="confirm_password_reset",
        status_code=HTTP_204_NO_CONTENT,
    )
    async def confirm_password_reset(self, data: PasswordResetConfirm, auth: AuthService) -> None:
        """Choose a new password with the mailed token; all sessions and keys of the user end."""
        await auth.confirm_password_reset(data.token, data.password)

    @post("/password", opt=SELF, operation_id="change_password", status_code=200)
    async def change_password(
        self, request: Request[Principal, Any, Any], data: PasswordChange, auth: AuthService
    ) -> TokenPair:
        """Change one's own password; other sessions end."""
        return (await auth.change_password(request.user, data.current_password, data.new_password)).tokens

    @post("/totp", opt={**SELF, "allow_mfa_pending": True}, operation_id="totp_enrol", status_code=200)
    async def totp_enrol(self, request: Request[Principal, Any, Any], auth: AuthService) -> TotpEnrolment:
        """Begin enrolling an authenticator app."""
        return await auth.totp_enrol(request.user)

    @post("/totp/confirm", opt={**SELF, "allow_mfa_pending": True}, operation_id="totp_confirm", status_code=200)
    async def totp_confirm(
        self, request: Request[Principal, Any, Any], data: TotpConfirm, auth: AuthService
    ) -> TokenPair:
        """Finish enrolment with a first code; returns tokens with full rights."""
        return (await auth.totp_confirm(request.user, data.code)).tokens

    @post("/totp/disable", opt=SELF, operation_id="totp_disable", status_code=HTTP_204_NO_CONTENT)
    async def totp_disable(self, request: Request[Principal, Any, Any], data: TotpDisable, auth: AuthService) -> None:
        """Remove the second factor (password and a current code required)."""
        await auth.totp_disable(request.user, data.password, data.code)

    @post("/ws-ticket", opt=SELF, operation_id="ws_ticket", status_code=200)
    async def ws_ticket(self, request: Request[Principal, Any, Any], auth: AuthService) -> WsTicket:
        """A single-use ticket to open the agent WebSocket (`?ticket=`)."""
        ticket = await auth.authenticator.issue_ws_ticket(request.user)
        return WsTicket(ticket, auth.settings.ws_ticket_ttl_seconds)


class ApiKeyController(Controller):
    """Scoped API keys for machine clients."""

    path = "/api/v1/api-keys"
    tags = ["api keys"]
    opt = {"access": "tenant"}
    dependencies = {"auth": Provide(provide_auth_service, sync_to_thread=False)}

    @get("/", permission="api_keys:read", operation_id="list_api_keys")
    async def list_api_keys(self, db_session: AsyncSession, auth: AuthService, page: PageRequest) -> Page[ApiKeyOut]:
        """The tenant's API keys, without secrets."""
        items, cursor = await auth.list_api_keys(db_session, page)
        return Page(items, cursor)

    @post("/", permission="api_keys:write", operation_id="create_api_key")
    async def create_api_key(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        auth: AuthService,
        data: ApiKeyCreate,
    ) -> ApiKeyCreated:
        """Create a key; the key appears in this response only."""
        return await auth.create_api_key(db_session, request.user, data)

    @delete("/{api_key_id:uuid}", permission="api_keys:write", operation_id="revoke_api_key")
    async def revoke_api_key(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        auth: AuthService,
        api_key_id: uuid.UUID,
    ) -> None:
        """Revoke a key at once."""
        prefix = await auth.revoke_api_key(db_session, request.user, api_key_id)
        after_commit(db_session, lambda: auth.authenticator.forget_api_key(prefix))


class ProviderAuthController(Controller):
    """Sign-in of provider operators."""

    path = "/api/v1/ops/auth"
    tags = ["provider operations"]
    dependencies = {"auth": Provide(provide_auth_service, sync_to_thread=False)}

    @post("/login", access="public", operation_id="ops_login", status_code=200)
    async def login(self, request: Request[Any, Any, Any], data: ProviderLoginRequest, auth: AuthService) -> TokenPair:
        """Sign in as a provider operator."""
        return await auth.provider_login(data, client_address(request))

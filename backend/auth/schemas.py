"""Request and response types of the auth domain."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec

from backend.tenants.schemas import Email, Password, Slug, Strict

Token = Annotated[str, msgspec.Meta(min_length=10, max_length=400)]
TotpCode = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{6}$")]


class LoginRequest(Strict):
    workspace: Slug
    email: Email
    password: Password
    totp_code: TotpCode | None = None


class ProviderLoginRequest(Strict):
    email: Email
    password: Password


class TokenPair(msgspec.Struct):
    """`refresh_token` rotates: each use returns a new one and the old one dies."""

    access_token: str
    token_type: str
    expires_in: int
    refresh_token: str | None = None
    mfa_enrolment_required: bool = False


class RefreshRequest(Strict):
    refresh_token: Token


class LogoutRequest(Strict):
    refresh_token: Token | None = None


class TokenRequest(Strict):
    token: Token


class PasswordResetRequest(Strict):
    workspace: Slug
    email: Email


class PasswordResetConfirm(Strict):
    token: Token
    password: Password


class AcceptInvite(Strict):
    token: Token
    password: Password


class PasswordChange(Strict):
    current_password: Password
    new_password: Password


class TotpEnrolment(msgspec.Struct):
    secret: str
    otpauth_uri: str


class TotpConfirm(Strict):
    code: TotpCode


class TotpDisable(Strict):
    password: Password
    code: TotpCode


class MeOut(msgspec.Struct):
    user_id: uuid.UUID
    tenant_id: uuid.UUID
    email: str
    name: str
    role: str
    permissions: list[str]
    tenant_status: str
    totp_enabled: bool
    mfa_pending: bool


class ApiKeyCreate(Strict):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=120)]
    scopes: Annotated[
        list[Annotated[str, msgspec.Meta(min_length=3, max_length=60)]],
        msgspec.Meta(min_length=1, max_length=100),
    ]
    expires_in_days: Annotated[int, msgspec.Meta(ge=1, le=730)] | None = None


class ApiKeyOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    prefix: str
    scopes: list[str]
    created_by: uuid.UUID
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(msgspec.Struct):
    """The key itself appears here once and never again."""

    api_key: ApiKeyOut
    key: str


class WsTicket(msgspec.Struct):
    ticket: str
    expires_in: int


class SsoConfigIn(Strict):
    issuer: Annotated[str, msgspec.Meta(min_length=8, max_length=500)]
    client_id: Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
    client_secret: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
    enabled: bool = True
    auto_provision: bool = False


class SsoConfigOut(msgspec.Struct):
    """The client secret is write-only."""

    issuer: str
    client_id: str
    enabled: bool
    auto_provision: bool
    updated_at: datetime


class SsoStatus(msgspec.Struct):
    configured: bool
    config: SsoConfigOut | None

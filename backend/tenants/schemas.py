"""Request and response types of the tenants domain."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
ShortName = Annotated[str, msgspec.Meta(min_length=1, max_length=120)]
Email = Annotated[str, msgspec.Meta(min_length=3, max_length=254)]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
Slug = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
TimeZone = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
PermissionName = Annotated[str, msgspec.Meta(min_length=3, max_length=60)]


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    """A request body: unknown fields are an error, not silently ignored."""


class SignupRequest(Strict):
    company_name: Name
    slug: Slug
    admin_email: Email
    admin_name: Name
    password: Password
    time_zone: TimeZone
    plan: Annotated[str, msgspec.Meta(min_length=1, max_length=40)] = "trial"


class PlanOut(msgspec.Struct):
    id: uuid.UUID
    code: str
    name: str
    seat_cap: int
    features: list[str]
    public: bool
    outbound_call_cap: int | None = None
    """Concurrent outbound calls per tenant; null: the provider's default setting."""


class PlanCreate(Strict):
    code: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{1,38}$")]
    name: ShortName
    seat_cap: Annotated[int, msgspec.Meta(ge=0, le=100_000)]
    features: list[Annotated[str, msgspec.Meta(min_length=1, max_length=60)]] = []
    public: bool = True
    outbound_call_cap: Annotated[int, msgspec.Meta(ge=0, le=100_000)] | None = None


class TenantOut(msgspec.Struct):
    id: uuid.UUID
    slug: str
    name: str
    status: str
    plan: str
    seat_cap: int
    time_zone: str
    sip_domain: str
    require_mfa: bool
    created_at: datetime


class TenantUpdate(Strict):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    time_zone: TimeZone | msgspec.UnsetType = msgspec.UNSET
    require_mfa: bool | msgspec.UnsetType = msgspec.UNSET


class SignupOut(msgspec.Struct):
    tenant: TenantOut
    user_id: uuid.UUID
    email_verification_sent: bool


class StatusChange(Strict):
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


class UserOut(msgspec.Struct):
    id: uuid.UUID
    email: str
    name: str
    status: str
    role_id: uuid.UUID
    role: str
    team_ids: list[uuid.UUID]
    email_verified: bool
    totp_enabled: bool
    has_seat: bool
    created_at: datetime


class InviteRequest(Strict):
    email: Email
    name: Name
    role_id: uuid.UUID
    team_ids: list[uuid.UUID] = []


class UserUpdate(Strict):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    role_id: uuid.UUID | msgspec.UnsetType = msgspec.UNSET


class RoleOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    description: str
    builtin: bool
    permissions: list[str]


class RoleCreate(Strict):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=60)]
    permissions: Annotated[list[PermissionName], msgspec.Meta(max_length=200)]
    description: Annotated[str, msgspec.Meta(max_length=300)] = ""


class RoleUpdate(Strict):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=60)] | msgspec.UnsetType = msgspec.UNSET
    permissions: Annotated[list[PermissionName], msgspec.Meta(max_length=200)] | msgspec.UnsetType = msgspec.UNSET
    description: Annotated[str, msgspec.Meta(max_length=300)] | msgspec.UnsetType = msgspec.UNSET


class PermissionOut(msgspec.Struct):
    name: str
    description: str


class TeamOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    description: str
    member_ids: list[uuid.UUID]
    created_at: datetime


class TeamCreate(Strict):
    name: ShortName
    description: Annotated[str, msgspec.Meta(max_length=300)] = ""


class TeamUpdate(Strict):
    name: ShortName | msgspec.UnsetType = msgspec.UNSET
    description: Annotated[str, msgspec.Meta(max_length=300)] | msgspec.UnsetType = msgspec.UNSET


class SeatOut(msgspec.Struct):
    id: uuid.UUID
    user_id: uuid.UUID
    sip_username: str
    sip_domain: str
    created_at: datetime
    credentials_rotated_at: datetime | None


class SeatCreate(Strict):
    user_id: uuid.UUID


class SeatCredentials(msgspec.Struct):
    """Shown once: the SIP password is not stored, only its digest."""

    seat: SeatOut
    sip_password: str
    sip_uri: str


class AuditOut(msgspec.Struct):
    id: uuid.UUID
    at: datetime
    actor_type: str
    actor_id: uuid.UUID | None
    action: str
    target_type: str
    target_id: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    ip: str | None
    request_id: str | None


class ProviderAuditOut(msgspec.Struct):
    id: uuid.UUID
    at: datetime
    provider_user_id: uuid.UUID | None
    action: str
    target_tenant_id: uuid.UUID | None
    detail: dict[str, Any]

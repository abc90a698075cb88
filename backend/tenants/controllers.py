"""Routes of the tenants domain: signup, the tenant, users, roles, teams, seats, audit, provider operations."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from litestar import Controller, Request, delete, get, patch, post, put
from litestar.params import Parameter
from litestar.status_codes import HTTP_201_CREATED
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.credentials import RevokedCredentials
from backend.auth.principal import Principal
from backend.auth.service import AuthService
from backend.config import Settings
from backend.db.session import after_commit
from backend.lib.pagination import Page, PageRequest
from backend.tenants import service
from backend.tenants.permissions import PERMISSIONS
from backend.tenants.schemas import (
    AuditOut,
    InviteRequest,
    PermissionOut,
    PlanCreate,
    PlanOut,
    ProviderAuditOut,
    RoleCreate,
    RoleOut,
    RoleUpdate,
    SeatCreate,
    SeatCredentials,
    SeatOut,
    SignupOut,
    SignupRequest,
    StatusChange,
    TeamCreate,
    TeamOut,
    TeamUpdate,
    TenantOut,
    TenantUpdate,
    UserOut,
    UserUpdate,
)

UserStatus = Literal["invited", "active", "disabled"]
TenantStatus = Literal["trial", "active", "suspended"]
Query = Parameter(default=None, max_length=200, description="Text contained in the name or e-mail")


def _announce(request: Request[Any, Any, Any], session: AsyncSession, revoked: RevokedCredentials | None) -> None:
    """Once the change commits, revoke the user's credentials in every process."""
    if revoked is not None:
        auth: AuthService = request.app.state.auth_service
        after_commit(session, lambda: auth.announce(revoked))


class SignupController(Controller):
    """Self-service signup and the plans offered there."""

    path = "/api/v1"
    tags = ["signup"]
    opt = {"access": "public"}

    @post("/signup", operation_id="signup", status_code=HTTP_201_CREATED)
    async def signup(self, db_session: AsyncSession, data: SignupRequest, settings: Settings) -> SignupOut:
        """Create a tenant with its owner and SIP domain; a verification link is e-mailed to the owner."""
        result = await service.signup(db_session, data, settings)
        return SignupOut(result.tenant, result.owner_id, email_verification_sent=True)

    @get("/plans", operation_id="list_public_plans")
    async def plans(self, db_session: AsyncSession) -> list[PlanOut]:
        """Plans that can be chosen at signup."""
        return await service.list_public_plans(db_session)


class TenantController(Controller):
    """The caller's own tenant."""

    path = "/api/v1/tenant"
    tags = ["tenant"]
    opt = {"access": "tenant"}

    @get("/", permission="self", allow_suspended=True, operation_id="get_tenant")
    async def get_tenant(self, request: Request[Principal, Any, Any], db_session: AsyncSession) -> TenantOut:
        """The tenant's settings and status (readable while suspended)."""
        assert request.user.tenant_id is not None
        return await service.get_tenant(db_session, request.user.tenant_id)

    @patch("/", permission="tenant:write", operation_id="update_tenant")
    async def update_tenant(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: TenantUpdate
    ) -> TenantOut:
        """Change the tenant's name, time zone or mandatory second factor."""
        return await service.update_tenant(db_session, request.user, data)


class UserController(Controller):
    """Users of the tenant."""

    path = "/api/v1/users"
    tags = ["users"]
    opt = {"access": "tenant"}

    @get("/", permission="users:read", operation_id="list_users")
    async def list_users(
        self,
        db_session: AsyncSession,
        page: PageRequest,
        status: UserStatus | None = None,
        role_id: uuid.UUID | None = None,
        team_id: uuid.UUID | None = None,
        q: str | None = Query,
    ) -> Page[UserOut]:
        """Users, filtered by status, role, team or text; sort by created_at, email or name."""
        items, cursor = await service.list_users(db_session, page, status=status, role_id=role_id, team_id=team_id, q=q)
        return Page(items, cursor)

    @post("/invitations", permission="users:write", operation_id="invite_user")
    async def invite(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        data: InviteRequest,
        settings: Settings,
    ) -> UserOut:
        """Invite someone by e-mail; they choose their password from the link."""
        return await service.invite_user(db_session, request.user, data, settings)

    @get("/{user_id:uuid}", permission="users:read", operation_id="get_user")
    async def get_user(self, db_session: AsyncSession, user_id: uuid.UUID) -> UserOut:
        """One user."""
        return await service.get_user(db_session, user_id)

    @patch("/{user_id:uuid}", permission="users:write", operation_id="update_user")
    async def update_user(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        user_id: uuid.UUID,
        data: UserUpdate,
    ) -> UserOut:
        """Rename a user or change their role (a role change signs them out everywhere)."""
        user, revoked = await service.update_user(db_session, request.user, user_id, data)
        _announce(request, db_session, revoked)
        return user

    @post(
        "/{user_id:uuid}/deactivate",
        permission="users:write",
        operation_id="deactivate_user",
        status_code=200,
    )
    async def deactivate(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, user_id: uuid.UUID
    ) -> UserOut:
        """Deactivate a user: every token, key and open connection of theirs is revoked."""
        user, revoked = await service.set_user_active(db_session, request.user, user_id, active=False)
        _announce(request, db_session, revoked)
        return user

    @post(
        "/{user_id:uuid}/reactivate",
        permission="users:write",
        operation_id="reactivate_user",
        status_code=200,
    )
    async def reactivate(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, user_id: uuid.UUID
    ) -> UserOut:
        """Let a deactivated user sign in again."""
        user, _ = await service.set_user_active(db_session, request.user, user_id, active=True)
        return user


class RoleController(Controller):
    """Built-in and custom roles and the permission catalogue."""

    path = "/api/v1"
    tags = ["roles"]
    opt = {"access": "tenant"}

    @get("/permissions", permission="roles:read", operation_id="list_permissions")
    async def permissions(self) -> list[PermissionOut]:
        """Every permission a role can hold."""
        return [PermissionOut(name, description) for name, description in sorted(PERMISSIONS.items())]

    @get("/roles", permission="roles:read", operation_id="list_roles")
    async def list_roles(self, db_session: AsyncSession) -> list[RoleOut]:
        """The tenant's roles."""
        return await service.list_roles(db_session)

    @post("/roles", permission="roles:write", operation_id="create_role")
    async def create_role(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: RoleCreate
    ) -> RoleOut:
        """A custom role made of named permissions."""
        return await service.create_role(db_session, request.user, data)

    @get("/roles/{role_id:uuid}", permission="roles:read", operation_id="get_role")
    async def get_role(self, db_session: AsyncSession, role_id: uuid.UUID) -> RoleOut:
        """One role."""
        return await service.get_role(db_session, role_id)

    @patch("/roles/{role_id:uuid}", permission="roles:write", operation_id="update_role")
    async def update_role(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        role_id: uuid.UUID,
        data: RoleUpdate,
    ) -> RoleOut:
        """Change a custom role; its holders' tokens are revoked if its permissions change."""
        role, revoked = await service.update_role(db_session, request.user, role_id, data)
        for credentials in revoked:
            _announce(request, db_session, credentials)
        return role

    @delete("/roles/{role_id:uuid}", permission="roles:write", operation_id="delete_role")
    async def delete_role(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, role_id: uuid.UUID
    ) -> None:
        """Delete a custom role nobody holds."""
        await service.delete_role(db_session, request.user, role_id)


class TeamController(Controller):
    """Teams (business units) and their members."""

    path = "/api/v1/teams"
    tags = ["teams"]
    opt = {"access": "tenant"}

    @get("/", permission="teams:read", operation_id="list_teams")
    async def list_teams(self, db_session: AsyncSession, page: PageRequest, q: str | None = Query) -> Page[TeamOut]:
        """Teams; sort by name or created_at."""
        items, cursor = await service.list_teams(db_session, page, q)
        return Page(items, cursor)

    @post("/", permission="teams:write", operation_id="create_team")
    async def create_team(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: TeamCreate
    ) -> TeamOut:
        """A new team."""
        return await service.create_team(db_session, request.user, data)

    @get("/{team_id:uuid}", permission="teams:read", operation_id="get_team")
    async def get_team(self, db_session: AsyncSession, team_id: uuid.UUID) -> TeamOut:
        """One team with its members."""
        return await service.get_team(db_session, team_id)

    @patch("/{team_id:uuid}", permission="teams:write", operation_id="update_team")
    async def update_team(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        team_id: uuid.UUID,
        data: TeamUpdate,
    ) -> TeamOut:
        """Rename a team."""
        return await service.update_team(db_session, request.user, team_id, data)

    @delete("/{team_id:uuid}", permission="teams:write", operation_id="delete_team")
    async def delete_team(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, team_id: uuid.UUID
    ) -> None:
        """Delete a team."""
        await service.delete_team(db_session, request.user, team_id)

    @put("/{team_id:uuid}/members/{user_id:uuid}", permission="teams:write", operation_id="add_team_member")
    async def add_member(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        team_id: uuid.UUID,
        user_id: uuid.UUID,
    ) -> TeamOut:
        """Put a user in a team."""
        return await service.set_membership(db_session, request.user, team_id, user_id, member=True)

    @delete(
        "/{team_id:uuid}/members/{user_id:uuid}",
        permission="teams:write",
        operation_id="remove_team_member",
        status_code=200,
    )
    async def remove_member(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        team_id: uuid.UUID,
        user_id: uuid.UUID,
    ) -> TeamOut:
        """Take a user out of a team."""
        return await service.set_membership(db_session, request.user, team_id, user_id, member=False)


class SeatController(Controller):
    """Seats (agent licences) and their SIP credentials."""

    path = "/api/v1/seats"
    tags = ["seats"]
    opt = {"access": "tenant"}

    @get("/", permission="seats:read", operation_id="list_seats")
    async def list_seats(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, page: PageRequest
    ) -> Page[SeatOut]:
        """Seats in use."""
        assert request.user.tenant_id is not None
        items, cursor = await service.list_seats(db_session, request.user.tenant_id, page)
        return Page(items, cursor)

    @post("/", permission="seats:write", operation_id="assign_seat")
    async def assign_seat(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: SeatCreate
    ) -> SeatCredentials:
        """Give a user a seat within the plan's cap; the SIP password appears in this response only."""
        return await service.assign_seat(db_session, request.user, data.user_id)

    @get("/{seat_id:uuid}", permission="seats:read", operation_id="get_seat")
    async def get_seat(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, seat_id: uuid.UUID
    ) -> SeatOut:
        """One seat."""
        assert request.user.tenant_id is not None
        return await service.get_seat(db_session, request.user.tenant_id, seat_id)

    @post(
        "/{seat_id:uuid}/rotate-credentials",
        permission="seats:write",
        operation_id="rotate_seat_credentials",
        status_code=200,
    )
    async def rotate(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, seat_id: uuid.UUID
    ) -> SeatCredentials:
        """A new SIP password; the old one stops working."""
        return await service.rotate_seat_credentials(db_session, request.user, seat_id)

    @delete("/{seat_id:uuid}", permission="seats:write", operation_id="release_seat")
    async def release(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, seat_id: uuid.UUID
    ) -> None:
        """Free a seat."""
        await service.release_seat(db_session, request.user, seat_id)


class AuditController(Controller):
    """The tenant's audit log."""

    path = "/api/v1/audit"
    tags = ["audit"]
    opt = {"access": "tenant"}

    @get("/", permission="audit:read", operation_id="list_audit")
    async def list_audit(
        self,
        db_session: AsyncSession,
        page: PageRequest,
        action: str | None = Parameter(default=None, max_length=80, description="Action, or its prefix (`user.`)"),
        actor_id: uuid.UUID | None = None,
        target_id: str | None = Parameter(default=None, max_length=80),
    ) -> Page[AuditOut]:
        """Entries newest first (sort `at` or `-at`)."""
        items, cursor = await service.list_audit(
            db_session, page, action=action, actor_id=actor_id, target_id=target_id
        )
        return Page(items, cursor)


class OpsController(Controller):
    """Provider operations across tenants: every action is recorded in the provider audit log."""

    path = "/api/v1/ops"
    tags = ["provider operations"]
    opt = {"access": "provider"}

    @get("/tenants", operation_id="ops_list_tenants")
    async def list_tenants(
        self,
        db_session: AsyncSession,
        page: PageRequest,
        status: TenantStatus | None = None,
        q: str | None = Query,
    ) -> Page[TenantOut]:
        """All tenants."""
        items, cursor = await service.list_tenants(db_session, page, status=status, q=q)
        return Page(items, cursor)

    @get("/tenants/{tenant_id:uuid}", operation_id="ops_get_tenant")
    async def get_tenant(self, db_session: AsyncSession, tenant_id: uuid.UUID) -> TenantOut:
        """One tenant."""
        return await service.get_tenant(db_session, tenant_id)

    @post("/tenants/{tenant_id:uuid}/suspend", operation_id="ops_suspend_tenant", status_code=200)
    async def suspend(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        tenant_id: uuid.UUID,
        data: StatusChange,
    ) -> TenantOut:
        """Suspend a tenant: its users and keys get 403 on everything but their tenant's status."""
        tenant = await service.set_tenant_status(db_session, request.user, tenant_id, "suspended", data.reason)
        auth: AuthService = request.app.state.auth_service
        after_commit(db_session, lambda: auth.authenticator.revocations.forget_tenant(tenant_id))
        return tenant

    @post("/tenants/{tenant_id:uuid}/reactivate", operation_id="ops_reactivate_tenant", status_code=200)
    async def reactivate(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        tenant_id: uuid.UUID,
        data: StatusChange,
    ) -> TenantOut:
        """Lift a suspension."""
        tenant = await service.set_tenant_status(db_session, request.user, tenant_id, "active", data.reason)
        auth: AuthService = request.app.state.auth_service
        after_commit(db_session, lambda: auth.authenticator.revocations.forget_tenant(tenant_id))
        return tenant

    @get("/plans", operation_id="ops_list_plans")
    async def list_plans(self, db_session: AsyncSession) -> list[PlanOut]:
        """Every plan."""
        return await service.list_plans(db_session)

    @post("/plans", operation_id="ops_create_plan")
    async def create_plan(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: PlanCreate
    ) -> PlanOut:
        """A new plan."""
        return await service.create_plan(db_session, request.user, data)

    @get("/audit", operation_id="ops_audit")
    async def audit(self, db_session: AsyncSession, page: PageRequest) -> Page[ProviderAuditOut]:
        """What provider operators did."""
        items, cursor = await service.list_provider_audit(db_session, page)
        return Page(items, cursor)

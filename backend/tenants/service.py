"""The tenants domain's logic: signup, tenant settings, users, roles, teams, seats, provider operations.

Services run inside the caller's transaction, already scoped to the tenant by
row-level security; they raise `Problem`s for the client and write the audit
log in the same transaction as the change.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth import onetime
from backend.auth.credentials import RevokedCredentials, revoke_user_credentials
from backend.auth.passwords import check_password_policy, hash_password
from backend.auth.principal import Principal
from backend.config import Settings
from backend.db.base import utcnow
from backend.db.engine import tenant_transaction
from backend.db.tenancy import set_tenant
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import Conflict, Forbidden, InvalidInput, NotFound
from backend.lib.validation import clean_email, clean_slug, clean_text, clean_time_zone
from backend.tenants import audit
from backend.tenants.mail import queue_mail
from backend.tenants.models import (
    AuditEntry,
    OutboxMail,
    Plan,
    ProviderAuditEntry,
    Role,
    Seat,
    Team,
    TeamMember,
    Tenant,
    User,
)
from backend.tenants.permissions import BUILTIN_ROLES, OWNER_ROLE, PERMISSIONS
from backend.tenants.schemas import (
    AuditOut,
    InviteRequest,
    PlanCreate,
    PlanOut,
    ProviderAuditOut,
    RoleCreate,
    RoleOut,
    RoleUpdate,
    SeatCredentials,
    SeatOut,
    SignupRequest,
    TeamCreate,
    TeamOut,
    TeamUpdate,
    TenantOut,
    TenantUpdate,
    UserOut,
    UserUpdate,
)

SIP_PASSWORD_LENGTH = 20
FIRST_EXTENSION = 1000


@dataclass(frozen=True, slots=True)
class SignupResult:
    """What a signup made, and the verification link's token (mailed, never returned)."""

    tenant: TenantOut
    owner_id: uuid.UUID


def tenant_out(tenant: Tenant, plan: Plan) -> TenantOut:
    """The API's view of a tenant."""
    return TenantOut(
        id=tenant.id,
        slug=tenant.slug,
        name=tenant.name,
        status=tenant.status,
        plan=plan.code,
        seat_cap=plan.seat_cap,
        time_zone=tenant.time_zone,
        sip_domain=tenant.sip_domain,
        require_mfa=tenant.require_mfa,
        created_at=tenant.created_at,
    )


def plan_out(plan: Plan) -> PlanOut:
    """The API's view of a plan."""
    return PlanOut(
        plan.id, plan.code, plan.name, plan.seat_cap, list(plan.features), plan.public, plan.outbound_call_cap
    )


async def create_builtin_roles(session: AsyncSession, tenant_id: uuid.UUID) -> dict[str, Role]:
    """The four built-in roles of a new tenant."""
    roles = {
        name: Role(tenant_id=tenant_id, name=name, description=description, builtin=True, permissions=sorted(perms))
        for name, (description, perms) in BUILTIN_ROLES.items()
    }
    session.add_all(roles.values())
    await session.flush()
    return roles


async def signup(session: AsyncSession, data: SignupRequest, settings: Settings) -> SignupResult:
    """Create a tenant, its built-in roles and its owner, in the caller's single transaction."""
    slug = clean_slug("slug", data.slug.strip().lower())
    company = clean_text("company_name", data.company_name, max_length=200)
    admin_name = clean_text("admin_name", data.admin_name, max_length=200)
    email = clean_email("admin_email", data.admin_email)
    time_zone = clean_time_zone("time_zone", data.time_zone)
    check_password_policy(data.password, settings, context=(email.split("@")[0], slug, company, admin_name))
    plan = await session.scalar(select(Plan).where(Plan.code == data.plan, Plan.public.is_(True)))
    if plan is None:
        raise InvalidInput.field("plan", "is not a plan offered at signup")
    if await session.scalar(select(Tenant.id).where(Tenant.slug == slug)) is not None:
        raise Conflict("That workspace name is taken", errors=[{"field": "slug", "message": "is taken"}])
    tenant = Tenant(
        slug=slug,
        name=company,
        status="trial",
        plan_id=plan.id,
        time_zone=time_zone,
        sip_domain=f"{slug}.{settings.provider_sip_domain}",
    )
    session.add(tenant)
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent signup took the slug between our check and insert
        raise Conflict("That workspace name is taken", errors=[{"field": "slug", "message": "is taken"}]) from exc
    await set_tenant(session, tenant.id)
    roles = await create_builtin_roles(session, tenant.id)
    owner = User(
        tenant_id=tenant.id,
        email=email,
        name=admin_name,
        status="active",
        role_id=roles[OWNER_ROLE].id,
        password_hash=hash_password(data.password),
        password_changed_at=utcnow(),
    )
    session.add(owner)
    await session.flush()
    token = await onetime.issue(
        session,
        tenant_id=tenant.id,
        user_id=owner.id,
        purpose="verify_email",
        ttl_seconds=settings.email_token_ttl_seconds,
    )
    await queue_mail(
        session,
        tenant_id=tenant.id,
        to=email,
        kind="verify_email",
        subject=f"Confirm your e-mail for {company}",
        body=f"Confirm your address: {settings.public_base_url}/verify-email?token={token}",
    )
    await audit.record(
        session,
        tenant_id=tenant.id,
        actor_type="user",
        actor_id=owner.id,
        action="tenant.signup",
        target_type="tenant",
        target_id=tenant.id,
        after={"slug": slug, "name": company, "plan": plan.code, "time_zone": time_zone, "owner": email},
    )
    return SignupResult(tenant_out(tenant, plan), owner.id)


async def list_public_plans(session: AsyncSession) -> list[PlanOut]:
    """Plans offered at signup."""
    plans = (await session.scalars(select(Plan).where(Plan.public.is_(True)).order_by(Plan.seat_cap))).all()
    return [plan_out(p) for p in plans]


# --- the tenant's own settings -------------------------------------------------------------------


async def outbound_call_cap(session: AsyncSession, tenant_id: uuid.UUID) -> int | None:
    """The concurrent outbound calls the tenant's plan allows (None: the plan names no cap of its own)."""
    cap: int | None = await session.scalar(
        select(Plan.outbound_call_cap).join(Tenant, Tenant.plan_id == Plan.id).where(Tenant.id == tenant_id)
    )
    return cap


async def get_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> TenantOut:
    """The caller's tenant."""
    row = (
        await session.execute(select(Tenant, Plan).join(Plan, Plan.id == Tenant.plan_id).where(Tenant.id == tenant_id))
    ).first()
    if row is None:
        raise NotFound("No such tenant")
    return tenant_out(row[0], row[1])


async def update_tenant(session: AsyncSession, principal: Principal, data: TenantUpdate) -> TenantOut:
    """Change the tenant's name, time zone or whether TOTP is mandatory."""
    assert principal.tenant_id is not None
    tenant = await session.scalar(select(Tenant).where(Tenant.id == principal.tenant_id).with_for_update())
    if tenant is None:
        raise NotFound("No such tenant")
    before = {"name": tenant.name, "time_zone": tenant.time_zone, "require_mfa": tenant.require_mfa}
    if data.name is not msgspec.UNSET:
        tenant.name = clean_text("name", data.name, max_length=200)
    if data.time_zone is not msgspec.UNSET:
        tenant.time_zone = clean_time_zone("time_zone", data.time_zone)
    if data.require_mfa is not msgspec.UNSET:
        tenant.require_mfa = data.require_mfa
    after = {"name": tenant.name, "time_zone": tenant.time_zone, "require_mfa": tenant.require_mfa}
    await audit.record_by(
        session,
        principal,
        action="tenant.update",
        target_type="tenant",
        target_id=tenant.id,
        before=before,
        after=after,
    )
    return await get_tenant(session, tenant.id)


# --- users -----------------------------------------------------------------------------------------


async def _user(session: AsyncSession, user_id: uuid.UUID, *, lock: bool = False) -> User:
    statement = select(User).where(User.id == user_id)
    if lock:
        statement = statement.with_for_update()
    user = await session.scalar(statement)
    if user is None:
        raise NotFound("No such user")
    return user


async def _role(session: AsyncSession, role_id: uuid.UUID, field: str = "role_id") -> Role:
    role = await session.scalar(select(Role).where(Role.id == role_id))
    if role is None:
        raise InvalidInput.field(field, "is not a role of this tenant")
    return role


async def _users_out(session: AsyncSession, users: Sequence[User]) -> list[UserOut]:
    if not users:
        return []
    ids = [u.id for u in users]
    roles = {r.id: r.name for r in (await session.scalars(select(Role))).all()}
    teams: dict[uuid.UUID, list[uuid.UUID]] = {}
    for user_id, team_id in (
        await session.execute(select(TeamMember.user_id, TeamMember.team_id).where(TeamMember.user_id.in_(ids)))
    ).all():
        teams.setdefault(user_id, []).append(team_id)
    seated = set((await session.scalars(select(Seat.user_id).where(Seat.user_id.in_(ids)))).all())
    return [
        UserOut(
            id=u.id,
            email=u.email,
            name=u.name,
            status=u.status,
            role_id=u.role_id,
            role=roles.get(u.role_id, "?"),
            team_ids=sorted(teams.get(u.id, [])),
            email_verified=u.email_verified_at is not None,
            totp_enabled=u.totp_enabled,
            has_seat=u.id in seated,
            created_at=u.created_at,
        )
        for u in users
    ]


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> UserOut:
    """One user of the tenant."""
    return (await _users_out(session, [await _user(session, user_id)]))[0]


async def list_users(
    session: AsyncSession,
    page: PageRequest,
    *,
    status: str | None = None,
    role_id: uuid.UUID | None = None,
    team_id: uuid.UUID | None = None,
    q: str | None = None,
) -> tuple[list[UserOut], str | None]:
    """Users, filtered and cursor-paginated."""
    statement = select(User)
    if status:
        statement = statement.where(User.status == status)
    if role_id:
        statement = statement.where(User.role_id == role_id)
    if team_id:
        statement = statement.where(User.id.in_(select(TeamMember.user_id).where(TeamMember.team_id == team_id)))
    if q:
        pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        statement = statement.where((User.email.ilike(pattern)) | (User.name.ilike(pattern)))
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"created_at": User.created_at, "email": User.email, "name": User.name},
        default_sort="created_at",
        id_column=User.id,
    )
    return await _users_out(session, rows), cursor


async def _check_can_grant(session: AsyncSession, principal: Principal, role: Role) -> None:
    if role.name == OWNER_ROLE and role.builtin and not principal.can("owners:manage"):
        raise Forbidden("Only owners may make owners")
    missing = set(role.permissions) - principal.permissions
    if missing:
        raise Forbidden("You cannot grant a role with permissions you do not hold", extra={"missing": sorted(missing)})


async def invite_user(session: AsyncSession, principal: Principal, data: InviteRequest, settings: Settings) -> UserOut:
    """Create an invited user and e-mail them a link to set their password."""
    assert principal.tenant_id is not None
    email = clean_email("email", data.email)
    name = clean_text("name", data.name, max_length=200)
    role = await _role(session, data.role_id)
    await _check_can_grant(session, principal, role)
    if await session.scalar(select(User.id).where(User.email == email)) is not None:
        raise Conflict("A user with that e-mail exists", errors=[{"field": "email", "message": "already used"}])
    user = User(tenant_id=principal.tenant_id, email=email, name=name, status="invited", role_id=role.id)
    session.add(user)
    await session.flush()
    for team_id in dict.fromkeys(data.team_ids):
        if await session.scalar(select(Team.id).where(Team.id == team_id)) is None:
            raise InvalidInput.field("team_ids", "names a team that is not of this tenant")
        session.add(TeamMember(tenant_id=principal.tenant_id, team_id=team_id, user_id=user.id))
    token = await onetime.issue(
        session,
        tenant_id=principal.tenant_id,
        user_id=user.id,
        purpose="invite",
        ttl_seconds=settings.email_token_ttl_seconds,
    )
    await queue_mail(
        session,
        tenant_id=principal.tenant_id,
        to=email,
        kind="invite",
        subject="You are invited to a contact-center workspace",
        body=f"Accept the invitation: {settings.public_base_url}/accept-invite?token={token}",
    )
    await audit.record_by(
        session,
        principal,
        action="user.invite",
        target_type="user",
        target_id=user.id,
        after={"email": email, "name": name, "role": role.name, "team_ids": [str(t) for t in data.team_ids]},
    )
    await session.flush()
    return await get_user(session, user.id)


async def accept_invite(
    session: AsyncSession, token: str, password: str, settings: Settings
) -> tuple[uuid.UUID, uuid.UUID]:
    """Set the invited user's password and activate them; returns (tenant id, user id)."""
    tenant_id, user_id = await onetime.redeem(session, token, "invite")
    user = await _user(session, user_id, lock=True)
    if user.status != "invited":
        raise InvalidInput.field("token", "is invalid, used or expired")
    check_password_policy(password, settings, context=(user.email.split("@")[0], user.name))
    user.password_hash = hash_password(password)
    user.password_changed_at = utcnow()
    user.status = "active"
    user.email_verified_at = utcnow()
    await audit.record(
        session,
        tenant_id=tenant_id,
        actor_type="user",
        actor_id=user.id,
        action="user.accept_invite",
        target_type="user",
        target_id=user.id,
        after={"status": "active"},
    )
    return tenant_id, user.id


async def verify_email(session: AsyncSession, token: str) -> None:
    """Mark the address of the token's user as verified."""
    tenant_id, user_id = await onetime.redeem(session, token, "verify_email")
    user = await _user(session, user_id, lock=True)
    user.email_verified_at = utcnow()
    await audit.record(
        session,
        tenant_id=tenant_id,
        actor_type="user",
        actor_id=user.id,
        action="user.verify_email",
        target_type="user",
        target_id=user.id,
    )


async def _serialise_user_changes(session: AsyncSession, tenant_id: uuid.UUID) -> None:
    """Role and status changes of one tenant's users run one at a time.

    A change locks its user's row, and a change to an owner then locks every owner's row to count them:
    two such changes would each hold one owner and wait for the other's. Taking this lock first orders them.
    """
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended('user-roles:' || :t, 0))"), {"t": str(tenant_id)}
    )


async def _active_owner_ids(session: AsyncSession) -> list[uuid.UUID]:
    owner_role = select(Role.id).where(Role.name == OWNER_ROLE, Role.builtin.is_(True)).scalar_subquery()
    # FOR UPDATE serialises concurrent demotions: the second waits, then re-checks the rows.
    return list(
        (
            await session.scalars(
                select(User.id).where(User.role_id == owner_role, User.status == "active").with_for_update()
            )
        ).all()
    )


async def _is_owner(session: AsyncSession, user: User) -> bool:
    role = await session.get(Role, (user.tenant_id, user.role_id))
    return role is not None and role.builtin and role.name == OWNER_ROLE


async def update_user(
    session: AsyncSession, principal: Principal, user_id: uuid.UUID, data: UserUpdate
) -> tuple[UserOut, RevokedCredentials | None]:
    """Rename a user or change their role; a role change revokes all their tokens and keys."""
    assert principal.tenant_id is not None
    if data.role_id is not msgspec.UNSET:
        await _serialise_user_changes(session, principal.tenant_id)
    user = await _user(session, user_id, lock=True)
    before = {"name": user.name, "role_id": str(user.role_id)}
    revoked: RevokedCredentials | None = None
    if data.name is not msgspec.UNSET:
        user.name = clean_text("name", data.name, max_length=200)
    if data.role_id is not msgspec.UNSET and data.role_id != user.role_id:
        new_role = await _role(session, data.role_id)
        await _check_can_grant(session, principal, new_role)
        if await _is_owner(session, user):
            if not principal.can("owners:manage"):
                raise Forbidden("Only owners may change an owner's role")
            owners = await _active_owner_ids(session)
            if owners == [user.id] or (user.id in owners and len(owners) == 1):
                raise Conflict("The last owner cannot be demoted; make another user owner first")
        user.role_id = new_role.id
        user.tokens_revoked_at = utcnow()
        revoked = await revoke_user_credentials(session, principal.tenant_id, user.id)
    after = {"name": user.name, "role_id": str(user.role_id)}
    await audit.record_by(
        session,
        principal,
        action="user.role_change" if revoked else "user.update",
        target_type="user",
        target_id=user.id,
        before=before,
        after=after,
    )
    await session.flush()
    return await get_user(session, user.id), revoked


async def set_user_active(
    session: AsyncSession, principal: Principal, user_id: uuid.UUID, active: bool
) -> tuple[UserOut, RevokedCredentials | None]:
    """Deactivate (revoking every token and key) or reactivate a user. The last owner stays."""
    assert principal.tenant_id is not None
    await _serialise_user_changes(session, principal.tenant_id)
    user = await _user(session, user_id, lock=True)
    before = {"status": user.status}
    revoked: RevokedCredentials | None = None
    if not active:
        if user.status == "disabled":
            return await get_user(session, user.id), None
        if await _is_owner(session, user):
            if not principal.can("owners:manage"):
                raise Forbidden("Only owners may deactivate an owner")
            if await _active_owner_ids(session) == [user.id]:
                raise Conflict("The last owner cannot be deactivated")
        user.status = "disabled"
        user.tokens_revoked_at = utcnow()
        revoked = await revoke_user_credentials(session, principal.tenant_id, user.id)
    else:
        if user.status != "disabled":
            return await get_user(session, user.id), None
        user.status = "active" if user.password_hash else "invited"
    await audit.record_by(
        session,
        principal,
        action="user.deactivate" if not active else "user.reactivate",
        target_type="user",
        target_id=user.id,
        before=before,
        after={"status": user.status},
    )
    await session.flush()
    return await get_user(session, user.id), revoked


async def user_permissions(session: AsyncSession, user_id: uuid.UUID) -> tuple[User, frozenset[str]] | None:
    """A user and the permissions of their role (None if unknown)."""
    row = (
        await session.execute(
            select(User, Role.permissions).join(Role, Role.id == User.role_id).where(User.id == user_id)
        )
    ).first()
    if row is None:
        return None
    return row[0], frozenset(row[1])


async def find_user_by_email(session: AsyncSession, email: str) -> User | None:
    """A user of the current tenant by e-mail (case-insensitive)."""
    return await session.scalar(select(User).where(User.email == email.strip()))


async def find_tenant_by_slug(session: AsyncSession, slug: str) -> Tenant | None:
    """The global workspace lookup used at sign-in, before a tenant context exists."""
    return await session.scalar(select(Tenant).where(Tenant.slug == slug.strip().lower()))


async def find_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant | None:
    """A tenant by id (global table)."""
    return await session.get(Tenant, tenant_id)


async def create_user(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    email: str,
    name: str,
    role_name: str,
    password: str | None,
    verified: bool,
) -> User:
    """Create an active user directly (demo data, SSO auto-provisioning). No e-mail is sent."""
    role = await session.scalar(select(Role).where(Role.name == role_name))
    if role is None:
        raise InvalidInput.field("role", f"{role_name} is not a role of this tenant")
    user = User(
        tenant_id=tenant_id,
        email=clean_email("email", email),
        name=clean_text("name", name, max_length=200),
        status="active",
        role_id=role.id,
        password_hash=hash_password(password) if password else None,
        email_verified_at=utcnow() if verified else None,
        password_changed_at=utcnow() if password else None,
    )
    session.add(user)
    await session.flush()
    return user


# --- roles -----------------------------------------------------------------------------------------


def _role_out(role: Role) -> RoleOut:
    return RoleOut(role.id, role.name, role.description, role.builtin, sorted(role.permissions))


def _check_permissions(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in PERMISSIONS]
    if unknown:
        raise InvalidInput(
            "Unknown permissions",
            errors=[{"field": "permissions", "message": f"unknown permission {n!r}"} for n in unknown],
        )
    return sorted(set(names))


async def list_roles(session: AsyncSession) -> list[RoleOut]:
    """Every role of the tenant, built-in first."""
    roles = (await session.scalars(select(Role).order_by(Role.builtin.desc(), Role.name))).all()
    return [_role_out(r) for r in roles]


async def get_role(session: AsyncSession, role_id: uuid.UUID) -> RoleOut:
    """One role."""
    role = await session.scalar(select(Role).where(Role.id == role_id))
    if role is None:
        raise NotFound("No such role")
    return _role_out(role)


async def create_role(session: AsyncSession, principal: Principal, data: RoleCreate) -> RoleOut:
    """A custom role; it cannot hold permissions its creator lacks."""
    assert principal.tenant_id is not None
    name = clean_text("name", data.name, max_length=60)
    permissions = _check_permissions(data.permissions)
    if set(permissions) - principal.permissions:
        raise Forbidden("You cannot create a role with permissions you do not hold")
    if "owners:manage" in permissions:
        raise InvalidInput.field("permissions", "owners:manage belongs to the built-in owner role only")
    if await session.scalar(select(Role.id).where(Role.name == name)) is not None:
        raise Conflict("A role with that name exists", errors=[{"field": "name", "message": "already used"}])
    role = Role(
        tenant_id=principal.tenant_id,
        name=name,
        description=clean_text("description", data.description, max_length=300, allow_empty=True),
        builtin=False,
        permissions=permissions,
    )
    session.add(role)
    await session.flush()
    await audit.record_by(
        session,
        principal,
        action="role.create",
        target_type="role",
        target_id=role.id,
        after={"name": name, "permissions": permissions},
    )
    return _role_out(role)


async def update_role(
    session: AsyncSession, principal: Principal, role_id: uuid.UUID, data: RoleUpdate
) -> tuple[RoleOut, list[RevokedCredentials]]:
    """Change a custom role; changing its permissions revokes the tokens and keys of everyone holding it."""
    assert principal.tenant_id is not None
    role = await session.scalar(select(Role).where(Role.id == role_id).with_for_update())
    if role is None:
        raise NotFound("No such role")
    if role.builtin:
        raise Conflict("Built-in roles cannot be changed; create a custom role")
    before = {"name": role.name, "permissions": list(role.permissions), "description": role.description}
    revoked: list[RevokedCredentials] = []
    if data.name is not msgspec.UNSET:
        role.name = clean_text("name", data.name, max_length=60)
    if data.description is not msgspec.UNSET:
        role.description = clean_text("description", data.description, max_length=300, allow_empty=True)
    if data.permissions is not msgspec.UNSET:
        permissions = _check_permissions(data.permissions)
        if set(permissions) - principal.permissions:
            raise Forbidden("You cannot grant permissions you do not hold")
        if "owners:manage" in permissions:
            raise InvalidInput.field("permissions", "owners:manage belongs to the built-in owner role only")
        if permissions != sorted(role.permissions):
            role.permissions = permissions
            affected = list((await session.scalars(select(User.id).where(User.role_id == role.id))).all())
            if affected:
                await session.execute(update(User).where(User.id.in_(affected)).values(tokens_revoked_at=utcnow()))
                revoked = [await revoke_user_credentials(session, principal.tenant_id, u) for u in affected]
    await session.flush()
    await audit.record_by(
        session,
        principal,
        action="role.update",
        target_type="role",
        target_id=role.id,
        before=before,
        after={"name": role.name, "permissions": list(role.permissions), "description": role.description},
    )
    return _role_out(role), revoked


async def delete_role(session: AsyncSession, principal: Principal, role_id: uuid.UUID) -> None:
    """Delete a custom role that no user holds."""
    assert principal.tenant_id is not None
    role = await session.scalar(select(Role).where(Role.id == role_id).with_for_update())
    if role is None:
        raise NotFound("No such role")
    if role.builtin:
        raise Conflict("Built-in roles cannot be deleted")
    if await session.scalar(select(func.count()).select_from(User).where(User.role_id == role.id)):
        raise Conflict("Users still hold this role; give them another role first")
    await session.delete(role)
    await audit.record_by(
        session,
        principal,
        action="role.delete",
        target_type="role",
        target_id=role.id,
        before={"name": role.name, "permissions": list(role.permissions)},
    )


# --- teams -----------------------------------------------------------------------------------------


async def _team_out(session: AsyncSession, team: Team) -> TeamOut:
    members = (await session.scalars(select(TeamMember.user_id).where(TeamMember.team_id == team.id))).all()
    return TeamOut(team.id, team.name, team.description, sorted(members), team.created_at)


async def _team(session: AsyncSession, team_id: uuid.UUID, *, lock: bool = False) -> Team:
    statement = select(Team).where(Team.id == team_id)
    team = await session.scalar(statement.with_for_update() if lock else statement)
    if team is None:
        raise NotFound("No such team")
    return team


async def list_teams(
    session: AsyncSession, page: PageRequest, q: str | None = None
) -> tuple[list[TeamOut], str | None]:
    """Teams, cursor-paginated."""
    statement = select(Team)
    if q:
        statement = statement.where(Team.name.ilike("%" + q.replace("%", "\\%").replace("_", "\\_") + "%"))
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"name": Team.name, "created_at": Team.created_at},
        default_sort="name",
        id_column=Team.id,
    )
    return [await _team_out(session, t) for t in rows], cursor


async def get_team(session: AsyncSession, team_id: uuid.UUID) -> TeamOut:
    """One team with its members."""
    return await _team_out(session, await _team(session, team_id))


async def create_team(session: AsyncSession, principal: Principal, data: TeamCreate) -> TeamOut:
    """A new team."""
    assert principal.tenant_id is not None
    name = clean_text("name", data.name, max_length=120)
    if await session.scalar(select(Team.id).where(Team.name == name)) is not None:
        raise Conflict("A team with that name exists", errors=[{"field": "name", "message": "already used"}])
    team = Team(
        tenant_id=principal.tenant_id,
        name=name,
        description=clean_text("description", data.description, max_length=300, allow_empty=True),
    )
    session.add(team)
    await session.flush()
    await audit.record_by(
        session,
        principal,
        action="team.create",
        target_type="team",
        target_id=team.id,
        after={"name": name},
    )
    return await _team_out(session, team)


async def update_team(session: AsyncSession, principal: Principal, team_id: uuid.UUID, data: TeamUpdate) -> TeamOut:
    """Rename or re-describe a team."""
    assert principal.tenant_id is not None
    team = await _team(session, team_id, lock=True)
    before = {"name": team.name, "description": team.description}
    if data.name is not msgspec.UNSET:
        name = clean_text("name", data.name, max_length=120)
        if name != team.name and await session.scalar(select(Team.id).where(Team.name == name)) is not None:
            raise Conflict("A team with that name exists", errors=[{"field": "name", "message": "already used"}])
        team.name = name
    if data.description is not msgspec.UNSET:
        team.description = clean_text("description", data.description, max_length=300, allow_empty=True)
    await audit.record_by(
        session,
        principal,
        action="team.update",
        target_type="team",
        target_id=team.id,
        before=before,
        after={"name": team.name, "description": team.description},
    )
    return await _team_out(session, team)


async def delete_team(session: AsyncSession, principal: Principal, team_id: uuid.UUID) -> None:
    """Delete a team (memberships go with it)."""
    assert principal.tenant_id is not None
    team = await _team(session, team_id, lock=True)
    await session.delete(team)
    await audit.record_by(
        session,
        principal,
        action="team.delete",
        target_type="team",
        target_id=team.id,
        before={"name": team.name},
    )


async def set_membership(
    session: AsyncSession, principal: Principal, team_id: uuid.UUID, user_id: uuid.UUID, member: bool
) -> TeamOut:
    """Add a user to a team or remove them (idempotent)."""
    assert principal.tenant_id is not None
    team = await _team(session, team_id, lock=True)
    await _user(session, user_id)
    existing = await session.get(TeamMember, (principal.tenant_id, team_id, user_id))
    if member and existing is None:
        session.add(TeamMember(tenant_id=principal.tenant_id, team_id=team_id, user_id=user_id))
    elif not member and existing is not None:
        await session.delete(existing)
    else:
        return await _team_out(session, team)
    await session.flush()
    await audit.record_by(
        session,
        principal,
        action="team.member_add" if member else "team.member_remove",
        target_type="team",
        target_id=team.id,
        after={"user_id": str(user_id)},
    )
    return await _team_out(session, team)


async def user_team_ids(session: AsyncSession, user_id: uuid.UUID) -> list[uuid.UUID]:
    """The teams a user belongs to (used by routing, the customer store and reports)."""
    return list((await session.scalars(select(TeamMember.team_id).where(TeamMember.user_id == user_id))).all())


# --- seats -----------------------------------------------------------------------------------------


def sip_a1_hash(username: str, domain: str, password: str) -> str:
    """FreeSWITCH's `a1-hash`: md5 of `user:domain:password` (the SIP digest HA1)."""
    return hashlib.md5(f"{username}:{domain}:{password}".encode(), usedforsecurity=False).hexdigest()


def _sip_password() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(SIP_PASSWORD_LENGTH))


def _seat_out(seat: Seat, domain: str) -> SeatOut:
    return SeatOut(seat.id, seat.user_id, seat.sip_username, domain, seat.created_at, seat.credentials_rotated_at)


async def _sip_domain(session: AsyncSession, tenant_id: uuid.UUID) -> str:
    domain = await session.scalar(select(Tenant.sip_domain).where(Tenant.id == tenant_id))
    if domain is None:
        raise NotFound("No such tenant")
    return domain


@dataclass(frozen=True, slots=True)
class SeatIdentity:
    """A seat and the facts about its user that the SIP directory and registrations need."""

    seat_id: uuid.UUID
    user_id: uuid.UUID
    sip_username: str
    sip_a1_hash: str
    user_name: str
    user_status: str


@dataclass(frozen=True, slots=True)
class SipAddressSeat:
    """The tenant of a SIP domain and, when the user part names one of its seats, that seat."""

    tenant_id: uuid.UUID
    tenant_status: str
    sip_domain: str
    seat: SeatIdentity | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> SipAddressSeat:
        """From the first nine columns of a `seat_by_sip_address(domain, username)` row (migration 0010)."""
        tenant_id, status, sip_domain, seat_id, user_id, username, a1_hash, user_name, user_status = row[:9]
        seat = SeatIdentity(seat_id, user_id, username, a1_hash, user_name, user_status) if seat_id else None
        return cls(tenant_id, status, sip_domain, seat)


_SEAT_BY_SIP_ADDRESS = text("SELECT * FROM seat_by_sip_address(:domain, :username)")


async def seat_by_sip_address(session: AsyncSession, domain: str, sip_username: str) -> SipAddressSeat | None:
    """`user@domain`'s tenant and seat in one statement: None when no tenant has the domain.

    The seat is read under the tenant's row-level security inside the function, and the session's own
    tenant setting is left as it was, so this works outside a transaction (one round trip) and inside one.
    """
    row = (await session.execute(_SEAT_BY_SIP_ADDRESS, {"domain": domain, "username": sip_username})).first()
    return SipAddressSeat.from_row(row) if row is not None else None


async def find_tenant_by_sip_domain(session: AsyncSession, domain: str) -> Tenant | None:
    """The tenant whose SIP domain this is (global table; case-insensitive, as DNS names are)."""
    return await session.scalar(select(Tenant).where(Tenant.sip_domain == domain.strip().lower()))


async def list_seats(
    session: AsyncSession, tenant_id: uuid.UUID, page: PageRequest
) -> tuple[list[SeatOut], str | None]:
    """Seats, cursor-paginated."""
    domain = await _sip_domain(session, tenant_id)
    rows, cursor = await paginate(
        session,
        select(Seat),
        page,
        sortable={"created_at": Seat.created_at, "sip_username": Seat.sip_username},
        default_sort="created_at",
        id_column=Seat.id,
    )
    return [_seat_out(s, domain) for s in rows], cursor


async def get_seat(session: AsyncSession, tenant_id: uuid.UUID, seat_id: uuid.UUID) -> SeatOut:
    """One seat."""
    seat = await session.scalar(select(Seat).where(Seat.id == seat_id))
    if seat is None:
        raise NotFound("No such seat")
    return _seat_out(seat, await _sip_domain(session, tenant_id))


async def assign_seat(session: AsyncSession, principal: Principal, user_id: uuid.UUID) -> SeatCredentials:
    """Bind a seat to a user within the plan's cap, and generate their SIP credentials (shown once)."""
    tenant_id = principal.tenant_id
    assert tenant_id is not None
    # One seat assignment per tenant at a time: the cap check and the insert are atomic
    # however many API processes serve the requests.
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended('seats:' || :t, 0))"), {"t": str(tenant_id)}
    )
    user = await session.scalar(select(User).where(User.id == user_id))
    if user is None:
        raise InvalidInput.field("user_id", "is not a user of this tenant")
    if user.status == "disabled":
        raise InvalidInput.field("user_id", "is deactivated")
    if await session.scalar(select(Seat.id).where(Seat.user_id == user_id)) is not None:
        raise Conflict("That user already has a seat", errors=[{"field": "user_id", "message": "already seated"}])
    cap = await session.scalar(
        select(Plan.seat_cap).join(Tenant, Tenant.plan_id == Plan.id).where(Tenant.id == tenant_id)
    )
    used = await session.scalar(select(func.count()).select_from(Seat)) or 0
    if cap is None or used >= cap:
        raise Conflict(
            f"All {cap} seats of the plan are taken; release one or change plan",
            kind="seat-cap-reached",
            title="Seat cap reached",
        )
    taken = set((await session.scalars(select(Seat.sip_username))).all())
    extension = FIRST_EXTENSION
    while str(extension) in taken:
        extension += 1
    domain = await _sip_domain(session, tenant_id)
    password = _sip_password()
    seat = Seat(
        tenant_id=tenant_id,
        user_id=user_id,
        sip_username=str(extension),
        sip_a1_hash=sip_a1_hash(str(extension), domain, password),
    )
    session.add(seat)
    await session.flush()
    await audit.record_by(
        session,
        principal,
        action="seat.assign",
        target_type="seat",
        target_id=seat.id,
        after={"user_id": str(user_id), "sip_username": seat.sip_username},
    )
    return SeatCredentials(_seat_out(seat, domain), password, f"sip:{seat.sip_username}@{domain}")


async def rotate_seat_credentials(session: AsyncSession, principal: Principal, seat_id: uuid.UUID) -> SeatCredentials:
    """A new SIP password for the seat; the old one stops working."""
    tenant_id = principal.tenant_id
    assert tenant_id is not None
    seat = await session.scalar(select(Seat).where(Seat.id == seat_id).with_for_update())
    if seat is None:
        raise NotFound("No such seat")
    domain = await _sip_domain(session, tenant_id)
    password = _sip_password()
    seat.sip_a1_hash = sip_a1_hash(seat.sip_username, domain, password)
    seat.credentials_rotated_at = utcnow()
    await audit.record_by(
        session,
        principal,
        action="seat.rotate_credentials",
        target_type="seat",
        target_id=seat.id,
    )
    return SeatCredentials(_seat_out(seat, domain), password, f"sip:{seat.sip_username}@{domain}")


async def release_seat(session: AsyncSession, principal: Principal, seat_id: uuid.UUID) -> None:
    """Free a seat; its SIP credentials stop working."""
    assert principal.tenant_id is not None
    seat = await session.scalar(select(Seat).where(Seat.id == seat_id).with_for_update())
    if seat is None:
        raise NotFound("No such seat")
    await session.delete(seat)
    await audit.record_by(
        session,
        principal,
        action="seat.release",
        target_type="seat",
        target_id=seat.id,
        before={"user_id": str(seat.user_id), "sip_username": seat.sip_username},
    )


# --- audit log -------------------------------------------------------------------------------------


async def list_audit(
    session: AsyncSession,
    page: PageRequest,
    *,
    action: str | None = None,
    actor_id: uuid.UUID | None = None,
    target_id: str | None = None,
) -> tuple[list[AuditOut], str | None]:
    """The tenant's audit log, newest first by default."""
    statement = select(AuditEntry)
    if action:
        statement = statement.where(AuditEntry.action.startswith(action, autoescape=True))
    if actor_id:
        statement = statement.where(AuditEntry.actor_id == actor_id)
    if target_id:
        statement = statement.where(AuditEntry.target_id == target_id)
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"at": AuditEntry.created_at},
        default_sort="-at",
        id_column=AuditEntry.id,
    )
    return [
        AuditOut(
            id=e.id,
            at=e.created_at,
            actor_type=e.actor_type,
            actor_id=e.actor_id,
            action=e.action,
            target_type=e.target_type,
            target_id=e.target_id,
            before=e.before,
            after=e.after,
            ip=str(e.ip) if e.ip else None,
            request_id=e.request_id,
        )
        for e in rows
    ], cursor


# --- provider operations ---------------------------------------------------------------------------


async def list_tenants(
    session: AsyncSession, page: PageRequest, *, status: str | None = None, q: str | None = None
) -> tuple[list[TenantOut], str | None]:
    """All tenants (provider operations; tenants is a global table)."""
    statement = select(Tenant)
    if status:
        statement = statement.where(Tenant.status == status)
    if q:
        pattern = "%" + q.replace("%", "\\%").replace("_", "\\_") + "%"
        statement = statement.where(Tenant.slug.ilike(pattern) | Tenant.name.ilike(pattern))
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"created_at": Tenant.created_at, "slug": Tenant.slug},
        default_sort="created_at",
        id_column=Tenant.id,
    )
    plans = {p.id: p for p in (await session.scalars(select(Plan))).all()}
    return [tenant_out(t, plans[t.plan_id]) for t in rows], cursor


async def set_tenant_status(
    session: AsyncSession, principal: Principal, tenant_id: uuid.UUID, status: str, reason: str
) -> TenantOut:
    """Suspend or reactivate a tenant: recorded in the provider's audit log and in the tenant's own."""
    tenant = await session.scalar(select(Tenant).where(Tenant.id == tenant_id).with_for_update())
    if tenant is None:
        raise NotFound("No such tenant")
    before = tenant.status
    tenant.status = status
    tenant.status_reason = clean_text("reason", reason, max_length=500)
    action = "tenant.suspend" if status == "suspended" else "tenant.reactivate"
    session.add(
        ProviderAuditEntry(
            provider_user_id=principal.user_id,
            action=action,
            target_tenant_id=tenant.id,
            detail={"before": before, "after": status, "reason": tenant.status_reason},
        )
    )
    await session.flush()
    # The tenant's own log shows it too: scope the rest of this transaction to that tenant.
    await set_tenant(session, tenant.id)
    await audit.record(
        session,
        tenant_id=tenant.id,
        actor_type="provider",
        actor_id=None,
        action=action,
        target_type="tenant",
        target_id=tenant.id,
        before={"status": before},
        after={"status": status, "reason": tenant.status_reason},
    )
    return await get_tenant(session, tenant.id)


async def list_plans(session: AsyncSession) -> list[PlanOut]:
    """Every plan, public or not."""
    return [plan_out(p) for p in (await session.scalars(select(Plan).order_by(Plan.code))).all()]


async def create_plan(session: AsyncSession, principal: Principal, data: PlanCreate) -> PlanOut:
    """A new plan."""
    if await session.scalar(select(Plan.id).where(Plan.code == data.code)) is not None:
        raise Conflict("A plan with that code exists", errors=[{"field": "code", "message": "already used"}])
    plan = Plan(
        code=data.code,
        name=clean_text("name", data.name, max_length=120),
        seat_cap=data.seat_cap,
        features=sorted(set(data.features)),
        public=data.public,
        outbound_call_cap=data.outbound_call_cap,
    )
    session.add(plan)
    await session.flush()
    session.add(
        ProviderAuditEntry(
            provider_user_id=principal.user_id,
            action="plan.create",
            target_tenant_id=None,
            detail={"code": plan.code},
        )
    )
    return plan_out(plan)


async def list_provider_audit(session: AsyncSession, page: PageRequest) -> tuple[list[ProviderAuditOut], str | None]:
    """What provider operators did, newest first."""
    rows, cursor = await paginate(
        session,
        select(ProviderAuditEntry),
        page,
        sortable={"at": ProviderAuditEntry.created_at},
        default_sort="-at",
        id_column=ProviderAuditEntry.id,
    )
    return [
        ProviderAuditOut(e.id, e.created_at, e.provider_user_id, e.action, e.target_tenant_id, e.detail) for e in rows
    ], cursor


async def deliver_outbox(sessionmaker: async_sessionmaker[AsyncSession], batch: int = 100) -> int:
    """Mark queued mails sent, tenant by tenant (each in its own tenant context)."""
    async with sessionmaker() as session:
        tenant_ids = list((await session.scalars(select(Tenant.id))).all())
    sent = 0
    for tenant_id in tenant_ids:
        async with tenant_transaction(sessionmaker, tenant_id) as session:
            mails = (
                await session.scalars(
                    select(OutboxMail)
                    .where(OutboxMail.sent_at.is_(None))
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for mail in mails:
                mail.sent_at = utcnow()
            sent += len(mails)
    return sent


async def has_seat(session: AsyncSession, user_id: uuid.UUID) -> bool:
    """Whether the user holds a seat (an agent licence): routing offers work only to seated agents."""
    return await session.scalar(select(Seat.id).where(Seat.user_id == user_id)) is not None


async def active_tenant_ids(session: AsyncSession) -> list[uuid.UUID]:
    """Tenants that are not suspended (global table): what background work walks."""
    return list((await session.scalars(select(Tenant.id).where(Tenant.status != "suspended"))).all())

"""Who is looking at the customer store, what they may see, and the version checks on every write.

Access is decided here, in the service layer, for every route and job alike:
business units (the foundation's teams) scope what an agent reaches, the
`customers:all_units` permission lifts the scope (supervisors, admins), and
`customers:read_sensitive` decides whether contact points are shown or masked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.principal import Principal
from backend.lib.masking import READ_SENSITIVE
from backend.lib.problems import Problem
from backend.tenants import service as tenants_service

SENSITIVE = READ_SENSITIVE
ALL_UNITS = "customers:all_units"


class PreconditionRequired(Problem):
    """A write without If-Match: the client must say which version it changes."""

    status = 428
    kind = "precondition-required"
    title = "If-Match required"


class PreconditionFailed(Problem):
    """A write naming a version that is no longer current: someone else changed the record first."""

    status = 412
    kind = "precondition-failed"
    title = "Stale version"


@dataclass(frozen=True, slots=True)
class Viewer:
    """The caller as the customer store sees them."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID | None
    actor_type: str
    actor_id: uuid.UUID | None
    permissions: frozenset[str]
    team_ids: frozenset[uuid.UUID]

    @property
    def sensitive(self) -> bool:
        """Sees phone numbers, e-mails and sensitive custom fields unmasked."""
        return SENSITIVE in self.permissions

    @property
    def all_units(self) -> bool:
        """Reaches customers of every business unit."""
        return ALL_UNITS in self.permissions

    def can(self, permission: str) -> bool:
        """Whether the caller holds `permission`."""
        return permission in self.permissions

    def owns_unit(self, team_id: uuid.UUID | None) -> bool:
        """Whether a record owned by `team_id` is within the caller's units (unowned records are everyone's)."""
        return self.all_units or team_id is None or team_id in self.team_ids

    def audit_actor(self) -> dict[str, object]:
        """The actor fields of an audit entry."""
        return {"tenant_id": self.tenant_id, "actor_type": self.actor_type, "actor_id": self.actor_id}


def unit_member(principal: Principal) -> uuid.UUID | None:
    """Whose business units scope this caller: the user (an API key's creator), or None when units do not matter."""
    return principal.user_id if ALL_UNITS not in principal.permissions else None


def viewer_for(principal: Principal, teams: Iterable[uuid.UUID]) -> Viewer:
    """The viewer for a caller whose teams (those of `unit_member`) are known."""
    assert principal.tenant_id is not None
    return Viewer(
        tenant_id=principal.tenant_id,
        user_id=principal.user_id,
        actor_type=principal.actor_type,
        actor_id=principal.actor_id,
        permissions=principal.permissions,
        team_ids=frozenset(teams),
    )


async def viewer_of(session: AsyncSession, principal: Principal) -> Viewer:
    """The viewer for a signed-in user or an API key (whose units are its creator's)."""
    member = unit_member(principal)
    teams: Iterable[uuid.UUID] = () if member is None else await tenants_service.user_team_ids(session, member)
    return viewer_for(principal, teams)


def etag(version: int) -> str:
    """The ETag of a record at `version`."""
    return f'"{version}"'


def expected_version(if_match: str | None) -> int:
    """The version an If-Match header names; 428 when it is missing or says nothing precise."""
    if if_match is None or not if_match.strip():
        raise PreconditionRequired("Send If-Match with the ETag you read; changes to a stale version are refused")
    value = if_match.strip().removeprefix("W/").strip('"')
    try:
        return int(value)
    except ValueError as exc:
        raise PreconditionRequired('If-Match must carry the record\'s ETag, such as "3"') from exc


def check_version(current: int, expected: int) -> None:
    """412 unless the client changes the version it read."""
    if current != expected:
        raise PreconditionFailed(
            f"The record changed since you read it (you sent version {expected}, it is now {current}); "
            "read it again and re-apply your change",
            headers={"ETag": etag(current)},
            extra={"current_version": current},
        )

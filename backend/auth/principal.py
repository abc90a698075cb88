"""Who is calling: the identity every guard and service reads."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

PrincipalKind = Literal["user", "api_key", "provider", "switch"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a tenant user, a tenant API key, a provider operator or a switch node."""

    kind: PrincipalKind
    tenant_id: uuid.UUID | None
    user_id: uuid.UUID | None
    permissions: frozenset[str] = field(default_factory=frozenset)
    session_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    tenant_status: str | None = None
    issued_at_ms: int = 0
    mfa_pending: bool = False
    """Signed in with a password on a tenant that requires TOTP, not yet enrolled: may only enrol."""

    def can(self, permission: str) -> bool:
        """Whether this caller holds `permission`."""
        return permission in self.permissions

    @property
    def actor_type(self) -> str:
        """How the audit log names this kind of caller."""
        return self.kind

    @property
    def actor_id(self) -> uuid.UUID | None:
        """The id the audit log records."""
        return self.api_key_id if self.kind == "api_key" else self.user_id

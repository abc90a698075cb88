"""Redis key names. Tenant keys carry the tenant in a hash tag so one tenant's keys share a Cluster slot."""

from __future__ import annotations

import uuid

PREFIX = "cc"


def tenant_key(tenant_id: uuid.UUID | str, *parts: str) -> str:
    """`cc:{t:<tenant>}:part:part`: every multi-key script of one tenant runs on one Cluster node."""
    return ":".join((PREFIX, f"{{t:{tenant_id}}}", *parts))


def global_key(*parts: str) -> str:
    """A key that belongs to no tenant (provider-wide throttles, lookups)."""
    return ":".join((PREFIX, *parts))


REVOCATION_CHANNEL = global_key("auth", "revocations")
"""Pub/sub channel on which revocations are announced to every process holding connections."""

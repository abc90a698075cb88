"""Erasure hooks: every capability that keeps a customer's numbers or names registers one here.

An erasure request anonymises the customer record itself, then calls each hook
in the same transaction with the addresses and names to remove, so either every
copy goes or none does. Call records, recordings, voicemails and chat
transcripts register theirs as they arrive; interactions (routing) and the
store's own notes and tickets are registered below.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from backend.routing import service as routing_service


@dataclass(frozen=True, slots=True)
class ErasureRequest:
    """Whose data to remove, and what it looks like wherever it was copied."""

    tenant_id: uuid.UUID
    customer_id: uuid.UUID
    refs: tuple[str, ...]
    """How other records point at the customer: its id and its addresses (interactions' `customer_ref`)."""
    secrets: tuple[str, ...]
    """Phone numbers (E.164 and as entered), e-mails, OpenIDs, external ids and names to scrub."""

    @property
    def replacement_ref(self) -> str:
        """What records point at afterwards: the customer id, which says nothing about the person."""
        return str(self.customer_id)


ErasureHook = Callable[[AsyncSession, ErasureRequest], Awaitable[int]]
"""Anonymise one capability's copies; returns how many records it changed."""

_HOOKS: dict[str, ErasureHook] = {}


def register_erasure_hook(name: str, hook: ErasureHook) -> None:
    """Have `hook` run on every erasure, under `name` (the audit entry counts its changes by name)."""
    _HOOKS[name] = hook


def unregister_erasure_hook(name: str) -> None:
    """Remove a hook (tests, or a capability switched off)."""
    _HOOKS.pop(name, None)


def erasure_hooks() -> dict[str, ErasureHook]:
    """The registered hooks by name."""
    return dict(_HOOKS)


async def run_erasure_hooks(session: AsyncSession, request: ErasureRequest) -> dict[str, int]:
    """Run every hook in the caller's transaction; a failing hook fails the whole erasure."""
    return {name: await hook(session, request) for name, hook in sorted(_HOOKS.items())}


async def _interactions(session: AsyncSession, request: ErasureRequest) -> int:
    return await routing_service.anonymise_customer_interactions(
        session, request.refs, request.replacement_ref, request.secrets
    )


register_erasure_hook("interactions", _interactions)

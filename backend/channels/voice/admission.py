"""Call admission: "may this tenant take or place this call?", asked by the dialplan before a call goes on.

Billing (prepaid balances, plan limits) answers it once it exists; until then
every call of an active tenant is admitted. A suspended tenant is refused
before admission is asked.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal, Protocol

Direction = Literal["inbound", "outbound"]


@dataclass(frozen=True, slots=True)
class CallAttempt:
    """A call about to be routed: who, which way, between which numbers."""

    tenant_id: uuid.UUID
    direction: Direction
    """inbound: a customer calls one of the tenant's numbers; outbound: one of its seats places a call."""
    caller_number: str
    destination_number: str
    did: str | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer: admitted, or refused with the FreeSWITCH hangup cause the caller hears as a SIP status."""

    admitted: bool
    hangup_cause: str = "OUTGOING_CALL_BARRED"
    """A cause from switch_types.h; mod_sofia maps *_CALL_BARRED to 403 Forbidden."""
    reason: str = ""


ADMITTED = Admission(admitted=True)


class CallAdmission(Protocol):
    """Decides whether a tenant may take or place a call (billing implements it)."""

    async def check(self, attempt: CallAttempt) -> Admission:
        """Admit or refuse the attempt; must answer within the xml_curl timeout (a few ms, not seconds)."""
        ...


class AdmitEveryCall:
    """The admission in force until billing exists: every call of an active tenant goes on."""

    async def check(self, attempt: CallAttempt) -> Admission:
        """Always admitted."""
        return ADMITTED

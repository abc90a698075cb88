"""Dial strings to agents' phones, and what a failed bridge's cause means for routing.

An agent's leg is one `[...]`-prefixed endpoint of a `bridge` dial string, so
several agents of a ring-all offer ring at once (`,`) and each leg carries its
own variables: our UUID for it (to know who answered), `cc_agent_id` (its CDR),
`leg_timeout` (the offer's time left), the caller id the agent's phone shows and
the music its partner hears while the agent holds the call. On the caller's
node the seat is reached as `user/<seat>@<tenant domain>` (the directory's dial
string finds the registration); a phone registered on another node is called at
its contact through the `internal` profile.
"""

from __future__ import annotations

import re
import uuid
from typing import Literal

from backend.channels.voice.registrations import RegisteredContact, contact_uri
from backend.channels.voice.xml_documents import switch_text

DeclineReason = Literal["no_answer", "declined", "unreachable"]

NO_ANSWER_CAUSES = frozenset(
    {"NO_ANSWER", "NO_USER_RESPONSE", "ALLOTTED_TIMEOUT", "ORIGINATOR_CANCEL", "LOSE_RACE", "PROGRESS_TIMEOUT"}
)
DECLINED_CAUSES = frozenset({"USER_BUSY", "CALL_REJECTED", "BUSY_EVERYWHERE", "DECLINE"})
_VALUE = re.compile(r"^[A-Za-z0-9_.:@+/=#*%-]*$")


def decline_reason(cause: str | None) -> DeclineReason:
    """How routing hears of an agent leg that was not answered: no answer, declined, or not reachable."""
    cause = (cause or "").upper()
    if cause in NO_ANSWER_CAUSES:
        return "no_answer"
    if cause in DECLINED_CAUSES:
        return "declined"
    return "unreachable"


def _variable(name: str, value: str) -> str:
    if _VALUE.fullmatch(value):
        return f"{name}={value}"
    # Free text (a caller's name): no separators, brackets, quotes or `$`, quoted for its spaces.
    return f"{name}='{switch_text(value, 80).replace(',', ' ')}'"


def agent_leg(
    contact: RegisteredContact,
    *,
    caller_node: uuid.UUID | None,
    sip_domain: str,
    leg: uuid.UUID,
    agent_id: uuid.UUID,
    timeout_seconds: int,
    caller_id_name: str,
    caller_id_number: str,
    hold_music: str | None,
    profile: str = "internal",
) -> str:
    """One agent's endpoint in a bridge dial string, with its own variables."""
    variables = [
        _variable("origination_uuid", str(leg)),
        _variable("cc_agent_id", str(agent_id)),
        _variable("leg_timeout", str(timeout_seconds)),
        _variable("origination_caller_id_number", re.sub(r"[^0-9+*#]", "", caller_id_number)[:32] or "0"),
        _variable("origination_caller_id_name", caller_id_name or caller_id_number or "Caller"),
    ]
    if hold_music:
        variables.append(_variable("hold_music", hold_music))
    if caller_node is None or contact.node_id == caller_node:
        target = f"user/{contact.sip_username}@{sip_domain}"
    else:
        target = f"sofia/{profile}/{contact_uri(contact.contact)}"
    return "[" + ",".join(variables) + "]" + target


def ring_all(legs: list[str]) -> str:
    """Legs rung at the same time (the first to answer is bridged, the others hung up with LOSE_RACE)."""
    return ",".join(legs)

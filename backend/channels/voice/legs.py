"""Facts about one call leg, read from FreeSWITCH's own documents: an event (`event json`) or a mod_json_cdr post.

FreeSWITCH hands us headers as a mapping of name to value, exactly as `event json`
gives them: strings, except multi-valued (`ARRAY::`) variables, which arrive as
lists. Channel variables are headers named `variable_<name>`. mod_json_cdr puts
the same variables, without the prefix, under `variables`, URL-encoded when its
`encode-values` setting is on (the default).

Our dialplan and directory put these variables on every channel they handle
(`export`ed to the legs a channel originates), which is how a leg finds its
tenant, call, queue, agent and interaction again at hangup.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from backend.lib.bounded import BoundedDict
from backend.lib.phones import as_e164, valid_international

Event = Mapping[str, Any]
"""A parsed FreeSWITCH event: header name to value (a string, or a list for array variables)."""

# Channel variables our dialplan and directory set.
VAR_TENANT = "cc_tenant_id"
VAR_USER = "cc_user_id"
VAR_SEAT = "cc_seat_id"
VAR_CALL = "cc_call_id"
VAR_DID = "cc_did"
VAR_NUMBER = "cc_number_id"
VAR_QUEUE = "cc_queue_id"
VAR_IVR_FLOW = "cc_ivr_flow_id"
VAR_IVR_FLOW_VERSION = "cc_ivr_flow_version"
"""The flow version the call starts on, pinned by the dialplan when it arrived."""
VAR_AGENT = "cc_agent_id"
VAR_INTERACTION = "cc_interaction_id"
VAR_NODE = "cc_node_id"
VAR_REFUSAL = "cc_refusal"
VAR_DIRECTION = "cc_direction"
VAR_LEG_ROLE = "cc_leg_role"
"""What a leg is for when it is not the caller's or an agent's: `supervision` (a supervisor's eavesdrop leg)."""
VAR_SUPERVISION = "cc_supervision_id"
LEG_ROLE_SUPERVISION = "supervision"

_DETAIL_VARIABLES = (
    "sip_call_id",
    "sip_hangup_disposition",
    "sip_term_status",
    "endpoint_disposition",
    "last_app",
    "originate_disposition",
    "bridge_hangup_cause",
    "sip_user_agent",
    VAR_REFUSAL,
    VAR_NUMBER,
    VAR_IVR_FLOW,
    VAR_SEAT,
    VAR_LEG_ROLE,
    VAR_SUPERVISION,
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class LegError(ValueError):
    """The document does not describe a call leg we can store (no valid leg UUID, no times)."""


def text(value: Any, max_length: int = 255) -> str:
    """A header value as storable text: no NULs or control characters, bounded."""
    if isinstance(value, list):
        value = value[0] if value else ""
    if not isinstance(value, str):
        value = "" if value is None else str(value)
    return _CONTROL.sub("", unicodedata.normalize("NFC", value))[:max_length]


def header(event: Event, name: str) -> str | None:
    """One header's value, or None when absent or empty."""
    value = event.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    value = str(value)
    return value if value != "" else None


def variable(event: Event, name: str) -> str | None:
    """A channel variable carried by an event (`variable_<name>`)."""
    return header(event, f"variable_{name}")


def as_uuid(value: str | None) -> uuid.UUID | None:
    """A UUID, or None for anything else (values from the switch are checked, never trusted blindly)."""
    if not value:
        return None
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        return None


def from_micros(value: str | None) -> datetime | None:
    """FreeSWITCH's microseconds since the epoch (`*_uepoch`, `Caller-Channel-*-Time`) as UTC; 0 means never."""
    if not value:
        return None
    try:
        micros = int(value)
    except ValueError:
        return None
    if micros <= 0:
        return None
    return datetime.fromtimestamp(micros / 1_000_000, UTC)


_E164_LONGEST = 24
_E164_SEEN: BoundedDict[str, str | None] = BoundedDict(4096)
"""`e164`'s answers by raw text, per process: `phonenumbers` costs ~20 us a number and the same DIDs come back
on every call (the dialplan, both legs' CDRs, call control), so each is worked out once; it is a pure function."""


def e164(raw: str | None) -> str | None:
    """A dialled or presented number in E.164 (`+33142685300`), or None if it is not a valid public number.

    Carriers send DIDs with or without the `+`; a number without it is read as international.
    """
    if not raw:
        return None
    if raw in _E164_SEEN:
        return _E164_SEEN[raw]
    candidate = raw.strip()
    if candidate.startswith("00"):
        candidate = "+" + candidate[2:]
    if not candidate.startswith("+"):
        candidate = "+" + candidate
    found = None
    if re.fullmatch(r"\+[0-9]{7,15}", candidate):
        parsed = valid_international(candidate)
        found = as_e164(parsed) if parsed is not None else None
    # Only what could be a number is kept: a caller controls the text, and a long one is no number.
    return _E164_SEEN.keep(raw, found) if len(raw) <= _E164_LONGEST else found


@dataclass(frozen=True, slots=True)
class LegFacts:
    """Everything we keep about one call leg, whichever FreeSWITCH document it came from."""

    leg_uuid: uuid.UUID
    direction: str
    started_at: datetime
    ended_at: datetime | None
    call_uuid: uuid.UUID | None = None
    node_name: str = ""
    core_uuid: str = ""
    caller_number: str = ""
    caller_name: str = ""
    destination_number: str = ""
    ringing_at: datetime | None = None
    answered_at: datetime | None = None
    bridged_at: datetime | None = None
    hangup_cause: str | None = None
    hangup_cause_q850: int | None = None
    tenant_hint: uuid.UUID | None = None
    """`cc_tenant_id` as set by our dialplan or directory."""
    domains: tuple[str, ...] = ()
    """The SIP domains the leg names (the seat's, the dialled user's): how a seat's leg finds its tenant."""
    did: str | None = None
    queue_id: uuid.UUID | None = None
    agent_id: uuid.UUID | None = None
    interaction_id: uuid.UUID | None = None
    refused: bool = False
    lost: bool = False
    """Closed by us because its switch node was lost, not reported ended by FreeSWITCH."""
    details: dict[str, str] = field(default_factory=dict)

    @property
    def is_caller_leg(self) -> bool:
        """The leg that started the call (not one it originated)."""
        return self.call_uuid is None or self.call_uuid == self.leg_uuid

    @property
    def duration_ms(self) -> int:
        """From the channel's creation to its end."""
        if self.ended_at is None:
            return 0
        return max(0, round((self.ended_at - self.started_at).total_seconds() * 1000))

    @property
    def billable_ms(self) -> int:
        """From answer to end (FreeSWITCH's `billmsec`); 0 if never answered."""
        if self.ended_at is None or self.answered_at is None:
            return 0
        return max(0, round((self.ended_at - self.answered_at).total_seconds() * 1000))

    @property
    def disposition(self) -> str:
        """How the leg went, in one word: node_failure, refused, answered, no_answer, busy, cancelled or failed."""
        if self.lost:
            return "node_failure"
        if self.refused:
            return "refused"
        if self.answered_at is not None:
            return "answered"
        cause = self.hangup_cause or ""
        if cause in {"NO_ANSWER", "NO_USER_RESPONSE", "ALLOTTED_TIMEOUT", "SUBSCRIBER_ABSENT"}:
            return "no_answer"
        if cause in {"USER_BUSY", "BUSY_EVERYWHERE"}:
            return "busy"
        if cause in {"ORIGINATOR_CANCEL", "LOSE_RACE", "PICKED_OFF"}:
            return "cancelled"
        return "failed"

    def closed(self, ended_at: datetime) -> LegFacts:
        """The leg as closed at `ended_at` because its switch node was lost."""
        return replace(self, ended_at=max(ended_at, self.started_at), lost=True)

    def to_json(self) -> dict[str, Any]:
        """The facts as JSON-ready values (stored with an unattributed CDR)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, uuid.UUID):
                out[key] = str(value)
            elif isinstance(value, datetime):
                out[key] = value.isoformat()
            elif isinstance(value, tuple):
                out[key] = list(value)
            else:
                out[key] = value
        return out


def _first_time(*values: str | None) -> datetime | None:
    times = [t for t in (from_micros(v) for v in values) if t is not None]
    return min(times) if times else None


def _q850(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    number = int(value)
    return number if 0 <= number < 1000 else None


def _domains(get: Any) -> tuple[str, ...]:
    found: list[str] = []
    for name in ("domain_name", "dialed_domain", "sip_auth_realm"):
        value = get(name)
        if value and value.lower() not in found:
            found.append(text(value, 255).lower())
    return tuple(found)


def _details(get: Any) -> dict[str, str]:
    return {name: text(value, 255) for name in _DETAIL_VARIABLES if (value := get(name))}


def _build(
    leg_uuid: uuid.UUID | None,
    get: Any,
    *,
    direction: str | None,
    node_name: str | None,
    core_uuid: str | None,
    caller_number: str | None,
    caller_name: str | None,
    destination: str | None,
    created: str | None,
    hangup: str | None,
    cause: str | None,
) -> LegFacts:
    if leg_uuid is None:
        raise LegError("the document names no valid leg UUID")
    started = from_micros(get("start_uepoch")) or from_micros(created)
    if started is None:
        raise LegError("the document carries no start time")
    ended = from_micros(get("end_uepoch")) or from_micros(hangup)
    call_uuid = as_uuid(get(VAR_CALL)) or as_uuid(get("originating_leg_uuid")) or as_uuid(get("originator")) or leg_uuid
    leg_direction = (direction or get("direction") or "inbound").lower()
    # A supervisor's eavesdrop leg reaches the supervisor's seat (the directory puts `cc_user_id` on it) but is
    # no agent's leg: it handles nothing, in routing or billing.
    agent_id = None
    if get(VAR_LEG_ROLE) != LEG_ROLE_SUPERVISION:
        agent_id = as_uuid(get(VAR_AGENT)) or as_uuid(get(VAR_USER))
    if leg_direction not in {"inbound", "outbound"}:
        leg_direction = "inbound"
    return LegFacts(
        leg_uuid=leg_uuid,
        call_uuid=call_uuid,
        direction=leg_direction,
        node_name=text(node_name, 64),
        core_uuid=text(core_uuid, 64),
        caller_number=text(caller_number, 64),
        caller_name=text(caller_name, 120),
        destination_number=text(destination, 64),
        started_at=started,
        ringing_at=_first_time(get("progress_uepoch"), get("progress_media_uepoch")),
        answered_at=from_micros(get("answer_uepoch")),
        bridged_at=from_micros(get("bridge_uepoch")),
        ended_at=ended,
        hangup_cause=text(cause or get("hangup_cause"), 48) or None,
        hangup_cause_q850=_q850(get("hangup_cause_q850")),
        tenant_hint=as_uuid(get(VAR_TENANT)),
        domains=_domains(get),
        did=e164(get(VAR_DID)),
        queue_id=as_uuid(get(VAR_QUEUE)),
        agent_id=agent_id,
        interaction_id=as_uuid(get(VAR_INTERACTION)),
        refused=bool(get(VAR_REFUSAL)),
        details=_details(get),
    )


def leg_from_event(event: Event) -> LegFacts:
    """The leg a CHANNEL_HANGUP_COMPLETE (or any channel) event describes."""

    def get(name: str) -> str | None:
        return variable(event, name)

    return _build(
        as_uuid(header(event, "Unique-ID")),
        get,
        direction=header(event, "Call-Direction"),
        node_name=header(event, "FreeSWITCH-Switchname") or header(event, "FreeSWITCH-Hostname"),
        core_uuid=header(event, "Core-UUID"),
        caller_number=header(event, "Caller-Caller-ID-Number") or header(event, "Caller-ANI"),
        caller_name=header(event, "Caller-Caller-ID-Name"),
        destination=header(event, "Caller-Destination-Number"),
        created=header(event, "Caller-Channel-Created-Time"),
        hangup=header(event, "Caller-Channel-Hangup-Time"),
        cause=header(event, "Hangup-Cause"),
    )


def _values_are_encoded(variables: Mapping[str, Any]) -> bool:
    """mod_json_cdr's `encode-values` (on by default) URL-encodes every variable: the stamps show it."""
    for name in ("start_stamp", "end_stamp", "profile_start_stamp"):
        value = variables.get(name)
        if isinstance(value, str) and value:
            return "%20" in value or "%3A" in value
    return any(isinstance(v, str) and "%" in v and " " not in v for v in variables.values())


def leg_from_json_cdr(document: Mapping[str, Any]) -> LegFacts:
    """The leg a mod_json_cdr document (an HTTP post or a file from its err-log-dir) describes."""
    raw_variables = document.get("variables")
    if not isinstance(raw_variables, Mapping):
        raise LegError("the CDR has no `variables` object")
    encoded = _values_are_encoded(raw_variables)

    def get(name: str) -> str | None:
        value = raw_variables.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None or value == "":
            return None
        value = str(value)
        return unquote(value) if encoded else value

    profile: Mapping[str, Any] = {}
    callflow = document.get("callflow")
    first = callflow[0] if isinstance(callflow, list) and callflow else callflow
    if isinstance(first, Mapping) and isinstance(first.get("caller_profile"), Mapping):
        profile = first["caller_profile"]
    channel_data = document.get("channel_data")
    direction = channel_data.get("direction") if isinstance(channel_data, Mapping) else None

    def from_profile(name: str) -> str | None:
        value = profile.get(name)
        return str(value) if value not in (None, "") else None

    return _build(
        as_uuid(get("uuid")),
        get,
        direction=direction if isinstance(direction, str) else None,
        node_name=document.get("switchname") if isinstance(document.get("switchname"), str) else None,
        core_uuid=document.get("core-uuid") if isinstance(document.get("core-uuid"), str) else None,
        caller_number=from_profile("caller_id_number") or from_profile("ani"),
        caller_name=from_profile("caller_id_name"),
        destination=from_profile("destination_number"),
        created=None,
        hangup=None,
        cause=None,
    )


def live_fields(event: Event) -> dict[str, str]:
    """What a channel event tells about a leg still up: the fields worth remembering until its hangup."""
    fields: dict[str, str] = {}

    def put(name: str, value: str | None, max_length: int = 255) -> None:
        if value:
            fields[name] = text(value, max_length)

    put("direction", header(event, "Call-Direction"))
    put("created_us", header(event, "Caller-Channel-Created-Time"))
    put("answered_us", _nonzero(header(event, "Caller-Channel-Answered-Time")))
    put("bridged_us", _nonzero(header(event, "Caller-Channel-Bridged-Time")))
    put(
        "ringing_us",
        _nonzero(header(event, "Caller-Channel-Progress-Media-Time"))
        or _nonzero(header(event, "Caller-Channel-Progress-Time")),
    )
    put("caller_number", header(event, "Caller-Caller-ID-Number"), 64)
    put("caller_name", header(event, "Caller-Caller-ID-Name"), 120)
    put("destination_number", header(event, "Caller-Destination-Number"), 64)
    put("node_name", header(event, "FreeSWITCH-Switchname"), 64)
    put("core_uuid", header(event, "Core-UUID"), 64)
    for name in (
        VAR_TENANT, VAR_CALL, VAR_DID, VAR_QUEUE, VAR_AGENT, VAR_USER, VAR_INTERACTION, VAR_REFUSAL,
        VAR_LEG_ROLE, VAR_SUPERVISION, "originating_leg_uuid", "domain_name", "dialed_domain", "sip_auth_realm",
        "sip_call_id",
    ):  # fmt: skip
        put(f"var:{name}", variable(event, name))
    return fields


def _nonzero(value: str | None) -> str | None:
    return value if value and value != "0" else None


def leg_from_live(leg_uuid: str, fields: Mapping[str, str]) -> LegFacts:
    """A leg as remembered from its channel events (no hangup seen): for closing it when its node is lost."""
    created = fields.get("created_us")

    def get(name: str) -> str | None:
        if name == "start_uepoch":
            return created
        if name == "answer_uepoch":
            return fields.get("answered_us")
        if name == "bridge_uepoch":
            return fields.get("bridged_us")
        if name == "progress_uepoch":
            return fields.get("ringing_us")
        return fields.get(f"var:{name}")

    return _build(
        as_uuid(leg_uuid),
        get,
        direction=fields.get("direction"),
        node_name=fields.get("node_name"),
        core_uuid=fields.get("core_uuid"),
        caller_number=fields.get("caller_number"),
        caller_name=fields.get("caller_name"),
        destination=fields.get("destination_number"),
        created=created,
        hangup=None,
        cause=None,
    )

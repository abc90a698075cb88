"""A simulated channel and the event headers FreeSWITCH builds from it (switch_channel.c, event set data)."""

from __future__ import annotations

import time
import uuid as uuidlib
from dataclasses import dataclass, field

Pairs = list[tuple[str, str]]

# Events that carry every channel variable (switch_channel_event_set_extended_data).
EXTENDED_EVENTS = frozenset(
    {
        "CHANNEL_CREATE",
        "CHANNEL_ORIGINATE",
        "CHANNEL_UUID",
        "CHANNEL_ANSWER",
        "CHANNEL_PARK",
        "CHANNEL_UNPARK",
        "CHANNEL_BRIDGE",
        "CHANNEL_UNBRIDGE",
        "CHANNEL_PROGRESS",
        "CHANNEL_PROGRESS_MEDIA",
        "CHANNEL_HANGUP",
        "CHANNEL_HANGUP_COMPLETE",
        "REQUEST_PARAMS",
        "CHANNEL_DATA",
        "CHANNEL_EXECUTE",
        "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_DESTROY",
        "API",
        "RECORD_START",
        "RECORD_STOP",
        "PLAYBACK_START",
        "PLAYBACK_STOP",
        "CALL_UPDATE",
        "MEDIA_BUG_START",
        "MEDIA_BUG_STOP",
        "CHANNEL_HOLD",
        "CHANNEL_UNHOLD",
        "CUSTOM",
    }
)

STATE_NUMBERS = {
    "CS_NEW": 0,
    "CS_INIT": 1,
    "CS_ROUTING": 2,
    "CS_SOFT_EXECUTE": 3,
    "CS_EXECUTE": 4,
    "CS_EXCHANGE_MEDIA": 5,
    "CS_PARK": 6,
    "CS_CONSUME_MEDIA": 7,
    "CS_HIBERNATE": 8,
    "CS_RESET": 9,
    "CS_HANGUP": 10,
    "CS_REPORTING": 11,
    "CS_DESTROY": 12,
}

# Q.850 codes of the hangup causes the simulator produces (switch_channel.c CAUSE_CHART).
Q850 = {
    "NONE": 0,
    "UNALLOCATED_NUMBER": 1,
    "NORMAL_CLEARING": 16,
    "USER_BUSY": 17,
    "NO_USER_RESPONSE": 18,
    "NO_ANSWER": 19,
    "SUBSCRIBER_ABSENT": 20,
    "CALL_REJECTED": 21,
    "DESTINATION_OUT_OF_ORDER": 27,
    "NORMAL_UNSPECIFIED": 31,
    "NORMAL_TEMPORARY_FAILURE": 41,
    "ORIGINATOR_CANCEL": 487,
    "LOSE_RACE": 502,
    "MANAGER_REQUEST": 503,
    "ALLOTTED_TIMEOUT": 602,
    "USER_NOT_REGISTERED": 606,
}


def now_us() -> int:
    return int(time.time() * 1_000_000)


@dataclass(slots=True)
class CallerProfile:
    """switch_caller_profile_t: who called whom, and the channel's timestamps (microseconds, 0 = never)."""

    username: str
    caller_id_name: str
    caller_id_number: str
    destination_number: str
    uuid: str
    channel_name: str
    direction: str = "inbound"
    dialplan: str = "XML"
    network_addr: str = "127.0.0.1"
    ani: str = ""
    source: str = "mod_sofia"
    context: str = "default"
    callee_id_name: str | None = None
    callee_id_number: str | None = None
    orig_caller_id_name: str | None = None
    orig_caller_id_number: str | None = None
    profile_index: str = "1"
    profile_created: int = 0
    created: int = 0
    answered: int = 0
    progress: int = 0
    progress_media: int = 0
    hangup: int = 0
    transfer: int = 0
    resurrect: int = 0
    bridged: int = 0
    last_hold: int = 0
    hold_accum: int = 0
    _headers: dict[tuple[str, bool], Pairs] | None = field(default=None, init=False, repr=False, compare=False)
    """headers() by (prefix, with_index), until a field changes: every event carries the profile."""

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name != "_headers":
            object.__setattr__(self, "_headers", None)

    def headers(self, prefix: str, *, with_index: bool = True) -> Pairs:
        """switch_caller_profile_event_set_data: empty fields are left out; the other leg's copy has no index."""
        cache = self._headers
        if cache is None:
            cache = self._headers = {}
        pairs = cache.get((prefix, with_index))
        if pairs is None:
            pairs = cache[(prefix, with_index)] = self._build_headers(prefix, with_index)
        # A copy: callers extend what they get.
        return list(pairs)

    def _build_headers(self, prefix: str, with_index: bool) -> Pairs:
        names = _profile_names(prefix)
        orig_name = self.caller_id_name if self.orig_caller_id_name is None else self.orig_caller_id_name
        orig_number = self.caller_id_number if self.orig_caller_id_number is None else self.orig_caller_id_number
        candidates: tuple[str | None, ...] = (
            self.direction,
            self.direction,
            self.username,
            self.dialplan,
            self.caller_id_name,
            self.caller_id_number,
            orig_name if self.caller_id_name else None,
            orig_number if self.caller_id_number else None,
            self.callee_id_name,
            self.callee_id_number,
            self.network_addr,
            self.ani or self.caller_id_number,
            self.destination_number,
            self.uuid,
            self.source,
            self.context,
            self.channel_name,
        )
        pairs: Pairs = [(name, value) for name, value in zip(names.fields, candidates, strict=True) if value]
        if with_index:
            pairs.append((names.index, self.profile_index))
            times = (
                self.profile_created,
                self.created,
                self.answered,
                self.progress,
                self.progress_media,
                self.hangup,
                self.transfer,
                self.resurrect,
                self.bridged,
                self.last_hold,
                self.hold_accum,
            )
            pairs += [(name, str(value)) for name, value in zip(names.times, times, strict=True)]
        else:
            # The originator/originatee copy is taken before its timestamps are filled.
            pairs += names.unset_times
        pairs += names.trailer
        return pairs


@dataclass(frozen=True, slots=True)
class _ProfileNames:
    fields: tuple[str, ...]
    index: str
    times: tuple[str, ...]
    unset_times: tuple[tuple[str, str], ...]
    trailer: tuple[tuple[str, str], ...]


_PROFILE_FIELDS = (
    "Direction",
    "Logical-Direction",
    "Username",
    "Dialplan",
    "Caller-ID-Name",
    "Caller-ID-Number",
    "Orig-Caller-ID-Name",
    "Orig-Caller-ID-Number",
    "Callee-ID-Name",
    "Callee-ID-Number",
    "Network-Addr",
    "ANI",
    "Destination-Number",
    "Unique-ID",
    "Source",
    "Context",
    "Channel-Name",
)
_PROFILE_TIMES = (
    "Profile-Created-Time",
    "Channel-Created-Time",
    "Channel-Answered-Time",
    "Channel-Progress-Time",
    "Channel-Progress-Media-Time",
    "Channel-Hangup-Time",
    "Channel-Transfer-Time",
    "Channel-Resurrect-Time",
    "Channel-Bridged-Time",
    "Channel-Last-Hold",
    "Channel-Hold-Accum",
)
_profile_names_cache: dict[str, _ProfileNames] = {}


def _profile_names(prefix: str) -> _ProfileNames:
    """The profile's header names under one prefix (Caller, Other-Leg, Channel, Hunt...), built once: every
    event carries one or two profiles, and formatting some forty names each time showed in profiles."""
    names = _profile_names_cache.get(prefix)
    if names is None:
        times = tuple(f"{prefix}-{name}" for name in _PROFILE_TIMES)
        names = _profile_names_cache[prefix] = _ProfileNames(
            fields=tuple(f"{prefix}-{name}" for name in _PROFILE_FIELDS),
            index=f"{prefix}-Profile-Index",
            times=times,
            unset_times=tuple((name, "0") for name in times),
            trailer=(
                (f"{prefix}-Screen-Bit", "true"),
                (f"{prefix}-Privacy-Hide-Name", "false"),
                (f"{prefix}-Privacy-Hide-Number", "false"),
            ),
        )
    return names


class Variables:
    """Channel variables with FreeSWITCH's order: setting one moves it to the end, an empty value deletes it."""

    __slots__ = ("_headers", "_items")

    def __init__(self) -> None:
        self._items: dict[str, str] = {}
        # The same, named as event headers (`variable_<name>`), kept in step: channels set variables far
        # less often than they fire events carrying them all.
        self._headers: dict[str, str] = {}

    def set(self, name: str, value: str | None) -> None:
        header = "variable_" + name
        self._items.pop(name, None)
        self._headers.pop(header, None)
        if value:
            self._items[name] = value
            self._headers[header] = value

    def event_pairs(self) -> list[tuple[str, str]]:
        """`variable_<name>` headers, in the variables' order."""
        return list(self._headers.items())

    def set_if_absent(self, name: str, value: str) -> None:
        if name not in self._items:
            self.set(name, value)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._items.get(name, default)

    def items(self) -> list[tuple[str, str]]:
        return list(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items


@dataclass(slots=True)
class Channel:
    """A call leg: its state machine, flags, caller profile, variables and the other leg it is tied to."""

    uuid: str
    name: str
    direction: str
    profile: CallerProfile | None = None
    state: str = "CS_NEW"
    running_state: str = "CS_NEW"
    callstate: str = "DOWN"
    answered: bool = False
    early_media: bool = False
    hangup_cause: str | None = None
    codec: bool = False
    codec_name: str = "PCMU"
    """PCMU on SIP legs; loopback legs run L16 (128 kbit/s), as e04 shows."""
    codec_bits: str = "64000"
    variables: Variables = field(default_factory=Variables)
    other_type: str | None = None
    other_profile: CallerProfile | None = None
    partner: str | None = None
    session_id: int = 0
    hit_dialplan: bool = True
    record_path: str | None = None
    created_us: int = field(default_factory=now_us)
    app_log: list[tuple[str, str]] = field(default_factory=list)
    digits: list[str] = field(default_factory=list)
    """DTMF received and not yet consumed by an application."""
    extension: str = ""
    """The matched dialplan extension's name (for the CDR callflow)."""

    @staticmethod
    def new_uuid() -> str:
        return str(uuidlib.uuid4())

    @property
    def down(self) -> bool:
        return self.hangup_cause is not None

    def basic_data(self, *, skip_hangup_cause: bool = False) -> Pairs:
        """switch_channel_event_set_basic_data."""
        pairs: Pairs = [
            ("Channel-State", self.running_state),
            ("Channel-Call-State", self.callstate),
            ("Channel-State-Number", str(STATE_NUMBERS.get(self.state, 0))),
            ("Channel-Name", self.name),
            ("Unique-ID", self.uuid),
            ("Call-Direction", self.direction),
            ("Presence-Call-Direction", self.direction),
            ("Channel-HIT-Dialplan", "true" if self.direction == "inbound" or self.hit_dialplan else "false"),
        ]
        presence = self.variables.get("presence_id")
        if presence:
            pairs.append(("Channel-Presence-ID", presence))
        pairs.append(("Channel-Call-UUID", self.variables.get("call_uuid") or self.uuid))
        if self.down:
            answer_state = "hangup"
        elif self.answered:
            answer_state = "answered"
        elif self.early_media:
            answer_state = "early"
        else:
            answer_state = "ringing"
        pairs.append(("Answer-State", answer_state))
        if self.hangup_cause and not skip_hangup_cause:
            pairs.append(("Hangup-Cause", self.hangup_cause))
        if self.codec:
            pairs += [
                ("Channel-Read-Codec-Name", self.codec_name),
                ("Channel-Read-Codec-Rate", "8000"),
                ("Channel-Read-Codec-Bit-Rate", self.codec_bits),
                ("Channel-Write-Codec-Name", self.codec_name),
                ("Channel-Write-Codec-Rate", "8000"),
                ("Channel-Write-Codec-Bit-Rate", self.codec_bits),
            ]
        if self.profile is not None:
            pairs += self.profile.headers("Caller")
        if self.other_type and self.other_profile is not None:
            pairs.append(("Other-Type", self.other_type))
            pairs += self.other_profile.headers("Other-Leg", with_index=False)
        return pairs

    def extended_data(self) -> Pairs:
        return self.variables.event_pairs()

    def event_data(self, event_name: str, *, skip_hangup_cause: bool = False) -> Pairs:
        """switch_channel_event_set_data: basic data, plus variables for the events that carry them."""
        pairs = self.basic_data(skip_hangup_cause=skip_hangup_cause)
        if event_name in EXTENDED_EVENTS:
            pairs += self.extended_data()
        return pairs

"""The simulated FreeSWITCH node: channels, events, registrations, dialplan, applications and API commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import struct
import time
import uuid as uuidlib
import wave
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from backend.channels.voice.esl._wire import serialize_json, serialize_plain, url_encode
from backend.channels.voice.simulator._channel import Q850, CallerProfile, Channel, Pairs, now_us
from backend.channels.voice.simulator._config import SimulatorConfig
from backend.channels.voice.simulator._esl import FiredEvent, Listeners, find_unique_id
from backend.channels.voice.simulator._http import HttpResult, post, request
from backend.lib.tasks import cancel_and_wait

if TYPE_CHECKING:
    from backend.channels.voice.simulator._esl import Listener

logger = logging.getLogger("backend.channels.voice.simulator")

FREESWITCH_VERSION = "1.10.12-release git a88d069 2024-08-02 21:02:27Z 64bit"

# The vanilla configuration the captures were made with: 74xx test extensions in context `default`.
STATIC_DIALPLAN = """<document type="freeswitch/xml"><section name="dialplan"><context name="default">
<extension name="fixture_scenario_call"><condition field="destination_number" expression="^7400$">
<action application="answer"/>
<action application="playback" data="tone_stream://%(500,500,440);loops=2"/>
<action application="play_and_get_digits"
 data="1 1 1 5000 # tone_stream://%(200,0,600) silence_stream://250 fixture_digit \\d"/>
<action application="record_session" data="$${recordings_dir}/fixture_${uuid}.wav"/>
<action application="bridge" data="user/1001@${domain_name}"/>
</condition></extension>
<extension name="fixture_outbound_socket"><condition field="destination_number" expression="^740[12]$">
<action application="socket" data="127.0.0.1:8084 async full"/></condition></extension>
<extension name="fixture_bridge_only"><condition field="destination_number" expression="^7403$">
<action application="answer"/><action application="bridge" data="user/1001@${domain_name}"/></condition></extension>
<extension name="fixture_eavesdropper_target"><condition field="destination_number" expression="^7498$">
<action application="answer"/><action application="playback" data="silence_stream://20000"/></condition></extension>
<extension name="fixture_short"><condition field="destination_number" expression="^7499$">
<action application="answer"/><action application="sleep" data="500"/><action application="hangup"/>
</condition></extension>
</context></section></document>"""


SESSION_RUN = ("switch_core_state_machine.c", "switch_core_session_run", 632)


class HungUp(Exception):
    """Raised inside an application when its channel hangs up."""


@dataclass(slots=True)
class Endpoint:
    """A simulated agent phone (SIP or WebRTC) registered as `user@domain`, and how it reacts to calls."""

    user: str
    domain: str
    behaviour: str = "answer"
    """`answer`, `no_answer`, `busy` or `reject`."""
    answer_delay: float | None = None
    transport: str = "udp"
    call_id: str = field(default_factory=lambda: f"{uuidlib.uuid4().hex[:12]}@127.0.0.1")
    contact_port: int = 5090
    user_agent: str = "cc-sim-phone"
    expires_at: int = 0
    hangup_after: float | None = None
    """Hang up this many seconds after answering (scaled); None stays until the other side hangs up."""
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def contact(self) -> str:
        # WebRTC phones register over WSS; their contact says so, as sofia reports it.
        suffix = f";transport={self.transport}" if self.transport in ("ws", "wss") else ""
        return f"sip:{self.user}@127.0.0.1:{self.contact_port}{suffix}"


@dataclass(slots=True)
class Eavesdrop:
    """A running `eavesdrop` (on the eavesdropper's leg): its target and switch_ivr_eavesdrop_session's flags."""

    target: str
    dtmf: bool = True
    """ED_DTMF: keys received on the eavesdropper's channel are commands."""
    mux_read: bool = False
    """ED_MUX_READ: the eavesdropper's audio is mixed into what the target reads (the target's partner hears it)."""
    mux_write: bool = False
    """ED_MUX_WRITE: mixed into what is written to the target (the target hears it)."""
    commands: list[str] = field(default_factory=list)
    """The mode keys applied, in order."""

    def describe(self) -> dict[str, object]:
        return {
            "target": self.target,
            "dtmf": self.dtmf,
            "mux_read": self.mux_read,
            "mux_write": self.mux_write,
            "commands": "".join(self.commands),
        }


@dataclass(slots=True)
class CallLeg:
    """Runtime state of a channel the simulator drives."""

    channel: Channel
    hangup_signal: asyncio.Event = field(default_factory=asyncio.Event)
    dtmf_signal: asyncio.Event = field(default_factory=asyncio.Event)
    private: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    listener: Listener | None = None
    transfer_to: tuple[str, str, str] | None = None
    bridge_done: asyncio.Event = field(default_factory=asyncio.Event)
    torn_down: bool = False
    recording: list[tuple[str, float]] = field(default_factory=list)
    parked_first: bool = True
    private_ready: asyncio.Event = field(default_factory=asyncio.Event)
    deferred_teardown: list[CallLeg] = field(default_factory=list)
    """B-legs that hung up on this leg, torn down once its bridge application has completed."""
    partner_teardown: CallLeg | None = None
    """A bridged b-leg hung up with this leg, reported in FreeSWITCH's interleaved order."""
    break_pending: bool = False
    """CF_BREAK: `uuid_break` asked the current (or, if none runs, the next) playback to stop."""
    break_signal: asyncio.Event = field(default_factory=asyncio.Event)
    masked: set[str] = field(default_factory=set)
    """Recordings masked by `uuid_record mask` (silence is written while masked)."""
    broadcast: asyncio.Task[object] | None = None
    """A looping broadcast (hold music from the partner's `uuid_hold`); `uuid_break` stops it."""
    post_process: list[asyncio.Task[object]] = field(default_factory=list)
    failed_legs: list[tuple[str, str]] = field(default_factory=list)
    """Legs this channel's bridge rang that failed, with their causes (`originate_causes`)."""
    eavesdrop: Eavesdrop | None = None
    """While this leg runs `eavesdrop`: on whom, and in which mode."""
    redirect: asyncio.Event = field(default_factory=asyncio.Event)
    """CF_REDIRECT: `uuid_bridge` takes the leg out of the bridge or application it is in."""
    running_app: str | None = None
    """The application running on the channel now (the innermost, for one run by the `socket` application)."""
    orphaned: bool = False
    """A b-leg whose uuid_bridge ended with it still up: nobody else reports it when it hangs up."""
    uuid_bridge: asyncio.Future[None] | None = None
    """While the leg is in (or being moved into) a `uuid_bridge`: done when that bridge is over."""
    dtmf_sent: list[str] = field(default_factory=list)
    """Keys sent to the leg's endpoint (`uuid_send_dtmf`: outbound, never seen by the leg's applications)."""
    """`record_post_process_exec_api` commands still running (the leg is reported once they are done)."""


def _gmt(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def _local(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S")


class Switch:
    """One simulated FreeSWITCH node.

    Everything observable goes through the real protocols (ESL, xml_curl, json_cdr); the
    Python methods here are the simulated *outside world* (phones, callers, time) plus
    `requests`, a record of what was asked of the switch, for tests to read.
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.core_uuid = str(uuidlib.uuid4())
        self.started = time.time()
        self.sequence = 0
        self.listeners = Listeners()
        self.legs: dict[str, CallLeg] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.far_ends: dict[str, Endpoint] = {}
        """Parties reached through a carrier gateway (`sofia/gateway/<gw>/<number>`), by number; others answer."""
        self.requests: deque[dict[str, object]] = deque(maxlen=self.config.request_log_size)
        """What was asked of the switch lately: ESL commands, xml_curl and CDR requests (for tests)."""
        self.sessions_since_startup = 0
        self.peak_sessions = 0
        self.hash_store: dict[str, str] = {}
        self.global_vars: dict[str, str] = {
            "recordings_dir": self.config.recordings_dir,
            "domain": self.config.domain,
            "domain_name": self.config.domain,
            "hostname": self.config.hostname,
            "local_ip_v4": self.config.ipv4,
        }
        self._tasks: set[asyncio.Task[object]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self.cdr_results: deque[dict[str, object]] = deque(maxlen=self.config.request_log_size)
        self.on_channel_gone: list[Callable[[str], None]] = []
        self.http_cache: dict[str, float] = {}
        """mod_http_cache: URL -> when its cached copy goes stale (monotonic seconds)."""
        self._dates: tuple[int, str, str] = (-1, "", "")

    # ----- lifecycle -----

    def start_heartbeat(self) -> None:
        if self._heartbeat is None and self.config.heartbeat_interval > 0:
            self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="sim-heartbeat")

    async def stop(self) -> None:
        await cancel_and_wait(self._heartbeat)
        for leg in list(self.legs.values()):
            if leg.task is not None:
                leg.task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*[leg.task for leg in self.legs.values() if leg.task], return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for listener in tuple(self.listeners):
            listener.kill()

    def spawn(self, coroutine: Awaitable[object], name: str = "sim") -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def scaled(self, seconds: float) -> float:
        return max(0.0, seconds * self.config.time_scale)

    def record(self, kind: str, **detail: object) -> None:
        self.requests.append({"kind": kind, "at": time.time(), **detail})

    # ----- events -----

    def base_headers(self, name: str, calling: tuple[str, str, int], subclass: str | None = None) -> Pairs:
        self.sequence += 1
        moment = time.time()
        local, gmt = self._event_dates(moment)
        pairs: Pairs = [("Event-Subclass", subclass)] if subclass is not None else []
        pairs.append(("Event-Name", name))
        pairs += self._node_headers
        pairs += (
            ("Event-Date-Local", local),
            ("Event-Date-GMT", gmt),
            ("Event-Date-Timestamp", str(int(moment * 1_000_000))),
            ("Event-Calling-File", calling[0]),
            ("Event-Calling-Function", calling[1]),
            ("Event-Calling-Line-Number", str(calling[2])),
            ("Event-Sequence", str(self.sequence)),
        )
        return pairs

    @property
    def _node_headers(self) -> tuple[tuple[str, str], ...]:
        return (
            ("Core-UUID", self.core_uuid),
            ("FreeSWITCH-Hostname", self.config.hostname),
            ("FreeSWITCH-Switchname", self.config.hostname),
            ("FreeSWITCH-IPv4", self.config.ipv4),
            ("FreeSWITCH-IPv6", "::1"),
        )

    def _event_dates(self, moment: float) -> tuple[str, str]:
        """Event-Date-Local and -GMT, whole seconds: formatted once a second, not once an event."""
        second = int(moment)
        # datetime rounds to the microsecond: this close to the next second it may format that one instead.
        if moment - second >= 0.999999:
            return _local(moment), _gmt(moment)
        if self._dates[0] != second:
            self._dates = (second, _local(moment), _gmt(moment))
        return self._dates[1], self._dates[2]

    def fire(
        self,
        name: str,
        channel: Channel | None = None,
        *,
        calling: tuple[str, str, int],
        pre: Pairs = (),  # type: ignore[assignment]
        post: Pairs = (),  # type: ignore[assignment]
        subclass: str | None = None,
        body: str | None = None,
        skip_hangup_cause: bool = False,
        extended: bool | None = None,
        leading: Pairs = (),  # type: ignore[assignment]
    ) -> None:
        pairs: Pairs = list(leading) + self.base_headers(name, calling, subclass) + list(pre)
        unique_id: str | None = None
        if channel is not None:
            # The event's Unique-ID is the first such header: one in `leading` or `pre` (the base headers have
            # none), else the channel's, which its data carries before any other. Saves a scan of them all.
            unique_id = find_unique_id(leading)
            if unique_id is None:
                unique_id = find_unique_id(pre)
            if unique_id is None:
                unique_id = channel.uuid
            if extended is False:
                pairs += channel.basic_data(skip_hangup_cause=skip_hangup_cause)
            else:
                pairs += channel.event_data(name, skip_hangup_cause=skip_hangup_cause)
        pairs += list(post)
        self.listeners.deliver(name, subclass, FiredEvent(pairs, body, unique_id))

    def fire_custom(self, subclass: str, calling: tuple[str, str, int], pairs: Pairs) -> None:
        self.fire("CUSTOM", calling=calling, subclass=subclass, post=pairs)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            self.fire_heartbeat()

    def fire_heartbeat(self) -> None:
        up = time.time() - self.started
        self.fire(
            "HEARTBEAT",
            calling=("switch_core.c", "send_heartbeat", 95),
            post=[
                ("Event-Info", "System Ready"),
                ("Up-Time", self.uptime_text(up)),
                ("FreeSWITCH-Version", FREESWITCH_VERSION),
                ("Uptime-msec", str(int(up * 1000))),
                ("Session-Count", str(len(self.legs))),
                ("Max-Sessions", str(self.config.max_sessions)),
                ("Session-Per-Sec", "30"),
                ("Session-Per-Sec-Last", "0"),
                ("Session-Per-Sec-Max", "0"),
                ("Session-Per-Sec-FiveMin", "0"),
                ("Session-Since-Startup", str(self.sessions_since_startup)),
                ("Session-Peak-Max", str(self.peak_sessions)),
                ("Session-Peak-FiveMin", str(self.peak_sessions)),
                ("Idle-CPU", "99.000000"),
            ],
        )
        self.fire(
            "RE_SCHEDULE",
            calling=("switch_scheduler.c", "switch_scheduler_execute", 73),
            post=[
                ("Task-ID", "1"),
                ("Task-Desc", "heartbeat"),
                ("Task-Group", "core"),
                ("Task-Runtime", str(int(time.time() + self.config.heartbeat_interval))),
            ],
        )

    @staticmethod
    def uptime_text(seconds: float) -> str:
        whole = int(seconds)
        ms = int((seconds - whole) * 1000)
        us = int((seconds - whole) * 1_000_000) % 1000
        days, rest = divmod(whole, 86400)
        hours, rest = divmod(rest, 3600)
        minutes, secs = divmod(rest, 60)
        minute_word = "minute" if minutes == 1 else "minutes"
        return (
            f"0 years, {days} days, {hours} hours, {minutes} {minute_word}, {secs} seconds, "
            f"{ms} milliseconds, {us} microseconds"
        )

    # ----- channel state helpers (switch_channel.c) -----

    def set_state(self, leg: CallLeg, state: str) -> None:
        channel = leg.channel
        channel.state = state
        channel.running_state = state
        self.fire(
            "CHANNEL_STATE",
            channel,
            calling=("switch_channel.c", "switch_channel_perform_set_running_state", 2747),
        )

    def set_callstate(self, leg: CallLeg, callstate: str) -> None:
        channel = leg.channel
        original = channel.callstate
        channel.callstate = callstate
        numbers = {"DOWN": 0, "DIALING": 1, "RINGING": 2, "EARLY": 3, "ACTIVE": 4, "HELD": 5, "RING_WAIT": 6}
        numbers["HANGUP"] = 7
        self.fire(
            "CHANNEL_CALLSTATE",
            channel,
            calling=("switch_channel.c", "switch_channel_perform_set_callstate", 358),
            pre=[("Original-Channel-Call-State", original), ("Channel-Call-State-Number", str(numbers[callstate]))],
        )

    def presence(self, leg: CallLeg, status: str, info_state: str) -> None:
        channel = leg.channel
        if not channel.variables.get("presence_id"):
            return  # switch_channel_presence needs a presence id (loopback legs have none)
        self.fire(
            "PRESENCE_IN",
            channel,
            calling=("switch_channel.c", "switch_channel_perform_presence", 805),
            post=[
                ("proto", "any"),
                ("login", "src/switch_channel.c"),
                ("from", channel.variables.get("presence_id") or ""),
                ("rpid", "unknown"),
                ("status", status),
                ("event_type", "presence"),
                ("alt_event_type", "dialog"),
                ("presence-call-info-state", info_state),
                ("presence-call-direction", channel.direction),
                ("event_count", "0"),
                ("Presence-Calling-File", "switch_channel.c"),
                ("Presence-Calling-Function", "switch_channel_perform_presence"),
                ("Presence-Calling-Line", "805"),
            ],
        )

    def codec_events(self, leg: CallLeg) -> None:
        channel = leg.channel
        variables = channel.variables
        for name, value in (
            ("read_codec", "PCMU"),
            ("original_read_codec", "PCMU"),
            ("read_rate", "8000"),
            ("original_read_rate", "8000"),
        ):
            variables.set(name, value)
        channel.codec = True
        self.fire(
            "CODEC",
            channel,
            calling=("switch_core_codec.c", "switch_core_session_set_real_read_codec", 244),
            post=[
                ("channel-read-codec-name", "PCMU"),
                ("channel-read-codec-rate", "8000"),
                ("channel-read-codec-bit-rate", "64000"),
            ],
        )
        variables.set("write_codec", "PCMU")
        variables.set("write_rate", "8000")
        self.fire(
            "CODEC",
            channel,
            calling=("switch_core_codec.c", "switch_core_session_set_write_codec", 430),
            post=[
                ("Channel-Write-Codec-Name", "PCMU"),
                ("Channel-Write-Codec-Rate", "8000"),
                ("Channel-Write-codec-bit-rate", "64000"),
            ],
        )

    def mark_answered(self, leg: CallLeg) -> None:
        """answer: media (CODEC), PROGRESS_MEDIA for an inbound leg, then ANSWER, as a08 shows."""
        channel = leg.channel
        if channel.answered or channel.down:
            return
        profile = channel.profile
        stamp = now_us()
        if not channel.codec:
            self.codec_events(leg)
        if channel.direction == "inbound" and not channel.early_media:
            channel.early_media = True
            if profile:
                profile.progress_media = stamp
            channel.variables.set("endpoint_disposition", "EARLY MEDIA")
            self.fire(
                "CHANNEL_PROGRESS_MEDIA",
                channel,
                calling=("switch_channel.c", "switch_channel_perform_mark_pre_answered", 3765),
            )
            self.set_callstate(leg, "EARLY")
        channel.answered = True
        if profile:
            profile.answered = stamp
        channel.variables.set("endpoint_disposition", "ANSWER")
        self.fire("CHANNEL_ANSWER", channel, calling=("switch_channel.c", "switch_channel_perform_mark_answered", 3998))
        self.presence(leg, "Answered", "active")
        self.set_callstate(leg, "ACTIVE")

    # ----- creating channels -----

    def new_leg(
        self,
        *,
        name: str,
        direction: str,
        caller_id_name: str,
        caller_id_number: str,
        destination: str,
        username: str = "",
        context: str = "default",
        uuid: str | None = None,
        source: str = "mod_sofia",
    ) -> CallLeg:
        channel_uuid = uuid or Channel.new_uuid()
        self.sessions_since_startup += 1
        channel = Channel(channel_uuid, name, direction, session_id=self.sessions_since_startup)
        channel.hit_dialplan = direction == "inbound"
        stamp = now_us()
        channel.profile = CallerProfile(
            username=username,
            caller_id_name=caller_id_name,
            caller_id_number=caller_id_number,
            destination_number=destination,
            uuid=channel_uuid,
            channel_name=name,
            direction=direction,
            context=context,
            source=source,
            profile_created=stamp,
            created=stamp,
        )
        leg = CallLeg(channel)
        self.legs[channel_uuid] = leg
        self.peak_sessions = max(self.peak_sessions, len(self.legs))
        return leg

    def find(self, uuid: str) -> CallLeg | None:
        return self.legs.get(uuid)

    # ----- variable expansion -----

    def expand(self, leg: CallLeg | None, text: str) -> str:
        """${var}, $${global} and ${api(args)} as switch_channel_expand_variables does (API events included)."""
        text = re.sub(r"\$\$\{([^}]+)\}", lambda m: self.global_vars.get(m.group(1), ""), text)

        def replace(match: re.Match[str]) -> str:
            inner = match.group(1)
            call = re.fullmatch(r"([\w]+)\((.*)\)", inner, re.DOTALL)
            if call:
                return self.inline_api(call.group(1), call.group(2), leg)
            if leg is None:
                return ""
            return self.channel_variable(leg, inner)

        previous = None
        while previous != text and "${" in text:
            previous = text
            text = re.sub(r"\$\{((?:[^{}]|\{[^{}]*\})+)\}", replace, text, count=1)
        return text

    def channel_variable(self, leg: CallLeg, name: str) -> str:
        channel = leg.channel
        profile = channel.profile
        special = {
            "uuid": channel.uuid,
            "channel_name": channel.name,
            "destination_number": profile.destination_number if profile else "",
            "caller_id_number": profile.caller_id_number if profile else "",
            "caller_id_name": profile.caller_id_name if profile else "",
            "context": profile.context if profile else "",
        }
        value = channel.variables.get(name)
        if value is None:
            value = special.get(name) or self.global_vars.get(name, "")
        return value

    def inline_api(self, command: str, argument: str, leg: CallLeg | None) -> str:
        argument = self.expand(leg, argument)
        self.fire(
            "API",
            calling=("switch_loadable_module.c", "switch_api_execute", 2954),
            post=[("API-Command", command), ("API-Command-Argument", argument)],
        )
        if command == "strftime":
            fmt = argument.replace("%T", "%H:%M:%S")
            return datetime.now(UTC).strftime(fmt)
        if command == "sofia_contact":
            user = argument.split("/")[-1]
            endpoint = self.endpoints.get(user)
            return f"sofia/internal/{endpoint.contact}" if endpoint else "error/user_not_registered"
        return ""

    # ----- media over HTTP (mod_http_cache) -----

    async def open_media(self, path: str) -> bool:
        """Open a file string for playing: each `http_cache://` part is fetched (or served from the cache)."""
        parts = path[len("file_string://") :].split("!") if path.startswith("file_string://") else [path]
        for raw in parts:
            part = raw.strip()
            if part.startswith("{"):
                part = part[part.find("}") + 1 :]
            if part.startswith("http_cache://") and not await self.http_cache_get(part[len("http_cache://") :]):
                return False
        return True

    async def http_cache_get(self, url: str) -> bool:
        """mod_http_cache: GET the URL unless a fresh copy is cached; `Cache-Control: max-age` sets freshness."""
        if self.http_cache.get(url, 0.0) > time.monotonic():
            return True
        result = await request(
            "GET",
            url,
            headers=list(self.config.http_cache_headers),
            user_agent="freeswitch-http-cache/1.0",
            timeout=self.config.http_timeout,
        )
        self.record("http_cache", method="GET", url=url, status=result.status, size=len(result.body))
        if result.status != 200:
            logger.error("Received HTTP error %d trying to fetch %s", result.status, url)
            return False
        max_age = 86400.0
        for name, value in result.headers:
            if name.lower() == "cache-control":
                found = re.search(r"max-age=(\d+)", value)
                if found:
                    max_age = float(found.group(1))
        self.http_cache[url] = time.monotonic() + max_age
        return True

    async def http_put(self, url: str, path: str) -> HttpResult:
        """mod_http_cache's `http_put`: the file's bytes PUT to the URL with the profile's headers."""
        try:
            body = await asyncio.to_thread(Path(path).read_bytes)
        except OSError as error:
            logger.error("fopen() error: %s", error)
            return HttpResult(0, error=str(error))
        mime = "audio/x-wav" if path.endswith(".wav") else "audio/mpeg" if path.endswith(".mp3") else ""
        headers = [("Content-Type", mime or "application/octet-stream"), *self.config.http_cache_headers]
        result = await request(
            "PUT",
            url,
            body=body,
            headers=headers,
            user_agent="freeswitch-http-cache/1.0",
            timeout=self.config.http_timeout,
        )
        self.record("http_cache", method="PUT", url=url, status=result.status, size=len(body), path=path)
        return result

    # ----- registrations (simulated phones) -----

    async def register(self, endpoint: Endpoint) -> bool:
        """A phone REGISTERs: digest auth is checked against the directory fetched over xml_curl."""
        key = f"{endpoint.user}@{endpoint.domain}"
        reg_pairs: Pairs = [
            ("profile-name", "internal"),
            ("from-user", endpoint.user),
            ("from-host", endpoint.domain),
            ("contact", f'"" <{endpoint.contact}>'),
            ("call-id", endpoint.call_id),
            ("rpid", "unknown"),
            ("status", f"Registered({endpoint.transport.upper()})"),
            ("expires", str(self.config.registration_expires)),
            ("to-user", endpoint.user),
            ("to-host", endpoint.domain),
            ("network-ip", "127.0.0.1"),
            ("network-port", str(endpoint.contact_port)),
        ]
        calling = ("sofia_reg.c", "sofia_reg_handle_register_token", 1810)
        self.fire_custom("sofia::pre_register", calling, [*reg_pairs, ("user-agent", endpoint.user_agent)])
        user_vars = await self.directory_user(endpoint, action="sip_auth", method="REGISTER")
        attempt = [
            *reg_pairs,
            ("username", endpoint.user),
            ("realm", endpoint.domain),
            ("user-agent", endpoint.user_agent),
        ]
        if user_vars is None:
            self.fire_custom(
                "sofia::register_attempt",
                ("sofia_reg.c", "sofia_reg_handle_register_token", 1606),
                [*attempt, ("auth-result", "FORBIDDEN")],
            )
            self.fire_custom(
                "sofia::register_failure",
                ("sofia_reg.c", "sofia_reg_handle_register_token", 1622),
                [*attempt, ("registration-type", "authentication")],
            )
            return False
        self.fire_custom(
            "sofia::register_attempt",
            ("sofia_reg.c", "sofia_reg_handle_register_token", 1606),
            [*attempt, ("auth-result", "RENEWED")],
        )
        endpoint.variables = user_vars
        endpoint.expires_at = int(time.time()) + self.config.registration_expires
        self.endpoints[endpoint.user] = endpoint
        self.endpoints[key] = endpoint
        register = [
            ("profile-name", "internal"),
            ("from-user", endpoint.user),
            ("from-host", endpoint.domain),
            ("presence-hosts", f"{endpoint.domain},{endpoint.domain}"),
            *reg_pairs[3:],
            ("username", endpoint.user),
            ("realm", endpoint.domain),
            ("user-agent", endpoint.user_agent),
            ("sip_number_alias", endpoint.user),
            ("sip_auth_username", endpoint.user),
            ("sip_auth_realm", endpoint.domain),
            ("number_alias", endpoint.user),
            ("user_name", endpoint.user),
            ("domain_name", endpoint.domain),
            *user_vars.items(),
        ]
        self.fire_custom("sofia::register", ("sofia_reg.c", "sofia_reg_handle_register_token", 2059), register)
        self.spawn(self.directory_user(endpoint, action="message-count"), "message-count")
        return True

    def far_end(
        self,
        number: str,
        behaviour: str = "answer",
        *,
        answer_delay: float | None = None,
        hangup_after: float | None = None,
    ) -> Endpoint:
        """How the outside party at `number` reacts to calls through a gateway: `answer`, `no_answer`, `busy`,
        `reject` or `unallocated` (the carrier answers 404: UNALLOCATED_NUMBER)."""
        party = Endpoint(number, "pstn", behaviour=behaviour, answer_delay=answer_delay, hangup_after=hangup_after)
        self.far_ends[number] = party
        return party

    def unregister(self, user: str) -> bool:
        endpoint = self.endpoints.pop(user, None)
        if endpoint is None:
            return False
        self.endpoints.pop(f"{endpoint.user}@{endpoint.domain}", None)
        self.fire(
            "PRESENCE_IN",
            calling=("sofia_reg.c", "sofia_reg_handle_register_token", 2103),
            post=[
                ("proto", "sip"),
                ("rpid", "unknown"),
                ("login", f"sip:mod_sofia@{self.config.ipv4}:{self.config.sip_port}"),
                ("user-agent", endpoint.user_agent),
                ("from", f"{endpoint.user}@{endpoint.domain}"),
                ("status", "Unregistered"),
                ("presence-source", "register"),
                ("event_type", "presence"),
            ],
        )
        self.fire_custom(
            "sofia::unregister",
            ("sofia_reg.c", "sofia_reg_handle_register_token", 2213),
            [
                ("profile-name", "internal"),
                ("username", endpoint.user),
                ("from-user", endpoint.user),
                ("from-host", endpoint.domain),
                ("contact", f'"" <{endpoint.contact}>'),
                ("call-id", endpoint.call_id),
                ("rpid", "unknown"),
                ("realm", endpoint.domain),
                ("network-ip", "127.0.0.1"),
                ("network-port", str(endpoint.contact_port)),
                ("user-agent", endpoint.user_agent),
                ("expires", "0"),
                ("sip_number_alias", endpoint.user),
                ("sip_auth_username", endpoint.user),
                ("sip_auth_realm", endpoint.domain),
                ("number_alias", endpoint.user),
                ("user_name", endpoint.user),
                ("domain_name", endpoint.domain),
                *endpoint.variables.items(),
            ],
        )
        return True

    # ----- xml_curl -----

    def request_params(self, calling: tuple[str, str, int], extra: Pairs, name: str = "REQUEST_PARAMS") -> Pairs:
        return self.base_headers(name, calling) + extra

    async def xml_fetch(self, section: str, tag: str, key: str, value: str, params: Pairs) -> str | None:
        """POST an xml_curl request with FreeSWITCH's fields in its order; None when FreeSWITCH would fall back."""
        config = self.config
        per_section = {"directory": config.xml_curl_directory_url, "dialplan": config.xml_curl_dialplan_url}
        url = per_section.get(section) or config.xml_curl_url
        if not url:
            return None
        fields = [
            ("hostname", self.config.hostname),
            ("section", section),
            ("tag_name", tag),
            ("key_name", key),
            ("key_value", value),
            *params,
        ]
        body = "&".join(f"{name}={url_encode(val)}" for name, val in fields).encode()
        self.record("xml_curl", section=section, fields=fields)
        result = await post(
            url,
            body,
            content_type="application/x-www-form-urlencoded",
            user_agent="freeswitch-xml/1.0",
            timeout=self.config.xml_curl_timeout,
            credentials=self.config.xml_curl_credentials,
        )
        if result.status != 200:
            if result.status == 0:
                logger.warning("mod_xml_curl.c:298 CURL returned error:[28] %s", result.error)
            logger.error("mod_xml_curl.c:319 Received HTTP error %d trying to fetch %s", result.status, url)
            return None
        return result.body.decode("utf-8", errors="replace")

    async def directory_user(
        self,
        endpoint: Endpoint,
        *,
        action: str,
        method: str = "REGISTER",
        invite_to: str | None = None,
        exported: Pairs = (),  # type: ignore[assignment]
    ) -> dict[str, str] | None:
        """Look a user up in the directory (xml_curl, else the endpoint's own password) and check its digest."""
        domain = endpoint.domain
        if action == "sip_auth":
            extra: Pairs = [
                ("action", "sip_auth"),
                ("sip_profile", "internal"),
                ("sip_user_agent", endpoint.user_agent),
                ("sip_auth_username", endpoint.user),
                ("sip_auth_realm", domain),
                ("sip_auth_nonce", str(uuidlib.uuid4())),
                ("sip_auth_uri", f"sip:{domain}:{self.config.sip_port}"),
                ("sip_contact_user", endpoint.user),
                ("sip_contact_host", "127.0.0.1"),
                ("sip_to_user", invite_to or endpoint.user),
                ("sip_to_host", domain),
                *([("sip_to_port", str(self.config.sip_port))] if invite_to else []),
                ("sip_via_protocol", endpoint.transport),
                ("sip_from_user", endpoint.user),
                ("sip_from_host", domain),
                ("sip_call_id", endpoint.call_id),
                *([("sip_request_user", invite_to)] if invite_to else []),
                ("sip_request_host", domain),
                ("sip_request_port", str(self.config.sip_port)),
                ("sip_auth_qop", "auth"),
                ("sip_auth_cnonce", "6b8b4567"),
                ("sip_auth_nc", "00000001"),
                ("sip_auth_response", "0" * 32),
                ("sip_auth_method", method),
                ("client_port", str(endpoint.contact_port)),
                ("key", "id"),
                ("user", endpoint.user),
                ("domain", domain),
                ("ip", "127.0.0.1"),
            ]
            params = self.request_params(("sofia_reg.c", "sofia_reg_parse_auth", 3124), extra)
        elif action == "message-count":
            extra = [("action", "message-count"), ("key", "id"), ("user", endpoint.user), ("domain", domain)]
            params = self.request_params(("mod_voicemail.c", "resolve_id", 1363), extra, "GENERAL")
        else:
            extra = [("as_channel", "true"), ("action", "user_call"), *exported, ("key", "id")]
            extra += [("user", endpoint.user), ("domain", domain)]
            params = self.request_params(("mod_dptools.c", "user_outgoing_channel", 4366), extra)
        document = await self.xml_fetch("directory", "domain", "name", domain, params)
        if action != "sip_auth":
            return {}
        if document is None:
            # No directory answer: the static directory has no such user (the vanilla 1000-1019 are removed).
            bound = self.config.xml_curl_url or self.config.xml_curl_directory_url
            return None if bound else {"user_context": "default"}
        return parse_directory_user(document, endpoint.user)

    async def dialplan(self, leg: CallLeg) -> tuple[str, list[tuple[str, str]]] | None:
        """The extension for a call: xml_curl dialplan request, else the static dialplan."""
        channel = leg.channel
        profile = channel.profile
        assert profile is not None
        params = self.request_params(
            ("mod_dialplan_xml.c", "dialplan_xml_locate", 610),
            channel.event_data("REQUEST_PARAMS") + profile.headers("Hunt"),
        )
        document = await self.xml_fetch("dialplan", "", "", "", params)
        found = match_dialplan(document, profile.context, profile.destination_number, leg, self) if document else None
        if found is None:
            found = match_dialplan(STATIC_DIALPLAN, profile.context, profile.destination_number, leg, self)
        return found

    # ----- calls from the outside world -----

    async def place_call(
        self,
        destination: str,
        *,
        caller_number: str = "15550100",
        caller_name: str = "Caller",
        from_user: str | None = None,
        domain: str | None = None,
        uuid: str | None = None,
        context: str | None = None,
    ) -> str:
        """A caller's INVITE arrives; returns the new inbound channel's uuid (the call runs in the background).

        With `from_user` the caller is a registered user who authenticates (like sipp's 1000
        in the captures, context `default`); without, it is a trunk call to a DID (context `public`).
        """
        domain = domain or self.config.domain
        number = from_user or caller_number
        name = f"sofia/internal/{number}@{domain}"
        leg = self.new_leg(
            name=name,
            direction="inbound",
            caller_id_name=caller_name,
            caller_id_number=number,
            destination=destination,
            username=from_user or "",
            context=context or ("default" if from_user else "public"),
            uuid=uuid,
        )
        channel = leg.channel
        profile = channel.profile
        channel.profile = None  # CS_NEW: no caller profile yet (a08's first CHANNEL_STATE)
        self.set_state(leg, "CS_NEW")
        channel.profile = profile
        self.seed_sofia_variables(leg, number, domain, destination)
        if from_user:
            # As captured (a08): for an INVITE's digest check sofia reports from-user and to-user swapped.
            auth_pairs: Pairs = [
                ("profile-name", "internal"),
                ("from-user", destination),
                ("from-host", domain),
                ("contact", f'"" <sip:{from_user}@127.0.0.1:5070>'),
                ("call-id", channel.variables.get("sip_call_id") or ""),
                ("rpid", "unknown"),
                ("status", "Registered(UDP)"),
                ("expires", "300"),
                ("to-user", from_user),
                ("to-host", domain),
                ("network-ip", "127.0.0.1"),
                ("network-port", "5070"),
            ]
            calling = ("sofia_reg.c", "sofia_reg_handle_register_token", 1810)
            self.fire_custom("sofia::pre_register", calling, [*auth_pairs, ("user-agent", "cc-sim-caller")])
            self.fire_custom(
                "sofia::register_attempt",
                ("sofia_reg.c", "sofia_reg_handle_register_token", 1606),
                [
                    *auth_pairs,
                    ("username", from_user),
                    ("realm", domain),
                    ("user-agent", "cc-sim-caller"),
                    ("auth-result", "RENEWED"),
                ],
            )
            endpoint = Endpoint(from_user, domain, call_id=channel.variables.get("sip_call_id") or "")
            user_vars = await self.directory_user(endpoint, action="sip_auth", method="INVITE", invite_to=destination)
            if user_vars is None:
                await self.hangup(leg, "CALL_REJECTED")
                leg.task = asyncio.create_task(self.teardown(leg), name=f"rejected-{channel.uuid}")
                return channel.uuid
            # What sofia keeps of a successful digest check (sofia_reg_parse_auth).
            for key, value in (
                ("sip_number_alias", from_user),
                ("sip_auth_username", from_user),
                ("sip_auth_realm", domain),
                ("number_alias", from_user),
                ("requested_user_name", from_user),
                ("requested_domain_name", domain),
                *user_vars.items(),
                ("user_name", from_user),
                ("domain_name", domain),
            ):
                channel.variables.set(key, value)
        leg.task = asyncio.create_task(self.run_inbound(leg), name=f"call-{channel.uuid}")
        return channel.uuid

    def seed_sofia_variables(self, leg: CallLeg, number: str, domain: str, destination: str) -> None:
        """The variables sofia sets on an inbound INVITE, in its order (see the captures' CHANNEL_CREATE)."""
        channel = leg.channel
        v = channel.variables
        call_id = f"{uuidlib.uuid4().hex[:10]}@127.0.0.1"
        stamp = str(now_us())
        for name, value in (
            ("direction", "inbound"),
            ("uuid", channel.uuid),
            ("session_id", str(channel.session_id)),
            ("sip_from_user", number),
            ("sip_from_uri", f"{number}@{domain}"),
            ("sip_from_host", domain),
            ("video_media_flow", "disabled"),
            ("audio_media_flow", "disabled"),
            ("text_media_flow", "disabled"),
            ("channel_name", channel.name),
            ("sip_call_id", call_id),
            ("sip_local_network_addr", self.config.ipv4),
            ("sip_network_ip", "127.0.0.1"),
            ("sip_network_port", "5070"),
            ("sip_invite_stamp", stamp),
            ("sip_received_ip", "127.0.0.1"),
            ("sip_received_port", "5070"),
            ("sip_via_protocol", "udp"),
            ("sip_from_user_stripped", number),
            ("sip_from_tag", uuidlib.uuid4().hex[:12]),
            ("sofia_profile_name", "internal"),
            ("sofia_profile_url", f"sip:mod_sofia@{self.config.ipv4}:{self.config.sip_port}"),
            ("recovery_profile_name", "internal"),
            ("sip_full_via", f"SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{uuidlib.uuid4().hex[:8]}"),
            ("sip_from_display", leg.channel.profile.caller_id_name if leg.channel.profile else ""),
            ("sip_full_from", f"<sip:{number}@{domain}>;tag=1"),
            ("sip_full_to", f"<sip:{destination}@{domain}:{self.config.sip_port}>"),
            ("sip_req_user", destination),
            ("sip_req_port", str(self.config.sip_port)),
            ("sip_req_uri", f"{destination}@{domain}:{self.config.sip_port}"),
            ("sip_req_host", domain),
            ("sip_to_user", destination),
            ("sip_to_port", str(self.config.sip_port)),
            ("sip_to_uri", f"{destination}@{domain}:{self.config.sip_port}"),
            ("sip_to_host", domain),
            ("sip_contact_user", number),
            ("sip_contact_port", "5070"),
            ("sip_contact_uri", f"{number}@127.0.0.1:5070"),
            ("sip_contact_host", "127.0.0.1"),
            ("rtp_use_codec_string", "OPUS,G722,PCMU,PCMA"),
            ("sip_via_host", "127.0.0.1"),
            ("sip_via_port", "5070"),
            ("max_forwards", "70"),
            ("presence_id", f"{number}@{domain}"),
            ("switch_r_sdp", "v=0\r\no=caller 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"),
            ("ep_codec_string", "CORE_PCM_MODULE.PCMU@8000h@20i@64000b"),
            ("endpoint_disposition", "DELAYED NEGOTIATION"),
        ):
            v.set(name, value)
        v.set("call_uuid", channel.uuid)

    async def run_inbound(self, leg: CallLeg) -> None:
        """The inbound call's state machine: routing, executing the extension, hangup and reporting."""
        channel = leg.channel
        try:
            self.set_state(leg, "CS_INIT")
            self.fire("CHANNEL_CREATE", channel, calling=SESSION_RUN)
            self.set_callstate(leg, "RINGING")
            self.set_state(leg, "CS_ROUTING")
            while True:
                found = await self.dialplan(leg)
                self.presence(leg, "CS_ROUTING", "alerting")
                if found is None:
                    self.set_state(leg, "CS_EXECUTE")
                    await self.hangup(leg, "NO_ROUTE_DESTINATION")
                    break
                channel.extension, actions = found
                channel.variables.set("call_uuid", channel.uuid)
                if channel.state != "CS_EXECUTE":
                    self.set_state(leg, "CS_EXECUTE")
                from backend.channels.voice.simulator._apps import run_extension

                await run_extension(self, leg, actions)
                if leg.transfer_to is None or channel.down:
                    break
                destination, _dialplan, context = leg.transfer_to
                leg.transfer_to = None
                assert channel.profile is not None
                channel.profile.destination_number = destination
                channel.profile.context = context
                channel.profile.transfer = now_us()
                self.set_state(leg, "CS_ROUTING")
            if not channel.down:
                await self.hangup(leg, "NORMAL_CLEARING")
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("simulated call %s failed", channel.uuid)
            if not channel.down:
                await self.hangup(leg, "NORMAL_TEMPORARY_FAILURE")
        finally:
            await self.teardown(leg)

    # ----- hangup and teardown -----

    async def hangup(self, leg: CallLeg, cause: str = "NORMAL_CLEARING") -> None:
        """switch_channel_perform_hangup: CHANNEL_HANGUP now; the state machine reports and destroys later."""
        channel = leg.channel
        if channel.down:
            return
        channel.hangup_cause = cause
        if channel.profile:
            channel.profile.hangup = now_us()
        channel.variables.set("hangup_cause", cause)
        channel.variables.set("hangup_cause_q850", str(Q850.get(cause, 16)))
        self.fire("CHANNEL_HANGUP", channel, calling=("switch_channel.c", "switch_channel_perform_hangup", 3487))
        leg.hangup_signal.set()
        leg.dtmf_signal.set()
        if leg.orphaned and leg.uuid_bridge is None:
            self.spawn(self.teardown(leg), "orphan-teardown")

    async def teardown(self, leg: CallLeg) -> None:
        """CS_HANGUP, RECORD_STOP, CS_REPORTING, HANGUP_COMPLETE, the CDR, DESTROY (once per leg).

        A b-leg that went down with its bridged caller is reported between the caller's
        CS_HANGUP and its RECORD_STOP, and completed first, as the a08 capture shows.
        """
        if leg.torn_down:
            return
        leg.torn_down = True
        for other in leg.deferred_teardown:
            await self.teardown(other)
        leg.deferred_teardown.clear()
        partner = leg.partner_teardown
        if partner is not None:
            if partner.torn_down:
                partner = None
            else:
                partner.torn_down = True
        if not leg.channel.down:
            await self.hangup(leg, "NORMAL_CLEARING")
        if leg.channel.state != "CS_HANGUP":
            self.set_state(leg, "CS_HANGUP")
        if partner is not None:
            self._report(partner)
        self._report(leg)
        # record_post_process_exec_api runs as the recording closes, before the leg is reported.
        for closing in (partner, leg):
            while closing is not None and closing.post_process:
                with contextlib.suppress(Exception):
                    await closing.post_process.pop(0)
        if partner is not None:
            self._complete(partner)
        self._complete(leg)

    def _report(self, leg: CallLeg) -> None:
        if leg.channel.state != "CS_HANGUP":
            self.set_state(leg, "CS_HANGUP")
        self.stop_recordings(leg)
        if leg.channel.callstate != "HANGUP":
            self.set_callstate(leg, "HANGUP")
        self.presence(leg, "CS_HANGUP", "terminated")
        self.set_state(leg, "CS_REPORTING")

    def _complete(self, leg: CallLeg) -> None:
        channel = leg.channel
        self.fill_cdr_variables(leg)
        self.fire(
            "CHANNEL_HANGUP_COMPLETE",
            channel,
            calling=("switch_core_state_machine.c", "switch_core_session_reporting_state", 943),
            pre=[("Hangup-Cause", channel.hangup_cause or "NORMAL_CLEARING")],
        )
        if leg.listener is not None:
            leg.listener.channel_down()
        from backend.channels.voice.simulator._cdr import deliver_cdr

        if self.config.cdr_url and (channel.direction == "inbound" or self.config.cdr_log_b_leg):
            self.spawn(deliver_cdr(self, leg), "json-cdr")
        self.fire(
            "CHANNEL_DESTROY", channel, calling=("switch_core_session.c", "switch_core_session_perform_destroy", 1700)
        )
        self.set_state(leg, "CS_DESTROY")
        self.legs.pop(channel.uuid, None)
        for callback in self.on_channel_gone:
            callback(channel.uuid)

    def stop_recordings(self, leg: CallLeg) -> None:
        channel = leg.channel
        for path, started in leg.recording:
            seconds = max(0.0, time.time() - started)
            size = write_wav(Path(path), seconds / max(self.config.time_scale, 1e-6) if seconds else 0.0)
            leg.masked.discard(path)
            samples = int(seconds * 8000)
            for name, value in (
                ("record_file_size", str(size)),
                ("record_samples", str(samples)),
                ("record_seconds", str(int(seconds))),
                ("record_ms", str(int(seconds * 1000))),
                ("record_completion_cause", "success-silence"),
            ):
                channel.variables.set(name, value)
            self.fire(
                "RECORD_STOP",
                channel,
                calling=("switch_ivr_async.c", "send_record_stop_event", 1240),
                post=[("Record-File-Path", path), ("Record-Completion-Cause", "success-silence")],
            )
            self.fire(
                "MEDIA_BUG_STOP",
                channel,
                calling=("switch_core_media_bug.c", "switch_core_media_bug_destroy", 1287),
                pre=[("Media-Bug-Function", "session_record"), ("Media-Bug-Target", path)],
            )
            self.post_process_recording(leg)
        leg.recording.clear()

    def post_process_recording(self, leg: CallLeg) -> None:
        """record_helper_post_process: `record_post_process_exec_api=<api>:<args>` runs once the file is closed."""
        setting = leg.channel.variables.get("record_post_process_exec_api")
        if not setting:
            return
        command, _, argument = setting.partition(":")
        from backend.channels.voice.simulator._api import execute_api

        expanded = self.expand(leg, argument)
        leg.post_process.append(self.spawn(execute_api(self, command.strip(), expanded), "record-post-process"))

    def fill_cdr_variables(self, leg: CallLeg) -> None:
        """The *_stamp, *_epoch, duration and billsec variables switch_channel_set_timestamps computes."""
        channel = leg.channel
        profile = channel.profile
        if profile is None:
            return
        v = channel.variables
        end = profile.hangup or now_us()
        start = profile.created
        answer = profile.answered
        v.set("digits_dialed", "none")

        def stamp(us: int) -> str:
            return _local(us / 1_000_000) if us else ""

        for name, value in (("start", start), ("profile_start", profile.profile_created), ("answer", answer)):
            v.set(f"{name}_stamp", stamp(value))
        if profile.bridged:
            v.set("bridge_stamp", stamp(profile.bridged))
        if profile.progress:
            v.set("progress_stamp", stamp(profile.progress))
        if profile.progress_media:
            v.set("progress_media_stamp", stamp(profile.progress_media))
        v.set("end_stamp", stamp(end))
        for name, value in (
            ("start", start),
            ("profile_start", profile.profile_created),
            ("answer", answer),
            ("bridge", profile.bridged),
            ("last_hold", profile.last_hold),
        ):
            v.set(f"{name}_epoch", str(value // 1_000_000))
            v.set(f"{name}_uepoch", str(value))
        v.set("hold_accum_seconds", "0")
        v.set("hold_accum_usec", "0")
        v.set("hold_accum_ms", "0")
        for name, value in (
            ("resurrect", profile.resurrect),
            ("progress", profile.progress),
            ("progress_media", profile.progress_media),
            ("end", end),
        ):
            v.set(f"{name}_epoch", str(value // 1_000_000))
            v.set(f"{name}_uepoch", str(value))
        if channel.app_log:
            v.set("last_app", channel.app_log[-1][0])
            v.set("last_arg", channel.app_log[-1][1])
        v.set("caller_id", f'"{profile.caller_id_name}" <{profile.caller_id_number}>')
        duration = end - start
        billing = end - answer if answer else 0
        progress = (profile.progress - start) if profile.progress else 0
        answer_wait = (answer - start) if answer else 0
        media = (profile.progress_media - start) if profile.progress_media else 0
        for unit, divisor in (("sec", 1_000_000), ("msec", 1000), ("usec", 1)):
            prefix = {"sec": "", "msec": "m", "usec": "u"}[unit]
            v.set(f"{prefix}duration", str(duration // divisor))
            v.set(f"bill{unit}", str(billing // divisor))
            v.set(f"progress{unit}", str(progress // divisor))
            v.set(f"answer{unit}", str(answer_wait // divisor))
            v.set(f"wait{unit}", str(answer_wait // divisor))
            v.set(f"progress_media{unit}", str(media // divisor))
            v.set(f"flow_bill{unit}", str(duration // divisor))

    # ----- DTMF from the caller -----

    def press(self, uuid: str, digits: str, source: str = "RTP") -> bool:
        """The caller presses keys: RFC 2833 (`RTP`) or SIP INFO (`INFO`, a RECV_INFO then DTMF from ENDPOINT)."""
        leg = self.legs.get(uuid)
        if leg is None or leg.channel.down:
            return False
        channel = leg.channel
        for digit in digits:
            if source.upper() == "INFO":
                profile = channel.profile
                self.fire(
                    "RECV_INFO",
                    channel,
                    calling=("sofia.c", "create_info_event", 9721),
                    pre=[
                        ("SIP-Content-Type", "application/dtmf-relay"),
                        ("SIP-From-User", profile.caller_id_number if profile else ""),
                        ("SIP-From-Host", self.config.domain),
                        ("SIP-To-User", profile.destination_number if profile else ""),
                        ("SIP-To-Host", self.config.domain),
                        ("SIP-Contact-User", profile.caller_id_number if profile else ""),
                        ("SIP-Contact-Host", "127.0.0.1"),
                    ],
                    body=f"Signal={digit}\r\nDuration=160\r\n",
                )
                dtmf_source, duration = "ENDPOINT", "1280"
            else:
                dtmf_source, duration = "RTP", "2240"
            self.fire(
                "DTMF",
                channel,
                calling=("switch_channel.c", "switch_channel_dequeue_dtmf", 677),
                post=[("DTMF-Digit", digit), ("DTMF-Duration", duration), ("DTMF-Source", dtmf_source)],
            )
            channel.digits.append(digit)
        leg.dtmf_signal.set()
        return True

    async def caller_hangup(self, uuid: str, cause: str = "NORMAL_CLEARING") -> bool:
        """The caller hangs up (BYE, or CANCEL before answer: ORIGINATOR_CANCEL)."""
        leg = self.legs.get(uuid)
        if leg is None:
            return False
        if not leg.channel.answered and cause == "NORMAL_CLEARING":
            cause = "ORIGINATOR_CANCEL"
        await self.hangup(leg, cause)
        return True

    # ----- status reports -----

    def show_channels(self) -> dict[str, object]:
        rows = []
        for leg in self.legs.values():
            channel = leg.channel
            profile = channel.profile
            if profile is None:
                continue
            rows.append(
                {
                    "uuid": channel.uuid,
                    "direction": channel.direction,
                    "created": _local(channel.created_us / 1_000_000),
                    "created_epoch": str(channel.created_us // 1_000_000),
                    "name": channel.name,
                    "state": channel.state,
                    "cid_name": profile.caller_id_name,
                    "cid_num": profile.caller_id_number,
                    "ip_addr": profile.network_addr,
                    "dest": profile.destination_number,
                    "application": channel.variables.get("current_application") or "",
                    "application_data": channel.variables.get("current_application_data") or "",
                    "dialplan": profile.dialplan,
                    "context": profile.context,
                    "read_codec": "PCMU" if channel.codec else "",
                    "read_rate": "8000" if channel.codec else "",
                    "read_bit_rate": "64000" if channel.codec else "",
                    "write_codec": "PCMU" if channel.codec else "",
                    "write_rate": "8000" if channel.codec else "",
                    "write_bit_rate": "64000" if channel.codec else "",
                    "secure": "",
                    "hostname": self.config.hostname,
                    "presence_id": channel.variables.get("presence_id") or "",
                    "presence_data": "",
                    "accountcode": "",
                    "callstate": channel.callstate,
                    "callee_name": profile.callee_id_name or "",
                    "callee_num": profile.callee_id_number or "",
                    "callee_direction": "SEND" if profile.callee_id_name else "",
                    "call_uuid": channel.variables.get("call_uuid") or channel.uuid,
                    "sent_callee_name": profile.callee_id_name or "",
                    "sent_callee_num": profile.callee_id_number or "",
                    "initial_cid_name": profile.caller_id_name,
                    "initial_cid_num": profile.caller_id_number,
                    "initial_ip_addr": profile.network_addr,
                    "initial_dest": profile.destination_number,
                    "initial_dialplan": profile.dialplan,
                    "initial_context": profile.context,
                }
            )
        return {"row_count": len(rows), "rows": rows} if rows else {"row_count": 0}

    def eavesdrops(self) -> dict[str, dict[str, object]]:
        """Running eavesdrops by the eavesdropper's leg (the control API's state)."""
        return {uuid: leg.eavesdrop.describe() for uuid, leg in self.legs.items() if leg.eavesdrop is not None}

    def registrations(self) -> list[Endpoint]:
        seen: dict[int, Endpoint] = {}
        for endpoint in self.endpoints.values():
            seen[id(endpoint)] = endpoint
        return list(seen.values())

    def channel_dump(self, leg: CallLeg, as_json: bool) -> str:
        pairs = self.base_headers("CHANNEL_DATA", ("mod_commands.c", "uuid_dump_function", 5000))
        pairs += leg.channel.event_data("CHANNEL_DATA")
        if as_json:
            return serialize_json(pairs).decode()
        return serialize_plain(pairs).decode()


def parse_directory_user(document: str, user: str) -> dict[str, str] | None:
    """The user's variables if the directory document has that user with a password or a1-hash."""
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(document)  # noqa: S314 - the document comes from our own backend
    except ElementTree.ParseError as error:
        logger.error("switch_xml.c:1797 Error[%s]", error)
        return None
    for element in root.iter("user"):
        if element.get("id") != user:
            continue
        params = {p.get("name"): p.get("value") for p in element.iter("param")}
        if not params.get("password") and not params.get("a1-hash"):
            return None
        return {v.get("name") or "": v.get("value") or "" for v in element.iter("variable")}
    return None


def match_dialplan(
    document: str, context: str, destination: str, leg: CallLeg, switch: Switch
) -> tuple[str, list[tuple[str, str]]] | None:
    """mod_dialplan_xml: the first extension whose conditions all match, with $1.. substituted into its actions."""
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(document)  # noqa: S314 - the document comes from our own backend
    except ElementTree.ParseError as error:
        logger.error("switch_xml.c:1797 Error[%s]", error)
        return None
    section = root.find("section")
    if section is None or section.get("name") != "dialplan":
        return None
    for ctx in section.iter("context"):
        if ctx.get("name") not in (context, None) and len(section.findall("context")) > 1:
            continue
        for extension in ctx.iter("extension"):
            actions: list[tuple[str, str]] = []
            matched = True
            for condition in extension.findall("condition"):
                field_name = condition.get("field")
                expression = condition.get("expression")
                if field_name is None or expression is None:
                    captures: tuple[str, ...] = ()
                else:
                    value = destination if field_name == "destination_number" else switch.expand(leg, field_name)
                    found = re.search(expression, value)
                    if not found:
                        matched = False
                        break
                    captures = found.groups()
                for action in condition.findall("action"):
                    data = action.get("data") or ""
                    for index, capture in enumerate(captures, start=1):
                        data = data.replace(f"${index}", capture or "")
                    actions.append((action.get("application") or "", data))
            if matched:
                return extension.get("name") or "", actions
    return None


def write_wav(path: Path, seconds: float, *, tone: float = 0.0) -> int:
    """A real 8 kHz mono 16-bit WAV of `seconds` (silence, or a tone at `tone` Hz); returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = int(max(seconds, 0.02) * 8000)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(8000)
        if tone:
            data = b"".join(
                struct.pack("<h", int(8000 * math.sin(2 * math.pi * tone * i / 8000))) for i in range(frames)
            )
        else:
            data = b"\x00\x00" * frames
        handle.writeframes(data)
    return path.stat().st_size


def cdr_document(switch: Switch, leg: CallLeg) -> dict[str, object]:
    """mod_json_cdr's JSON: core-uuid, switchname, channel_data, callStats, variables, app_log, callflow."""
    channel = leg.channel
    profile = channel.profile
    encode = switch.config.cdr_encode_values

    def value(text: str) -> str:
        return url_encode(text) if encode else text

    variables = {name: value(val) for name, val in channel.variables.items()}
    callflow: dict[str, object] = {"dialplan": "XML", "profile_index": "1"}
    if channel.extension:
        callflow["extension"] = {
            "name": channel.extension,
            "number": profile.destination_number if profile else "",
            "applications": [{"app_name": app, "app_data": data} for app, data in channel.app_log],
        }
    if profile is not None:
        callflow["caller_profile"] = {
            "username": profile.username,
            "dialplan": profile.dialplan,
            "caller_id_name": profile.caller_id_name,
            "ani": profile.ani or profile.caller_id_number,
            "aniii": "",
            "caller_id_number": profile.caller_id_number,
            "network_addr": profile.network_addr,
            "rdnis": "",
            "destination_number": profile.destination_number,
            "uuid": channel.uuid,
            "source": profile.source,
            "context": profile.context,
            "chan_name": channel.name,
        }
        callflow["times"] = {
            "created_time": str(profile.created),
            "profile_created_time": str(profile.profile_created),
            "progress_time": str(profile.progress),
            "progress_media_time": str(profile.progress_media),
            "answered_time": str(profile.answered),
            "bridged_time": str(profile.bridged),
            "last_hold_time": str(profile.last_hold),
            "hold_accum_time": str(profile.hold_accum),
            "hangup_time": str(profile.hangup),
            "resurrect_time": str(profile.resurrect),
            "transfer_time": str(profile.transfer),
        }
    document: dict[str, object] = {
        "core-uuid": switch.core_uuid,
        "switchname": switch.config.hostname,
        "channel_data": {
            "state": "CS_REPORTING",
            "direction": channel.direction,
            "state_number": "11",
            "flags": "0=1;1=1",
            "caps": "",
        },
        "callStats": {},
        "variables": variables,
    }
    if channel.app_log:
        document["app_log"] = {
            "applications": [
                {"app_name": app, "app_data": data, "app_stamp": str(now_us())} for app, data in channel.app_log
            ]
        }
    document["callflow"] = [callflow]
    return document


async def post_cdr(switch: Switch, uuid: str, body: bytes) -> HttpResult:
    url = f"{switch.config.cdr_url}?uuid={uuid}"
    return await post(
        url,
        body,
        content_type="application/json",
        user_agent="freeswitch-json/1.0",
        timeout=switch.config.cdr_timeout,
        credentials=switch.config.cdr_credentials,
        content_type_first=True,
    )


def json_dumps_cdr(document: dict[str, object]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

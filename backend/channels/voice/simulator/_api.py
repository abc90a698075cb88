"""API commands (`api`/`bgapi`): status, originate, uuid_*, show, sofia status, reloadxml."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from backend.channels.voice.simulator._apps import (
    bridge_legs,
    execute,
    originate_leg,
    schedule_hangup,
    start_recording,
    stop_recording,
    strip_variables,
    truthy,
)
from backend.channels.voice.simulator._switch import FREESWITCH_VERSION, CallLeg, HungUp, Switch

if TYPE_CHECKING:
    from backend.channels.voice.simulator._esl import Listener

logger = logging.getLogger("backend.channels.voice.simulator")

NO_CHANNEL = "-ERR No such channel!\n"
MEDIA_APPLICATIONS = frozenset({"playback", "speak", "sleep", "play_and_get_digits", "read", "record"})

ApiFunction = Callable[[Switch, str], Awaitable[str]]


async def execute_api(switch: Switch, name: str, argument: str, listener: Listener | None = None) -> str:
    """switch_api_execute: fire the API event, run the command, return its output."""
    switch.record("api", command=name, argument=argument)
    function = API_COMMANDS.get(name)
    if function is None:
        return f"-ERR {name} Command not found!\n"
    switch.fire(
        "API",
        calling=("switch_loadable_module.c", "switch_api_execute", 2954),
        post=[("API-Command", name), *([("API-Command-Argument", argument)] if argument else [])],
    )
    try:
        return await function(switch, argument.strip())
    except (ValueError, IndexError) as error:
        return f"-USAGE: {name} ({error})\n"


async def api_status(switch: Switch, argument: str) -> str:
    up = time.time() - switch.started
    count = len(switch.legs)
    return (
        f"UP {switch.uptime_text(up)}\n"
        f"FreeSWITCH (Version {FREESWITCH_VERSION}) is ready\n"
        f"{switch.sessions_since_startup} session(s) since startup\n"
        f"{count} session(s) - peak {switch.peak_sessions}, last 5min {switch.peak_sessions} \n"
        "0 session(s) per Sec out of max 30, peak 0, last 5min 0 \n"
        f"{switch.config.max_sessions} session(s) max\n"
        "min idle cpu 0.00/99.00\n"
        "Current Stack Size/Max 240K/8192K\n"
    )


def _leg(switch: Switch, uuid: str) -> CallLeg | None:
    return switch.find(uuid.strip())


async def api_global_getvar(switch: Switch, argument: str) -> str:
    return switch.global_vars.get(argument.strip(), "")


async def api_uuid_exists(switch: Switch, argument: str) -> str:
    return "true" if _leg(switch, argument.split(maxsplit=1)[0] if argument else "") is not None else "false"


async def api_uuid_kill(switch: Switch, argument: str) -> str:
    parts = argument.split()
    leg = _leg(switch, parts[0]) if parts else None
    if leg is None:
        return NO_CHANNEL
    await switch.hangup(leg, parts[1] if len(parts) > 1 else "NORMAL_CLEARING")
    return "+OK\n"


async def api_sched_hangup(switch: Switch, argument: str) -> str:
    parts = argument.split()
    if len(parts) < 2:
        return "-USAGE: [+]<time> <uuid> [<cause>]\n"
    leg = _leg(switch, parts[1])
    if leg is None:
        return NO_CHANNEL
    seconds = int(parts[0].lstrip("+"))
    schedule_hangup(switch, leg, seconds, parts[2] if len(parts) > 2 else "ALLOTTED_TIMEOUT")
    return "+OK\n"


async def api_uuid_setvar(switch: Switch, argument: str) -> str:
    parts = argument.split(" ", 2)
    leg = _leg(switch, parts[0]) if parts else None
    if leg is None or len(parts) < 2:
        return NO_CHANNEL if leg is None else "-USAGE: <uuid> <var> [value]\n"
    leg.channel.variables.set(parts[1], parts[2] if len(parts) > 2 else None)
    return "+OK\n"


async def api_uuid_getvar(switch: Switch, argument: str) -> str:
    parts = argument.split()
    leg = _leg(switch, parts[0]) if parts else None
    if leg is None or len(parts) < 2:
        return NO_CHANNEL if leg is None else "-USAGE: <uuid> <var>\n"
    return leg.channel.variables.get(parts[1]) or "_undef_"


async def api_uuid_dump(switch: Switch, argument: str) -> str:
    parts = argument.split()
    leg = _leg(switch, parts[0]) if parts else None
    if leg is None:
        return NO_CHANNEL
    return switch.channel_dump(leg, len(parts) > 1 and parts[1] == "json")


async def api_uuid_record(switch: Switch, argument: str) -> str:
    parts = argument.split()
    leg = _leg(switch, parts[0]) if parts else None
    if leg is None:
        return NO_CHANNEL
    action, path = (parts[1], parts[2]) if len(parts) > 2 else (parts[1] if len(parts) > 1 else "", "all")
    if action == "start":
        start_recording(switch, leg, path)
        return "+OK Success\n"
    if action == "stop":
        return "+OK Success\n" if stop_recording(switch, leg, path) else "-ERR Cannot stop record session!\n"
    if action in ("mask", "unmask"):
        # switch_ivr_record_session_mask: silence is written while masked; the bug must exist.
        if not any(p == path for p, _ in leg.recording):
            return f"-ERR Cannot {action} recording session!\n"
        if action == "mask":
            leg.masked.add(path)
        else:
            leg.masked.discard(path)
        return "+OK Success\n"
    return "-USAGE: <uuid> [start|stop|mask|unmask] <path> [<limit>]\n"


async def api_uuid_break(switch: Switch, argument: str) -> str:
    """uuid_break <uuid> [all]: CF_BREAK stops what is playing (or the next playback); `all` also drops queued
    commands (switch_core_session_flush_private_events)."""
    parts = argument.split()
    leg = _leg(switch, parts[0]) if parts else None
    if leg is None:
        return NO_CHANNEL
    if len(parts) > 1 and "all" in parts[1]:
        while not leg.private.empty():
            leg.private.get_nowait()
    if leg.broadcast is not None and not leg.broadcast.done():
        leg.broadcast.cancel()
    else:
        leg.break_pending = True
        leg.break_signal.set()
    return "+OK\n"


async def api_http_put(switch: Switch, argument: str) -> str:
    """mod_http_cache `http_put [{profile=name}]<url> <file>`: `+OK <status>` or `-ERR <status>`."""
    parts = argument.split(" ")
    if len(parts) != 2:
        return "USAGE: {[profile=profile]}url local_file\n"
    url, path = parts
    if url.startswith("{"):
        url = url[url.find("}") + 1 :]
    result = await switch.http_put(url, path)
    ok = result.status in (200, 201, 204)
    return f"{'+OK' if ok else '-ERR'} {result.status}\n"


async def api_uuid_hold(switch: Switch, argument: str) -> str:
    parts = argument.split()
    mode = "on"
    if parts and parts[0] in ("off", "toggle"):
        mode = parts.pop(0)
    leg = _leg(switch, parts[0]) if parts else None
    if leg is None:
        return NO_CHANNEL
    channel = leg.channel
    held = channel.callstate == "HELD"
    if mode == "toggle":
        mode = "off" if held else "on"
    partner = switch.find(channel.partner) if channel.partner else None
    if mode == "on" and not held:
        switch.set_callstate(leg, "HELD")
        switch.fire("CHANNEL_HOLD", channel, calling=("switch_channel.c", "switch_channel_perform_mark_hold", 1))
        music = channel.variables.get("hold_music")
        if partner is not None and music and music != "silence":
            # switch_ivr_hold: the held channel's hold_music is broadcast to its partner, looped.
            partner.broadcast = switch.spawn(_broadcast_loop(switch, partner, music), f"hold-{partner.channel.uuid}")
    elif mode == "off" and held:
        switch.set_callstate(leg, "ACTIVE")
        switch.fire("CHANNEL_UNHOLD", channel, calling=("switch_channel.c", "switch_channel_perform_mark_hold", 1))
        if partner is not None and partner.broadcast is not None:
            partner.broadcast.cancel()
            partner.broadcast = None
    elif mode == "on":
        return "-ERR Operation failed\n"
    return "+OK Success\n"


_DTMF_KEYS = frozenset("0123456789*#ABCDabcdwW")


def _dtmf_arguments(argument: str) -> tuple[str, str] | None:
    parts = argument.split()
    if len(parts) < 2:
        return None
    return parts[0], parts[1]


async def api_uuid_recv_dtmf(switch: Switch, argument: str) -> str:
    """mod_commands uuid_recv_dtmf: switch_channel_queue_dtmf_string, as if the leg's endpoint had sent the keys
    (the leg's running application dequeues them: play_and_get_digits, eavesdrop's mode keys)."""
    found = _dtmf_arguments(argument)
    if found is None:
        return "-USAGE: <uuid> <dtmf_data>\n"
    uuid, digits = found
    leg = _leg(switch, uuid)
    if leg is None:
        return "-ERR Cannot locate session!\n"
    keys = [key for key in digits.split("@")[0].replace("+", "") if key in _DTMF_KEYS]
    if not keys:
        return "-USAGE: <uuid> <dtmf_data>\n"
    for key in keys:
        switch.fire(
            "DTMF",
            leg.channel,
            calling=("switch_channel.c", "switch_channel_dequeue_dtmf", 677),
            post=[("DTMF-Digit", key), ("DTMF-Duration", "2000"), ("DTMF-Source", "APP")],
        )
        leg.channel.digits.append(key)
    leg.dtmf_signal.set()
    return f"+OK {uuid} received DTMF {digits}.\n"


async def api_uuid_send_dtmf(switch: Switch, argument: str) -> str:
    """mod_commands uuid_send_dtmf: switch_core_session_send_dtmf_string, sent out to the leg's endpoint (its
    phone hears the tones); the leg's own applications never see them."""
    found = _dtmf_arguments(argument)
    if found is None:
        return "-USAGE: <uuid> <dtmf_data>\n"
    uuid, digits = found
    leg = _leg(switch, uuid)
    if leg is None:
        return "-ERR Cannot locate session!\n"
    leg.dtmf_sent.extend(key for key in digits if key in _DTMF_KEYS)
    return f"+OK {uuid} sent DTMF {digits}.\n"


async def _broadcast_loop(switch: Switch, leg: CallLeg, path: str) -> None:
    """switch_ivr_broadcast(SMF_LOOP): `playback` of `path` on the channel, again and again, until stopped."""
    while not leg.channel.down:
        try:
            response = await execute(switch, leg, "playback", path)
        except HungUp:
            return
        if response == "FILE NOT FOUND":
            return


async def api_uuid_broadcast(switch: Switch, argument: str) -> str:
    parts = argument.split()
    leg = _leg(switch, parts[0]) if parts else None
    if leg is None:
        return NO_CHANNEL
    path = parts[1] if len(parts) > 1 else ""
    application, _, data = path.partition("::")
    if not data:
        application, data = "playback", path

    async def run() -> None:
        with contextlib.suppress(HungUp):
            await execute(switch, leg, application, data)

    switch.spawn(run(), f"broadcast-{leg.channel.uuid}")
    return "+OK Message sent\n"


async def api_uuid_transfer(switch: Switch, argument: str) -> str:
    parts = argument.split()
    leg = _leg(switch, parts[0]) if parts else None
    if leg is None:
        return NO_CHANNEL
    parts = parts[1:]
    target = leg
    if parts and parts[0] in ("-bleg", "-both"):
        which = parts.pop(0)
        if which == "-bleg" and leg.channel.partner:
            target = switch.find(leg.channel.partner) or leg
    if not parts:
        return "-USAGE: <uuid> [-bleg|-both] <dest-exten> [<dialplan>] [<context>]\n"
    profile = target.channel.profile
    context = parts[2] if len(parts) > 2 else (profile.context if profile else "default")
    target.transfer_to = (parts[0], parts[1] if len(parts) > 1 else "XML", context)
    # Break whatever the channel is doing (a bridge ends by hanging up the other leg, as FreeSWITCH does).
    partner = switch.find(target.channel.partner) if target.channel.partner else None
    if partner is not None and not partner.channel.down:
        await switch.hangup(partner, "NORMAL_CLEARING")
    target.dtmf_signal.set()
    target.private_ready.set()
    return "+OK\n"


async def api_uuid_bridge(switch: Switch, argument: str) -> str:
    """switch_ivr_uuid_bridge: both channels leave what they are doing (a bridge ends without hanging anyone
    up, an application such as the `socket` one returns) and are bridged to each other. When that bridge is over:
    a side left alone parks if `park_after_bridge` says so; otherwise the originator (the first uuid) goes on with
    its extension, unless `hangup_after_bridge` hangs it up, and a leg with no extension of its own hangs up."""
    parts = argument.split()
    a = _leg(switch, parts[0]) if parts else None
    b = _leg(switch, parts[1]) if len(parts) > 1 else None
    if a is None or b is None or a.channel.down or b.channel.down:
        return "-ERR Invalid uuid\n"
    over: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    for leg in (a, b):
        leg.uuid_bridge = over
        leg.orphaned = False
        leg.redirect.set()
        leg.private_ready.set()
        if leg.running_app in MEDIA_APPLICATIONS:
            # The state change breaks the media application running on the channel.
            leg.break_pending = True
            leg.break_signal.set()

    async def run() -> None:
        for _ in range(200):
            if not a.channel.partner and not b.channel.partner:
                break
            await asyncio.sleep(0.005)
        try:
            with contextlib.suppress(HungUp):
                await bridge_legs(switch, a, b)
            for leg in a.deferred_teardown:
                switch.spawn(switch.teardown(leg), "uuid-bridge-teardown")
            a.deferred_teardown.clear()
            for leg, other in ((a, b), (b, a)):
                if leg.channel.down or not other.channel.down or leg.uuid_bridge is not over:
                    continue
                if truthy(leg.channel.variables.get("park_after_bridge")):
                    continue  # parked
                if leg is b or leg.task is None:
                    await switch.hangup(leg, "NORMAL_CLEARING")
            for leg in (a, b):
                if leg.channel.down and leg.task is None and leg.uuid_bridge is over:
                    # A b-leg whose own bridge it left: nobody else reports it.
                    switch.spawn(switch.teardown(leg), "uuid-bridge-teardown")
        finally:
            for leg in (a, b):
                if leg.uuid_bridge is over:
                    leg.uuid_bridge = None
                    leg.orphaned = leg.task is None and not leg.channel.down
            if not over.done():
                over.set_result(None)

    switch.spawn(run(), f"uuid-bridge-{a.channel.uuid}")
    return f"+OK {b.channel.uuid}\n"


async def api_originate(switch: Switch, argument: str) -> str:
    """originate <dial string> <&app(args) | extension> [dialplan] [context] [cid name] [cid number] [timeout]."""
    dial, _, rest = argument.partition(" ")
    if dial.startswith("{"):
        # The variables may hold spaces: the dial string ends after the closing brace's target.
        end = argument.find("}")
        head = argument[: end + 1]
        tail = argument[end + 1 :]
        target, _, rest = tail.partition(" ")
        dial = head + target
    words = rest.split(" ")
    if not words or not words[0]:
        return "-USAGE: <call url> <exten>|&<application_name>(<app_args>) [<dialplan>] [<context>]\n"
    timeout = float(words[6]) if len(words) > 6 and words[6].isdigit() else None
    variables, _ = strip_variables(dial)
    outcome = await originate_leg(switch, dial, originator=None, timeout=timeout)
    if isinstance(outcome, str):
        return f"-ERR {outcome}\n"
    leg = outcome
    action = rest.strip()
    if action.startswith("&"):
        name, _, args = action[1:].partition("(")
        args = args.rsplit(")", 1)[0]
        leg.task = asyncio.create_task(run_originated(switch, leg, [(name, args)]), name=f"orig-{leg.channel.uuid}")
    else:
        destination = words[0]
        context = words[2] if len(words) > 2 else "default"
        assert leg.channel.profile is not None
        leg.channel.profile.destination_number = destination
        leg.channel.profile.context = context
        leg.task = asyncio.create_task(run_routed(switch, leg), name=f"orig-{leg.channel.uuid}")
    del variables
    return f"+OK {leg.channel.uuid}\n"


async def run_originated(switch: Switch, leg: CallLeg, actions: list[tuple[str, str]]) -> None:
    from backend.channels.voice.simulator._apps import run_extension

    try:
        leg.channel.extension = actions[0][0]
        switch.set_state(leg, "CS_EXECUTE")
        await run_extension(switch, leg, actions)
        if not leg.channel.down:
            await switch.hangup(leg, "NORMAL_CLEARING")
    finally:
        await switch.teardown(leg)


async def run_routed(switch: Switch, leg: CallLeg) -> None:
    from backend.channels.voice.simulator._apps import run_extension

    try:
        found = await switch.dialplan(leg)
        if found is None:
            await switch.hangup(leg, "NO_ROUTE_DESTINATION")
        else:
            leg.channel.extension, actions = found
            switch.set_state(leg, "CS_EXECUTE")
            await run_extension(switch, leg, actions)
            if not leg.channel.down:
                await switch.hangup(leg, "NORMAL_CLEARING")
    finally:
        await switch.teardown(leg)


async def api_show(switch: Switch, argument: str) -> str:
    words = argument.split()
    what = words[0] if words else ""
    as_json = words[-2:] == ["as", "json"]
    if what in ("channels", "calls"):
        document = switch.show_channels()
        if as_json:
            return json.dumps(document, separators=(",", ":"))
        rows = document.get("rows", [])
        assert isinstance(rows, list)
        return "".join(f"{row['uuid']},{row['direction']},{row['name']},{row['state']}\n" for row in rows) + (
            f"\n{len(rows)} total.\n"
        )
    if what == "registrations":
        rows = [
            {
                "reg_user": endpoint.user,
                "realm": endpoint.domain,
                "token": endpoint.call_id,
                "url": f"sofia/internal/{endpoint.contact}",
                "expires": str(endpoint.expires_at),
                "network_ip": "127.0.0.1",
                "network_port": str(endpoint.contact_port),
                "network_proto": endpoint.transport,
                "hostname": switch.config.hostname,
                "metadata": "",
            }
            for endpoint in switch.registrations()
        ]
        if as_json:
            return json.dumps({"row_count": len(rows), "rows": rows} if rows else {"row_count": 0})
        return "".join(f"{row['reg_user']},{row['realm']},{row['url']}\n" for row in rows) + f"\n{len(rows)} total.\n"
    return f"-USAGE: show {what}\n"


async def api_sofia(switch: Switch, argument: str) -> str:
    words = argument.split()
    if words[:1] != ["status"]:
        return "-ERR Unknown command\n"
    if len(words) >= 4 and words[1] == "profile" and words[3] == "reg":
        lines = ["", "Registrations:", "=" * 97]
        endpoints = switch.registrations()
        for endpoint in endpoints:
            remaining = max(0, endpoint.expires_at - int(time.time()))
            lines += [
                f"Call-ID:    \t{endpoint.call_id}",
                f"User:       \t{endpoint.user}@{endpoint.domain}",
                f'Contact:    \t"" <{endpoint.contact}>',
                f"Agent:      \t{endpoint.user_agent}",
                f"Status:     \tRegistered({endpoint.transport.upper()})(unknown) EXPSECS({remaining})",
                "Ping-Status:\tReachable",
                "Ping-Time:\t0.00",
                f"Host:       \t{switch.config.hostname}",
                "IP:         \t127.0.0.1",
                f"Port:       \t{endpoint.contact_port}",
                f"Auth-User:  \t{endpoint.user}",
                f"Auth-Realm: \t{endpoint.domain}",
                f"MWI-Account:\t{endpoint.user}@{endpoint.domain}",
                "",
            ]
        lines += [f"Total items returned: {len(endpoints)}", "=" * 97, ""]
        return "\n".join(lines)
    rule = "=" * 97
    address = f"sip:mod_sofia@{switch.config.ipv4}:{switch.config.sip_port}"
    return (
        f"{'Name':>20}\t{'Type':>10}\t{'Data':<50}\tState\n{rule}\n"
        f"{'internal':>20}\t{'profile':>10}\t{address:<50}\tRUNNING (0)\n{rule}\n1 profile 0 aliases\n"
    )


async def api_reloadxml(switch: Switch, argument: str) -> str:
    return "+OK [Success]\n"


async def api_hupall(switch: Switch, argument: str) -> str:
    cause = argument.split(maxsplit=1)[0] if argument else "MANAGER_REQUEST"
    for leg in list(switch.legs.values()):
        await switch.hangup(leg, cause)
    return "+OK\n"


async def api_version(switch: Switch, argument: str) -> str:
    return f"FreeSWITCH Version {FREESWITCH_VERSION}\n"


API_COMMANDS: dict[str, ApiFunction] = {
    "status": api_status,
    "version": api_version,
    "originate": api_originate,
    "uuid_kill": api_uuid_kill,
    "uuid_exists": api_uuid_exists,
    "global_getvar": api_global_getvar,
    "sched_hangup": api_sched_hangup,
    "uuid_setvar": api_uuid_setvar,
    "uuid_getvar": api_uuid_getvar,
    "uuid_dump": api_uuid_dump,
    "uuid_record": api_uuid_record,
    "uuid_hold": api_uuid_hold,
    "uuid_break": api_uuid_break,
    "http_put": api_http_put,
    "uuid_broadcast": api_uuid_broadcast,
    "uuid_transfer": api_uuid_transfer,
    "uuid_bridge": api_uuid_bridge,
    "uuid_recv_dtmf": api_uuid_recv_dtmf,
    "uuid_send_dtmf": api_uuid_send_dtmf,
    "show": api_show,
    "sofia": api_sofia,
    "reloadxml": api_reloadxml,
    "hupall": api_hupall,
}

"""Dialplan applications (mod_dptools and friends) with the events FreeSWITCH fires around them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from backend.channels.voice.esl._models import Command
from backend.channels.voice.simulator._channel import Channel, now_us
from backend.channels.voice.simulator._switch import (
    SESSION_RUN,
    CallLeg,
    Eavesdrop,
    Endpoint,
    HungUp,
    Switch,
    write_wav,
)

logger = logging.getLogger("backend.channels.voice.simulator")

Application = Callable[[Switch, CallLeg, str], Awaitable[None]]


class Transferred(Exception):
    """The channel was transferred: stop this extension and route again."""


# ----- running applications -----


async def run_extension(switch: Switch, leg: CallLeg, actions: list[tuple[str, str]]) -> None:
    """Execute an extension's actions in order until one hangs up or transfers the channel."""
    for application, data in actions:
        if leg.channel.down:
            return
        try:
            await execute(switch, leg, application, data)
        except Transferred:
            return
        except HungUp:
            return
        finally:
            await flush_deferred(switch, leg)
        await process_private(switch, leg)


async def flush_deferred(switch: Switch, leg: CallLeg) -> None:
    """Tear down b-legs that ended a bridge, after the bridge's EXECUTE_COMPLETE (b01's order)."""
    while leg.deferred_teardown:
        await switch.teardown(leg.deferred_teardown.pop(0))


async def execute(
    switch: Switch, leg: CallLeg, application: str, data: str, *, app_uuid: str | None = None
) -> str | None:
    """switch_core_session_exec: CHANNEL_EXECUTE, the application, CHANNEL_EXECUTE_COMPLETE."""
    channel = leg.channel
    function = APPLICATIONS.get(application)
    if function is None:
        logger.error("Invalid Application %s", application)
        await switch.hangup(leg, "DESTINATION_OUT_OF_ORDER")
        return None
    expanded = switch.expand(leg, data) if data else ""
    uuid = app_uuid or Channel.new_uuid()
    channel.app_log.append((application, expanded))
    switch.record("app", uuid=channel.uuid, app=application, data=expanded)
    variables = channel.variables
    variables.set("current_application", application)
    variables.set("current_application_data", expanded)
    variables.set("current_application_response", None)
    post = [("Application", application)]
    if expanded:
        post.append(("Application-Data", expanded))
    switch.fire(
        "CHANNEL_EXECUTE",
        channel,
        calling=("switch_core_session.c", "switch_core_session_exec", 2950),
        post=[*post, ("Application-UUID", uuid)],
    )
    variables.set("current_application", application)
    hung_up = False
    outer, leg.running_app = leg.running_app, application
    try:
        await function(switch, leg, expanded)
    except HungUp:
        hung_up = True
    finally:
        leg.running_app = outer
    response = variables.get("current_application_response") or "_none_"
    switch.fire(
        "CHANNEL_EXECUTE_COMPLETE",
        channel,
        calling=("switch_core_session.c", "switch_core_session_exec", 2975),
        post=[*post, ("Application-Response", response), ("Application-UUID", uuid)],
    )
    if hung_up:
        raise HungUp
    if leg.transfer_to is not None:
        raise Transferred
    return response


async def wait(leg: CallLeg, seconds: float | None, *, dtmf: bool = False, breakable: bool = False) -> str:
    """Sleep, waking on hangup (raises HungUp), with `dtmf` on a key press, with `breakable` on `uuid_break`
    (CF_BREAK, which stays set until a media function takes it); returns why it woke."""
    if leg.channel.down:
        raise HungUp
    if breakable and take_break(leg):
        return "break"
    waiters = [asyncio.ensure_future(leg.hangup_signal.wait())]
    if dtmf:
        if leg.channel.digits:
            for waiter in waiters:
                waiter.cancel()
            return "dtmf"
        leg.dtmf_signal.clear()
        waiters.append(asyncio.ensure_future(leg.dtmf_signal.wait()))
    if breakable:
        leg.break_signal.clear()
        waiters.append(asyncio.ensure_future(leg.break_signal.wait()))
    try:
        done, _ = await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if leg.channel.down:
        raise HungUp
    if breakable and take_break(leg):
        return "break"
    if dtmf and leg.channel.digits:
        return "dtmf"
    return "timeout" if not done else "signal"


def take_break(leg: CallLeg) -> bool:
    """Clear CF_BREAK if it is set (the media function that sees it stops)."""
    if leg.break_pending:
        leg.break_pending = False
        return True
    return False


def separate_blank(data: str, limit: int) -> list[str]:
    """switch_separate_string on blanks: single quotes keep spaces and are removed, `\\` escapes, the last
    of `limit` items takes the rest."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    index = 0
    while index < len(data):
        char = data[index]
        if len(items) == limit - 1 and not current and not char.isspace():
            current.append(data[index:].strip())
            break
        if char == "\\" and index + 1 < len(data) and data[index + 1] in _UNESCAPED:
            # cleanup_separated_string: only quotes, backslashes and n r t s are escaped; a backslash before d stays.
            current.append(_UNESCAPED[data[index + 1]])
            index += 2
            continue
        if char == "'":
            quoted = not quoted
        elif char == " " and not quoted:
            if current:
                items.append("".join(current))
                current = []
        else:
            current.append(char)
        index += 1
    if current:
        items.append("".join(current).replace("'", "") if len(items) == limit - 1 else "".join(current))
    return items


_UNESCAPED = {"'": "'", '"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t", "s": " "}


def playback_terminators(leg: CallLeg) -> str:
    """`playback_terminators` as mod_dptools' on_dtmf reads it: `*` by default, `any`, or `none`."""
    value = leg.channel.variables.get("playback_terminators")
    if value is None:
        return "*"
    if value.lower() == "any":
        return "1234567890*#"
    if value.lower() == "none":
        return ""
    return value


def media_seconds(switch: Switch, path: str) -> float | None:
    """How long a file or stream plays: tone_stream cadences and silence_stream lengths are honoured; a
    `local_stream://` (mod_local_stream: music on hold) never ends by itself (None), as a `silence_stream://-1`."""
    if path.startswith("local_stream://"):
        return None
    if path.startswith("silence_stream://"):
        millis = path[len("silence_stream://") :].split(",", maxsplit=1)[0]
        if millis.startswith("-") and millis[1:].isdigit():
            return None  # a negative length: silence until interrupted
        return switch.scaled(int(millis) / 1000 if millis.isdigit() else 1.0)
    if path.startswith("tone_stream://"):
        total = 0
        for on, off in re.findall(r"%\((\d+),(\d+),", path):
            total += int(on) + int(off)
        loops = re.search(r"loops=(-?\d+)", path)
        count = int(loops.group(1)) if loops else 1
        return switch.scaled(total * max(count, 1) / 1000)
    return switch.scaled(switch.config.default_playback_seconds)


async def play(
    switch: Switch, leg: CallLeg, path: str, *, interruptible: bool = False, terminators: str | None = None
) -> str:
    """switch_ivr_play_file: PLAYBACK_START, the media, PLAYBACK_STOP, and the playback_* variables.

    `interruptible` (play_and_get_digits, read): any key stops it and is kept for collecting. `terminators`
    (playback): those keys stop it, any other key is consumed. `uuid_break` stops either. A file that cannot
    be opened (an http_cache:// URL the web server refuses) plays nothing: FILE NOT FOUND.
    """
    channel = leg.channel
    if not await switch.open_media(path):
        logger.error("Can't open %s", path)
        channel.variables.set("current_application_response", "FILE NOT FOUND")
        return "notfound"
    kind = path.split("://", 1)[0] if "://" in path else "file"
    file_headers = [("Playback-File-Type", kind), ("Playback-File-Path", path)]
    switch.fire(
        "PLAYBACK_START",
        channel,
        calling=("switch_ivr_play_say.c", "switch_ivr_play_file", 1646),
        post=file_headers,
    )
    started = time.monotonic()
    status = "done"
    length = media_seconds(switch, path)
    limit = playback_timeout(switch, leg)
    timed_out = limit is not None and (length is None or limit < length)
    if timed_out:
        length = limit
    try:
        if terminators is None:
            woke = await wait(leg, length, dtmf=interruptible, breakable=True)
            if woke in ("dtmf", "break"):
                status = "break"
        else:
            remaining = length
            while True:
                woke = await wait(leg, remaining, dtmf=True, breakable=True)
                if woke == "break":
                    status = "break"
                    break
                if woke != "dtmf":
                    break
                digit = channel.digits.pop(0)
                if digit in terminators:
                    channel.variables.set("playback_terminator_used", digit)
                    status = "break"
                    break
                remaining = None if length is None else max(0.0, length - (time.monotonic() - started))
    finally:
        elapsed = time.monotonic() - started
        samples = int(elapsed * 8000)
        for name, value in (
            ("playback_last_offset_pos", str(samples)),
            ("playback_seconds", str(int(elapsed))),
            ("playback_ms", str(int(elapsed * 1000))),
            ("playback_samples", str(samples)),
        ):
            channel.variables.set(name, value)
        switch.fire(
            "PLAYBACK_STOP",
            channel,
            calling=("switch_ivr_play_say.c", "switch_ivr_play_file", 2020),
            post=[*file_headers, ("Playback-Status", status)],
        )
    if timed_out and status == "done" and not truthy(channel.variables.get("playback_timeout_as_success")):
        channel.variables.set("current_application_response", "PLAYBACK ERROR")  # SWITCH_STATUS_TIMEOUT
        return "timeout"
    channel.variables.set("current_application_response", "FILE PLAYED")
    return status


def playback_timeout(switch: Switch, leg: CallLeg) -> float | None:
    """`playback_timeout_sec` as switch_ivr_play_file reads it: whole seconds, honoured above 1."""
    value = leg.channel.variables.get("playback_timeout_sec") or ""
    seconds = int(value) if value.strip().isdigit() else 0
    return switch.scaled(seconds) if seconds > 1 else None


# ----- applications -----


async def app_answer(switch: Switch, leg: CallLeg, data: str) -> None:
    switch.mark_answered(leg)


async def app_pre_answer(switch: Switch, leg: CallLeg, data: str) -> None:
    channel = leg.channel
    if not channel.early_media and not channel.answered:
        if not channel.codec:
            switch.codec_events(leg)
        channel.early_media = True
        if channel.profile:
            channel.profile.progress_media = now_us()
        switch.fire(
            "CHANNEL_PROGRESS_MEDIA",
            channel,
            calling=("switch_channel.c", "switch_channel_perform_mark_pre_answered", 3765),
        )
        switch.set_callstate(leg, "EARLY")


async def app_ring_ready(switch: Switch, leg: CallLeg, data: str) -> None:
    channel = leg.channel
    if channel.profile and not channel.profile.progress:
        channel.profile.progress = now_us()
        switch.fire(
            "CHANNEL_PROGRESS", channel, calling=("switch_channel.c", "switch_channel_perform_mark_ring_ready_value", 1)
        )


async def app_playback(switch: Switch, leg: CallLeg, data: str) -> None:
    leg.channel.variables.set("playback_terminator_used", None)
    await play(switch, leg, data, terminators=playback_terminators(leg))


async def app_speak(switch: Switch, leg: CallLeg, data: str) -> None:
    text = data.split("|", 2)[-1]
    await wait(leg, switch.scaled(len(text) * switch.config.speak_seconds_per_char), breakable=True)


async def app_sleep(switch: Switch, leg: CallLeg, data: str) -> None:
    millis = int(data) if data.strip().isdigit() else 0
    await wait(leg, switch.scaled(millis / 1000), breakable=True)


async def collect_digits(
    switch: Switch, leg: CallLeg, *, maximum: int, timeout: float, terminators: str, digit_timeout: float
) -> tuple[str, bool]:
    """Digits until `maximum`, a terminator, or silence; returns them and whether time ran out first."""
    channel = leg.channel
    collected = ""
    limit = timeout
    while len(collected) < maximum:
        if not channel.digits:
            woke = await wait(leg, limit, dtmf=True)
            if woke != "dtmf":
                return collected, True
        digit = channel.digits.pop(0)
        if digit in terminators:
            return collected, False
        collected += digit
        limit = digit_timeout
    return collected, False


async def app_play_and_get_digits(switch: Switch, leg: CallLeg, data: str) -> None:
    """min max tries timeout terminators file invalid_file var_name regexp [digit_timeout] [transfer_on_failure]."""
    parts = separate_blank(data, 11)
    if len(parts) < 9:
        logger.error("play_and_get_digits: usage error [%s]", data)
        return
    minimum, maximum, tries = int(parts[0]), int(parts[1]), int(parts[2])
    timeout = switch.scaled(max(int(parts[3]), 1000) / 1000)  # mod_dptools raises anything under 1 s to 1 s
    terminators = parts[4] or "#"
    prompt, invalid, variable, expression = parts[5], parts[6], parts[7], parts[8]
    digit_timeout = switch.scaled(int(parts[9]) / 1000) if len(parts) > 9 and parts[9].isdigit() else timeout
    transfer_on_failure = parts[10] if len(parts) > 10 else ""
    channel = leg.channel
    channel.variables.set(f"{variable}_invalid", None)
    for _ in range(max(tries, 1)):
        # switch_ivr_read: the variable is cleared before each try.
        channel.variables.set(variable, None)
        channel.variables.set("read_result", None)
        if not channel.digits:
            await play(switch, leg, prompt, interruptible=True)
        digits, _timed_out = await collect_digits(
            switch, leg, maximum=maximum, timeout=timeout, terminators=terminators, digit_timeout=digit_timeout
        )
        if len(digits) >= minimum and digits:
            # switch_regex_match: a PCRE search, not anchored.
            if re.search(expression, digits):
                channel.variables.set("read_result", "success")
                channel.variables.set(variable, digits)
                return
            channel.variables.set(f"{variable}_invalid", digits)
        channel.variables.set("read_result", "timeout" if not digits else "failure")
        if invalid and not invalid.startswith("silence_stream"):
            await play(switch, leg, invalid, interruptible=True)
    channel.variables.set("read_result", "failure")
    channel.variables.set(variable, None)
    if transfer_on_failure:
        target = transfer_on_failure.split()
        leg.transfer_to = (target[0], target[1] if len(target) > 1 else "XML", target[2] if len(target) > 2 else "")
        if not leg.transfer_to[2] and channel.profile:
            leg.transfer_to = (target[0], "XML", channel.profile.context)


async def app_read(switch: Switch, leg: CallLeg, data: str) -> None:
    """min max file var_name timeout terminators."""
    parts = data.split()
    minimum, maximum, prompt, variable = int(parts[0]), int(parts[1]), parts[2], parts[3]
    timeout = switch.scaled(int(parts[4]) / 1000) if len(parts) > 4 else switch.scaled(5)
    terminators = parts[5] if len(parts) > 5 else "#"
    if not leg.channel.digits:
        await play(switch, leg, prompt, interruptible=True)
    digits, timed_out = await collect_digits(
        switch, leg, maximum=maximum, timeout=timeout, terminators=terminators, digit_timeout=timeout
    )
    ok = len(digits) >= minimum
    leg.channel.variables.set("read_result", "success" if ok else ("timeout" if timed_out else "failure"))
    leg.channel.variables.set(variable, digits or None)


async def app_record_session(switch: Switch, leg: CallLeg, data: str) -> None:
    start_recording(switch, leg, data.split(maxsplit=1)[0] if data else "")


def start_recording(switch: Switch, leg: CallLeg, path: str) -> None:
    if not path:
        return
    channel = leg.channel
    leg.recording.append((path, time.time()))
    switch.fire(
        "RECORD_START",
        channel,
        calling=("switch_ivr_async.c", "record_callback", 1481),
        post=[("Record-File-Path", path)],
    )
    switch.fire(
        "MEDIA_BUG_START",
        channel,
        calling=("switch_core_media_bug.c", "switch_core_media_bug_add", 1014),
        pre=[("Media-Bug-Function", "session_record"), ("Media-Bug-Target", path)],
    )


def stop_recording(switch: Switch, leg: CallLeg, path: str) -> bool:
    keep = [(p, t) for p, t in leg.recording if path not in ("all", p)]
    stopping = [(p, t) for p, t in leg.recording if path in ("all", p)]
    if not stopping:
        return False
    leg.recording = stopping
    switch.stop_recordings(leg)
    leg.recording = keep
    return True


async def app_record(switch: Switch, leg: CallLeg, data: str) -> None:
    """record <path> [<time_limit_secs>] [<silence_thresh>] [<silence_hits>]: the caller speaks into a file
    until the limit, a playback terminator (`*` by default) or the hangup; then the file is closed, RECORD_STOP
    fired and `record_post_process_exec_api` run (switch_ivr_record_file), hangup or not."""
    parts = separate_blank(data, 4)
    if not parts:
        return
    path = parts[0]
    limit = float(parts[1]) if len(parts) > 1 and parts[1].isdigit() and int(parts[1]) > 0 else 0.0
    channel = leg.channel
    if not channel.answered:
        switch.mark_answered(leg)
    terminators = playback_terminators(leg)
    switch.fire(
        "RECORD_START",
        channel,
        calling=("switch_ivr_play_say.c", "switch_ivr_record_file_event", 642),
        post=[("Record-File-Path", path)],
    )
    started = time.monotonic()
    hung_up = False
    cause = "success-maxtime"
    try:
        remaining = switch.scaled(limit) if limit else None
        while True:
            woke = await wait(leg, remaining, dtmf=True, breakable=True)
            if woke == "dtmf":
                digit = channel.digits.pop(0)
                if digit in terminators:
                    channel.variables.set("playback_terminator_used", digit)
                    cause = "success-silence"
                    break
                if remaining is not None:
                    remaining = max(0.0, switch.scaled(limit) - (time.monotonic() - started))
                continue
            if woke == "break":
                cause = "success-silence"
            break
    except HungUp:
        hung_up = True
        cause = "success-silence"
    elapsed = time.monotonic() - started
    seconds = elapsed / max(switch.config.time_scale, 1e-6)
    size = write_wav(Path(path), seconds, tone=440.0)
    for name, value in (
        ("record_file_size", str(size)),
        ("record_samples", str(int(seconds * 8000))),
        ("record_seconds", str(int(seconds))),
        ("record_ms", str(int(seconds * 1000))),
        ("record_completion_cause", cause),
    ):
        channel.variables.set(name, value)
    switch.fire(
        "RECORD_STOP",
        channel,
        calling=("switch_ivr_play_say.c", "switch_ivr_record_file_event", 977),
        post=[("Record-File-Path", path), ("Record-Completion-Cause", cause)],
    )
    setting = channel.variables.get("record_post_process_exec_api")
    if setting:
        from backend.channels.voice.simulator._api import execute_api

        command, _, argument = setting.partition(":")
        await execute_api(switch, command.strip(), switch.expand(leg, argument))
    if hung_up:
        raise HungUp


async def app_stop_record_session(switch: Switch, leg: CallLeg, data: str) -> None:
    stop_recording(switch, leg, data.strip() or "all")


async def app_set(switch: Switch, leg: CallLeg, data: str) -> None:
    name, _, value = data.partition("=")
    leg.channel.variables.set(name.strip(), value or None)


async def app_multiset(switch: Switch, leg: CallLeg, data: str) -> None:
    """multiset a=b c=d, or with another separator `^^|a=b|c=d e`."""
    separator = " "
    if data.startswith("^^") and len(data) > 2:
        separator, data = data[2], data[3:]
    for item in data.split(separator):
        if item:
            await app_set(switch, leg, item)


async def app_unset(switch: Switch, leg: CallLeg, data: str) -> None:
    leg.channel.variables.set(data.strip(), None)


async def app_export(switch: Switch, leg: CallLeg, data: str) -> None:
    name, _, value = data.partition("=")
    name = name.strip().removeprefix("nolocal:")
    variables = leg.channel.variables
    variables.set(name, value or None)
    exported = [item for item in (variables.get("export_vars") or "").split(",") if item]
    if name not in exported:
        exported.append(name)
    variables.set("export_vars", ",".join(exported))


async def app_hash(switch: Switch, leg: CallLeg, data: str) -> None:
    parts = data.split("/", 3)
    if parts[0] == "insert" and len(parts) == 4:
        switch.hash_store[f"{parts[1]}/{parts[2]}"] = parts[3]
    elif parts[0] == "delete" and len(parts) >= 3:
        switch.hash_store.pop(f"{parts[1]}/{parts[2]}", None)


async def app_hangup(switch: Switch, leg: CallLeg, data: str) -> None:
    await switch.hangup(leg, data.strip() or "NORMAL_CLEARING")
    raise HungUp


async def app_sched_hangup(switch: Switch, leg: CallLeg, data: str) -> None:
    parts = data.split()
    seconds = int(parts[0].lstrip("+")) if parts and parts[0].lstrip("+").isdigit() else 0
    schedule_hangup(switch, leg, seconds, parts[1] if len(parts) > 1 else "ALLOTTED_TIMEOUT")


def schedule_hangup(switch: Switch, leg: CallLeg, seconds: float, cause: str) -> None:
    async def later() -> None:
        await asyncio.sleep(switch.scaled(seconds))
        await switch.hangup(leg, cause)

    switch.spawn(later(), f"sched-hangup-{leg.channel.uuid}")


async def app_park(switch: Switch, leg: CallLeg, data: str) -> None:
    """Wait for commands (sendmsg), a transfer or the hangup."""
    while not leg.channel.down and leg.transfer_to is None:
        await process_private(switch, leg)
        if leg.transfer_to is not None:
            return
        leg.dtmf_signal.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait_private_or_hangup(leg), None)
    if leg.channel.down:
        raise HungUp


async def wait_private_or_hangup(leg: CallLeg) -> None:
    if not leg.private.empty() or leg.channel.down:
        return
    getter = asyncio.ensure_future(leg.private_ready.wait())
    hangup = asyncio.ensure_future(leg.hangup_signal.wait())
    try:
        await asyncio.wait({getter, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        getter.cancel()
        hangup.cancel()
        leg.private_ready.clear()


def nudge(switch: Switch, leg: CallLeg) -> None:
    """A sendmsg arrived for this channel: wake whatever is waiting for commands."""
    leg.private_ready.set()


async def process_private(switch: Switch, leg: CallLeg) -> None:
    """switch_ivr_parse_all_events: run queued sendmsg commands (execute, hangup) in order."""
    while not leg.private.empty():
        command = leg.private.get_nowait()
        if not isinstance(command, Command):
            continue
        call_command = (command.get("call-command") or "").lower()
        if call_command == "execute":
            application = command.get("execute-app-name") or ""
            argument = command.get("execute-app-arg") or ""
            if not argument and (command.get("content-type") or "").lower() == "text/plain":
                argument = command.body.decode("utf-8", errors="replace")
            loops = int(command.get("loops") or "1")
            hung_up = False
            for _ in range(max(loops, 1)):
                try:
                    await execute(switch, leg, application, argument, app_uuid=command.get("Event-UUID"))
                except HungUp:
                    hung_up = True
                    break
                except Transferred:
                    break
            private_command_event(switch, leg, command)
            await flush_deferred(switch, leg)
            if hung_up:
                raise HungUp
        elif call_command == "hangup":
            await switch.hangup(leg, command.get("hangup-cause") or "NORMAL_CLEARING")
            private_command_event(switch, leg, command)
            raise HungUp
        else:
            private_command_event(switch, leg, command)


def private_command_event(switch: Switch, leg: CallLeg, command: Command) -> None:
    """The sendmsg itself, fired as PRIVATE_COMMAND once parsed (switch_ivr_parse_next_event)."""
    if leg.parked_first:
        # As captured (b01): the first message of a freshly parked socket call fired no PRIVATE_COMMAND.
        leg.parked_first = False
        return
    leading = [("Command", command.line), *command.headers]
    switch.fire(
        "PRIVATE_COMMAND",
        leg.channel,
        calling=("switch_ivr.c", "switch_ivr_parse_next_event", 803),
        leading=leading,
        extended=False,
    )


async def app_socket(switch: Switch, leg: CallLeg, data: str) -> None:
    """Outbound ESL: connect to host:port, let the application control the call until it lets go."""
    from backend.channels.voice.simulator._esl import Listener

    parts = data.split()
    host, _, port = parts[0].rpartition(":")
    async_mode = "async" in parts[1:]
    full = "full" in parts[1:]
    channel = leg.channel
    channel.variables.set("socket_host", host)
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError as error:
        logger.error("Socket Error! %s:%s %s", host, port, error)
        channel.variables.set("current_application_response", "-ERR")
        return
    listener = Listener(switch, reader, writer, session=leg, async_mode=async_mode, full=full)
    switch.listeners.add(listener)
    leg.listener = listener
    reading = switch.spawn(listener.run(), f"socket-{channel.uuid}")
    leg.parked_first = True
    parked = False
    try:
        while not channel.down and not listener.closed.is_set() and leg.uuid_bridge is None:
            if not leg.private.empty():
                if not parked:
                    parked = True
                    switch.fire("CHANNEL_PARK", channel, calling=("switch_ivr.c", "switch_ivr_park", 1002))
                await process_private(switch, leg)
                continue
            closed = asyncio.ensure_future(listener.closed.wait())
            ready = asyncio.ensure_future(leg.private_ready.wait())
            hangup = asyncio.ensure_future(leg.hangup_signal.wait())
            moved = asyncio.ensure_future(leg.redirect.wait())
            try:
                await asyncio.wait({closed, ready, hangup, moved}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (closed, ready, hangup, moved):
                    waiter.cancel()
                leg.private_ready.clear()
    except HungUp:
        pass
    if parked:
        switch.fire("CHANNEL_UNPARK", channel, calling=("switch_ivr.c", "switch_ivr_park", 1155))
    if leg.uuid_bridge is not None and not channel.down:
        # uuid_bridge changed the channel's state: switch_ivr_park returned, the socket application ends, and the
        # extension goes on with its next action once the bridge is over (uuid_bridge_on_soft_execute sets
        # CS_EXECUTE again), unless the bridge ended the channel. The listener stays attached for the events.
        await asyncio.shield(leg.uuid_bridge)
        if channel.down:
            return
    if channel.down:
        # The listener stays for the linger notice, which teardown sends after HANGUP_COMPLETE.
        return
    del reading


async def app_transfer(switch: Switch, leg: CallLeg, data: str) -> None:
    parts = data.split()
    context = parts[2] if len(parts) > 2 else (leg.channel.profile.context if leg.channel.profile else "default")
    leg.transfer_to = (parts[0], parts[1] if len(parts) > 1 else "XML", context)


async def app_eavesdrop(switch: Switch, leg: CallLeg, data: str) -> None:
    """mod_dptools eavesdrop on one uuid (switch_ivr_eavesdrop_session): a media bug on the target, a third
    party on its call until either side hangs up, as e02/e04 show.

    The flags come from the eavesdropper's variables as eavesdrop_function reads them: `eavesdrop_enable_dtmf`
    (on unless set false), `eavesdrop_whisper_aleg` (ED_MUX_READ: the eavesdropper is mixed into what the
    target reads, so the target's partner hears them), `eavesdrop_whisper_bleg` (ED_MUX_WRITE: mixed into
    what is written to the target, so the target hears them). With DTMF on, each key the eavesdropper's
    channel receives (its phone, or `uuid_recv_dtmf`) is dequeued in the loop: 1 = MUX_READ only, 2 =
    MUX_WRITE only, 3 = both, 0 = neither, * ends the eavesdrop; other keys are ignored.
    """
    target = switch.find(data.strip())
    if target is None or target is leg or target.channel.down:
        leg.channel.variables.set("current_application_response", "-ERR no such channel")
        return
    variables = leg.channel.variables
    enable = variables.get("eavesdrop_enable_dtmf")
    state = Eavesdrop(
        target=target.channel.uuid,
        dtmf=truthy(enable) if enable is not None else True,
        mux_read=truthy(variables.get("eavesdrop_whisper_aleg")),
        mux_write=truthy(variables.get("eavesdrop_whisper_bleg")),
    )
    if not leg.channel.answered:
        switch.mark_answered(leg)
    read_codec_event(switch, leg)
    bug = [("Media-Bug-Function", "eavesdrop"), ("Media-Bug-Target", target.channel.uuid)]
    media_bug = ("switch_core_media_bug.c", "switch_core_media_bug_add", 1014)
    switch.fire("MEDIA_BUG_START", target.channel, calling=media_bug, pre=bug)
    leg.eavesdrop = state
    hangup = asyncio.ensure_future(target.hangup_signal.wait())
    mine = asyncio.ensure_future(leg.hangup_signal.wait())
    try:
        while not leg.channel.down and not target.channel.down:
            if state.dtmf and leg.channel.digits:
                if not _eavesdrop_command(state, leg.channel.digits.pop(0)):
                    break
                continue
            leg.dtmf_signal.clear()
            keys = asyncio.ensure_future(leg.dtmf_signal.wait())
            try:
                await asyncio.wait({hangup, mine, keys}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                keys.cancel()
    finally:
        hangup.cancel()
        mine.cancel()
        leg.eavesdrop = None
    read_codec_event(switch, leg)
    if not target.torn_down:
        stop = ("switch_core_media_bug.c", "switch_core_media_bug_destroy", 1287)
        switch.fire("MEDIA_BUG_STOP", target.channel, calling=stop, pre=bug)
    if leg.channel.down:
        raise HungUp


def _eavesdrop_command(state: Eavesdrop, key: str) -> bool:
    """One key of switch_ivr_eavesdrop_session's command loop; False for `*` (the eavesdrop ends)."""
    if key == "1":
        state.mux_read, state.mux_write = True, False
    elif key == "2":
        state.mux_read, state.mux_write = False, True
    elif key == "3":
        state.mux_read, state.mux_write = True, True
    elif key == "0":
        state.mux_read, state.mux_write = False, False
    elif key == "*":
        return False
    if key in "1230":
        state.commands.append(key)
    return True


def read_codec_event(switch: Switch, leg: CallLeg) -> None:
    channel = leg.channel
    switch.fire(
        "CODEC",
        channel,
        calling=("switch_core_codec.c", "switch_core_session_set_read_codec", 279),
        post=[
            ("channel-read-codec-name", channel.codec_name),
            ("channel-read-codec-rate", "8000"),
            ("channel-read-codec-bit-rate", channel.codec_bits),
        ],
    )


async def app_bridge(switch: Switch, leg: CallLeg, data: str) -> None:
    """mod_dptools bridge: ring the dial string (`,` rings legs at once, `|` tries groups in turn); when one
    answers, bridge, and return when the bridge ends; the others lose the race.

    After a failure, switch_channel_handle_cause hangs the caller up unless `continue_on_fail` allows the cause
    (without it only NO_ANSWER, NO_USER_RESPONSE and ORIGINATOR_CANCEL go on). After an answered bridge ends,
    `hangup_after_bridge=true` hangs the caller up with the other leg's cause (switch_ivr_multi_threaded_bridge).
    """
    channel = leg.channel
    common, rest = leading_variables(data, "{")
    groups = [group for group in split_top(rest, "|") if group.strip()]
    cause = "NO_ROUTE_DESTINATION"
    timeout = bridge_timeout(leg, common)
    for group in groups:
        dials = [dial.strip() for dial in split_top(group, ",") if dial.strip()]
        outcome = await ring_group(switch, leg, common, dials, timeout)
        if isinstance(outcome, CallLeg):
            await bridge_legs(switch, leg, outcome)
            return
        cause = outcome
        if channel.down:
            raise HungUp
    if channel.callstate == "RING_WAIT":
        switch.set_callstate(leg, "ACTIVE" if channel.answered else "RINGING")
    channel.variables.set("originate_disposition", cause)
    channel.variables.set("originate_failed_cause", cause)
    if leg.failed_legs:
        # switch_ivr_originate: `originate_causes`, one `<leg uuid>;<cause>` per leg rung.
        channel.variables.set("originate_causes", "ARRAY::" + "|:".join(f"{u};{c}" for u, c in leg.failed_legs))
        leg.failed_legs.clear()
    channel.variables.set("DIALSTATUS", dialstatus(cause))
    channel.variables.set("current_application_response", cause)
    if not continues_on_fail(leg, cause):
        logger.info("Originate Failed.  Cause: %s (no continue_on_fail: hanging up)", cause)
        await switch.hangup(leg, cause)
        raise HungUp


def continues_on_fail(leg: CallLeg, cause: str) -> bool:
    """switch_channel_handle_cause: whether the dialplan (or the socket application) goes on after `cause`."""
    setting = leg.channel.variables.get("continue_on_fail")
    if setting is None:
        return cause in ("NO_ANSWER", "NO_USER_RESPONSE", "ORIGINATOR_CANCEL")
    if setting.lower() in ("true", "yes", "on", "1", "enabled", "active", "allow"):
        return True
    causes = {item.strip().upper() for item in setting.split(",")}
    return cause in causes or str(Q850_CAUSES.get(cause, "")) in causes


Q850_CAUSES = {
    "USER_BUSY": 17,
    "NO_USER_RESPONSE": 18,
    "NO_ANSWER": 19,
    "CALL_REJECTED": 21,
    "NORMAL_TEMPORARY_FAILURE": 41,
}


def leading_variables(dial: str, opener: str) -> tuple[dict[str, str], str]:
    """`{a=b,c='d,e'}rest` (or `[..]`, `<..>`) into the variables and the rest."""
    variables: dict[str, str] = {}
    closer = {"{": "}", "[": "]", "<": ">"}[opener]
    dial = dial.lstrip()
    while dial.startswith(opener):
        end = matching(dial, 0, opener, closer)
        if end < 0:
            break
        for item in split_top(dial[1:end], ","):
            if "=" in item:
                key, _, value = item.partition("=")
                variables[key.strip().lstrip("^:")] = value.strip().strip("'")
        dial = dial[end + 1 :].lstrip()
    return variables, dial


def matching(text: str, start: int, opener: str, closer: str) -> int:
    depth = 0
    quoted = False
    for index in range(start, len(text)):
        char = text[index]
        if char == "'":
            quoted = not quoted
        elif not quoted and char == opener:
            depth += 1
        elif not quoted and char == closer:
            depth -= 1
            if depth == 0:
                return index
    return -1


def split_top(text: str, separator: str) -> list[str]:
    """Split on `separator` outside brackets and quotes (`,` between legs, `|` between groups)."""
    parts: list[str] = []
    depth = 0
    quoted = False
    current: list[str] = []
    for char in text:
        if char == "'":
            quoted = not quoted
        elif not quoted and char in "{[<":
            depth += 1
        elif not quoted and char in "}]>":
            depth -= 1
        if char == separator and depth == 0 and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def bridge_timeout(leg: CallLeg, common: dict[str, str]) -> float:
    """switch_ivr_originate: the caller's `call_timeout`, else `{originate_timeout}`, else 60 s."""
    for value in (leg.channel.variables.get("call_timeout"), common.get("originate_timeout")):
        if value and value.strip().isdigit() and int(value) > 0:
            return float(value)
    return 60.0


async def ring_group(
    switch: Switch, caller: CallLeg, common: dict[str, str], dials: list[str], timeout: float
) -> CallLeg | str:
    """Ring every dial string of the group at once; the first to answer wins, the others get LOSE_RACE."""
    if not dials:
        return "NO_ROUTE_DESTINATION"
    lost = asyncio.Event()
    tasks: list[asyncio.Future[CallLeg | str]] = []
    for dial in dials:
        own, target = leading_variables(dial, "[")
        variables = {**common, **own}
        leg_timeout = variables.get("leg_timeout")
        limit = float(leg_timeout) if leg_timeout and leg_timeout.isdigit() and int(leg_timeout) > 0 else timeout
        tasks.append(
            asyncio.ensure_future(
                originate_leg(switch, target, originator=caller, timeout=limit, variables=variables, lost=lost)
            )
        )
    winner: CallLeg | None = None
    causes: list[str] = []
    pending: set[asyncio.Future[CallLeg | str]] = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            outcome = task.result()
            if isinstance(outcome, CallLeg) and winner is None:
                winner = outcome
                lost.set()  # everyone still ringing loses the race
            elif isinstance(outcome, CallLeg):
                await switch.hangup(outcome, "LOSE_RACE")
                switch.spawn(switch.teardown(outcome), "lose-race")
            else:
                causes.append(outcome)
    if winner is not None:
        return winner
    if "NO_ANSWER" in causes:
        return "NO_ANSWER"
    return causes[0] if causes else "NORMAL_CLEARING"


def dialstatus(cause: str) -> str:
    return {
        "USER_BUSY": "BUSY",
        "NO_ANSWER": "NOANSWER",
        "NO_USER_RESPONSE": "NOANSWER",
        "SUCCESS": "SUCCESS",
        "CALL_REJECTED": "BUSY",
        "SUBSCRIBER_ABSENT": "CHANUNAVAIL",
        "USER_NOT_REGISTERED": "CHANUNAVAIL",
        "ORIGINATOR_CANCEL": "CANCEL",
    }.get(cause, "CHANUNAVAIL")


def strip_variables(dial: str) -> tuple[dict[str, str], str]:
    """`{a=b,c=d}[e=f]target` into the variables and the target."""
    variables: dict[str, str] = {}
    while dial and dial[0] in "{[<":
        close = {"{": "}", "[": "]", "<": ">"}[dial[0]]
        end = dial.find(close)
        if end < 0:
            break
        for item in re.split(r",(?![^']*'\s*$)", dial[1:end]):
            if "=" in item:
                key, _, value = item.partition("=")
                variables[key.strip().lstrip("^:")] = value.strip().strip("'")
        dial = dial[end + 1 :]
    return variables, dial


async def originate_leg(
    switch: Switch,
    dial: str,
    *,
    originator: CallLeg | None,
    timeout: float | None = None,
    variables: dict[str, str] | None = None,
    lost: asyncio.Event | None = None,
) -> CallLeg | str:
    """Create and ring an outbound leg; the answered leg, or the hangup cause (LOSE_RACE once `lost` is set)."""
    if variables is None:
        variables, target = strip_variables(dial)
        timeout = float(variables.get("originate_timeout") or variables.get("call_timeout") or 0) or timeout
    else:
        target = dial
    timeout = switch.scaled(timeout) if timeout else switch.scaled(switch.config.ring_timeout)
    if target.startswith("error/"):
        return target[6:].upper() or "NORMAL_CLEARING"
    if target.startswith("loopback/"):
        return await originate_loopback(switch, target, variables, originator)
    external: Endpoint | None = None
    if target.startswith("sofia/gateway/"):
        # A carrier gateway: the far end is a simulated PSTN party (an endpoint of its own, else one answering).
        user = target.split("/", 3)[-1]
        domain = "pstn"
        external = (
            switch.far_ends.get(user)
            or switch.endpoints.get(user)
            or Endpoint(user, domain, answer_delay=switch.config.answer_delay)
        )
    elif target.startswith("user/"):
        user, _, domain = target[5:].partition("@")
    elif target.startswith("sofia/"):
        # sofia/<profile>/<user>@<host> or sofia/<profile>/sip:<user>@<host>:<port>;params
        uri = target.split("/", 2)[-1].removeprefix("sip:").removeprefix("sips:")
        user = uri.split("@")[0]
        domain = switch.config.domain
    else:
        return "INVALID_GATEWAY"
    domain = domain or switch.config.domain
    if originator is not None and originator.channel.callstate != "RING_WAIT":
        switch.set_callstate(originator, "RING_WAIT")
    if external is None:
        probe = Endpoint(user, domain)
        exported: list[tuple[str, str]] = []
        if originator is not None:
            names = originator.channel.variables.get("export_vars")
            if names:
                exported.append(("export_vars", names))
                exported += [(n, originator.channel.variables.get(n) or "") for n in names.split(",") if n]
        await switch.directory_user(probe, action="user_call", exported=exported)
        if originator is not None:
            switch.inline_api("sofia_contact", f"*/{user}@{domain}", originator)
    endpoint = external or switch.endpoints.get(user)
    if endpoint is None:
        return "SUBSCRIBER_ABSENT" if originator is None else "USER_NOT_REGISTERED"
    a_profile = originator.channel.profile if originator else None
    # switch_core_session_outgoing_channel: the originator's effective_caller_id_* stand in for its caller
    # profile's, unless origination_caller_id_* name the new leg's (SOF_NO_EFFECTIVE_CID_*).
    a_effective = originator.channel.variables if originator else None
    name = f"sofia/internal/{user}@127.0.0.1:{endpoint.contact_port}"
    if external is not None:
        name = f"sofia/external/{user}"
    leg = switch.new_leg(
        name=name,
        direction="outbound",
        caller_id_name=variables.get("origination_caller_id_name")
        or (a_effective.get("effective_caller_id_name") if a_effective else None)
        or (a_profile.caller_id_name if a_profile else "Outbound Call"),
        caller_id_number=variables.get("origination_caller_id_number")
        or (a_effective.get("effective_caller_id_number") if a_effective else None)
        or (a_profile.caller_id_number if a_profile else "0000000000"),
        destination=user,
        username=a_profile.username if a_profile else "",
        context=a_profile.context if a_profile else "default",
        uuid=variables.get("origination_uuid"),
    )
    channel = leg.channel
    channel.hit_dialplan = False
    assert channel.profile is not None
    channel.profile.callee_id_name = "Outbound Call"
    channel.profile.callee_id_number = user
    if originator is not None and a_profile is not None:
        channel.other_type = "originator"
        channel.other_profile = dataclasses.replace(a_profile)
    switch.fire(
        "CHANNEL_OUTGOING",
        channel,
        calling=("switch_core_session.c", "switch_core_session_outgoing_channel", 721),
        extended=False,
    )
    v = channel.variables
    for key, value in (
        ("direction", "outbound"),
        ("is_outbound", "true"),
        ("uuid", channel.uuid),
        ("session_id", str(channel.session_id)),
        ("sip_profile_name", "internal"),
        ("text_media_flow", "disabled"),
        ("channel_name", name),
        ("sip_destination_url", endpoint.contact),
        ("dialed_user", user),
        ("dialed_domain", domain),
        ("sip_invite_domain", domain),
        ("presence_id", f"{user}@{domain}"),
        ("audio_media_flow", "sendrecv"),
        ("video_media_flow", "disabled"),
    ):
        v.set(key, value)
    for key, value in endpoint.variables.items():
        v.set(key, value)
    for key, value in (
        ("sip_from_user", a_profile.caller_id_number if a_profile else "0000000000"),
        ("sip_to_user", user),
        ("sip_call_id", f"{channel.uuid[:12]}@127.0.0.1"),
        ("call_uuid", channel.uuid),
    ):
        v.set(key, value)
    for key, value in variables.items():
        if key != "origination_uuid":
            v.set(key, value)
    if originator is not None:
        a_vars = originator.channel.variables
        v.set("originator_codec", "PCMU@8000h@20i@64000b")
        v.set("originator", originator.channel.uuid)
        for name in (a_vars.get("export_vars") or "").split(","):
            if name and a_vars.get(name):
                v.set(name, a_vars.get(name))
        if a_vars.get("export_vars"):
            v.set("export_vars", a_vars.get("export_vars"))
        v.set("originate_early_media", "false")
        v.set("originating_leg_uuid", originator.channel.uuid)
        v.set("originate_endpoint", "user")
        a_vars.set("dialed_user", user)
        a_vars.set("dialed_domain", domain)
    switch.set_state(leg, "CS_INIT")
    switch.fire("CHANNEL_CREATE", channel, calling=SESSION_RUN)
    switch.fire("CHANNEL_ORIGINATE", channel, calling=SESSION_RUN)
    switch.set_state(leg, "CS_ROUTING")
    switch.presence(leg, "CS_ROUTING", "alerting")
    switch.set_state(leg, "CS_CONSUME_MEDIA")
    if endpoint.behaviour in ("busy", "reject", "unallocated"):
        cause = {"busy": "USER_BUSY", "reject": "CALL_REJECTED", "unallocated": "UNALLOCATED_NUMBER"}[
            endpoint.behaviour
        ]
        await finish_failed_leg(switch, leg, cause, originator)
        return cause
    assert channel.profile is not None
    channel.profile.progress = now_us()
    switch.fire(
        "CHANNEL_PROGRESS", channel, calling=("switch_channel.c", "switch_channel_perform_mark_ring_ready_value", 1)
    )
    switch.set_callstate(leg, "RINGING")
    delay = switch.scaled(endpoint.answer_delay if endpoint.answer_delay is not None else switch.config.answer_delay)
    answers = endpoint.behaviour == "answer" and delay <= timeout
    waiters = [asyncio.ensure_future(leg.hangup_signal.wait())]
    if originator is not None:
        waiters.append(asyncio.ensure_future(originator.hangup_signal.wait()))
    if lost is not None:
        waiters.append(asyncio.ensure_future(lost.wait()))
    try:
        await asyncio.wait(waiters, timeout=delay if answers else timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if originator is not None and originator.channel.down:
        await finish_failed_leg(switch, leg, "ORIGINATOR_CANCEL", originator)
        return "ORIGINATOR_CANCEL"
    if lost is not None and lost.is_set() and not channel.down:
        await finish_failed_leg(switch, leg, "LOSE_RACE", originator)
        return "LOSE_RACE"
    if channel.down or not answers:
        cause = channel.hangup_cause or "NO_ANSWER"
        await finish_failed_leg(switch, leg, cause, originator)
        return cause
    switch.codec_events(leg)
    channel.answered = True
    channel.profile.answered = now_us()
    channel.profile.callee_id_name = "Outbound Call"
    channel.profile.callee_id_number = user
    v.set("endpoint_disposition", "ANSWER")
    switch.fire("CHANNEL_ANSWER", channel, calling=("switch_channel.c", "switch_channel_perform_mark_answered", 3998))
    switch.presence(leg, "Answered", "active")
    switch.set_callstate(leg, "ACTIVE")
    if endpoint.hangup_after is not None:
        schedule_hangup_seconds(switch, leg, switch.scaled(endpoint.hangup_after))
    return leg


def schedule_hangup_seconds(switch: Switch, leg: CallLeg, seconds: float) -> None:
    async def later() -> None:
        await asyncio.sleep(seconds)
        await switch.hangup(leg, "NORMAL_CLEARING")

    switch.spawn(later(), f"agent-hangup-{leg.channel.uuid}")


async def finish_failed_leg(switch: Switch, leg: CallLeg, cause: str, originator: CallLeg | None) -> None:
    await switch.hangup(leg, cause)
    if originator is not None:
        originator.failed_legs.append((leg.channel.uuid, cause))
    if originator is not None and not originator.channel.down and originator.channel.callstate == "RING_WAIT":
        switch.set_callstate(originator, "ACTIVE" if originator.channel.answered else "RINGING")
    await switch.teardown(leg)


async def originate_loopback(
    switch: Switch, target: str, variables: dict[str, str], originator: CallLeg | None
) -> CallLeg | str:
    """loopback/<exten>[/<context>]: a leg that runs the dialplan extension itself, answered at once."""
    parts = target.split("/")
    destination = parts[1] if len(parts) > 1 else ""
    context = parts[2] if len(parts) > 2 else "default"
    leg = switch.new_leg(
        name=f"loopback/{destination}-a",
        direction="outbound",
        caller_id_name="",
        caller_id_number=variables.get("origination_caller_id_number", "0000000000"),
        destination=destination,
        context=context,
        uuid=variables.get("origination_uuid"),
        source="mod_loopback",
    )
    channel = leg.channel
    channel.hit_dialplan = False
    channel.codec, channel.codec_name, channel.codec_bits = True, "L16", "128000"
    profile = channel.profile
    assert profile is not None
    # mod_loopback's a-leg as e04 shows it: no caller name, the callee is "Outbound Call"/<context>.
    profile.dialplan, profile.network_addr, profile.username = "xml", "", ""
    profile.caller_id_name = variables.get("origination_caller_id_name", "")
    profile.callee_id_name, profile.callee_id_number = "Outbound Call", context
    if variables.get("origination_uuid"):
        channel.running_state, channel.state = "CS_NONE", "CS_INIT"
        switch.fire(
            "CHANNEL_UUID",
            channel,
            calling=("switch_core_session.c", "switch_core_session_set_uuid", 2051),
            pre=[("Old-Unique-ID", Channel.new_uuid())],
        )
    outgoing = ("switch_core_session.c", "switch_core_session_outgoing_channel", 721)
    switch.fire("CHANNEL_OUTGOING", channel, calling=outgoing, extended=False)
    switch.set_state(leg, "CS_INIT")
    switch.fire("CHANNEL_CREATE", channel, calling=SESSION_RUN)
    switch.fire("CHANNEL_ORIGINATE", channel, calling=SESSION_RUN)
    switch.set_state(leg, "CS_ROUTING")
    switch.set_state(leg, "CS_CONSUME_MEDIA")
    channel.answered = True
    assert channel.profile is not None
    channel.profile.answered = now_us()
    switch.fire("CHANNEL_ANSWER", channel, calling=("switch_channel.c", "switch_channel_perform_mark_answered", 3998))
    switch.set_callstate(leg, "ACTIVE")
    channel.hit_dialplan = True
    # The loopback flips caller and callee ids when it answers (channel_cid_flipped).
    profile.orig_caller_id_name, profile.orig_caller_id_number = profile.caller_id_name, profile.caller_id_number
    profile.caller_id_name, profile.caller_id_number = profile.callee_id_name or "", profile.callee_id_number or ""
    profile.callee_id_name, profile.callee_id_number = None, profile.orig_caller_id_number
    channel.variables.set("channel_cid_flipped", "yes")
    switch.fire(
        "CALL_UPDATE",
        channel,
        calling=("switch_channel.c", "switch_channel_flip_cid", 3277),
        pre=[("Direction", "RECV")],
    )
    return leg


async def bridge_legs(switch: Switch, a: CallLeg, b: CallLeg) -> None:
    """CHANNEL_BRIDGE on the a-leg, then wait until one side hangs up; tear the b-leg down in FreeSWITCH's order."""
    a_channel, b_channel = a.channel, b.channel
    assert a_channel.profile is not None and b_channel.profile is not None
    if not a_channel.answered:
        switch.mark_answered(a)
    a_channel.profile.callee_id_name = "Outbound Call"
    a_channel.profile.callee_id_number = b_channel.profile.destination_number
    a_channel.other_type = "originatee"
    a_channel.other_profile = dataclasses.replace(b_channel.profile)
    if a_channel.callstate == "RING_WAIT":
        switch.set_callstate(a, "ACTIVE")
    if b_channel.other_type == "originator":
        b_channel.other_profile = dataclasses.replace(a_channel.profile)
    switch.fire(
        "CHANNEL_OUTGOING",
        b_channel,
        calling=("switch_core_session.c", "switch_core_session_outgoing_channel", 721),
        extended=False,
    )
    stamp = now_us()
    a_channel.profile.bridged = stamp
    b_channel.profile.bridged = stamp
    a_channel.partner = b_channel.uuid
    b_channel.partner = a_channel.uuid
    av, bv = a_channel.variables, b_channel.variables
    av.set("originated_legs", f"ARRAY::{b_channel.uuid};Outbound Call;{b_channel.profile.destination_number}")
    av.set("originate_causes", f"ARRAY::{b_channel.uuid};NONE")
    av.set("originate_disposition", "SUCCESS")
    av.set("DIALSTATUS", "SUCCESS")
    for variables, other in ((av, b_channel), (bv, a_channel)):
        variables.set("last_bridge_to", other.uuid)
        variables.set("bridge_channel", other.name)
        variables.set("bridge_uuid", other.uuid)
        variables.set("signal_bond", other.uuid)
    switch.fire(
        "CHANNEL_BRIDGE",
        a_channel,
        calling=("switch_ivr_bridge.c", "switch_ivr_multi_threaded_bridge", 1700),
        pre=[("Bridge-A-Unique-ID", a_channel.uuid), ("Bridge-B-Unique-ID", b_channel.uuid)],
    )
    switch.set_state(b, "CS_EXCHANGE_MEDIA")
    for leg, other in ((a, b_channel), (b, a_channel)):
        switch.fire(
            "CALL_UPDATE",
            leg.channel,
            calling=("mod_sofia.c", "sofia_receive_message", 2100),
            pre=[
                ("Direction", "SEND"),
                ("Sent-Callee-ID-Name", "Outbound Call"),
                ("Sent-Callee-ID-Number", b_channel.profile.destination_number),
                ("Bridged-To", other.uuid),
            ],
        )
    a.redirect.clear()
    b.redirect.clear()
    waiters = [
        asyncio.ensure_future(a.hangup_signal.wait()),
        asyncio.ensure_future(b.hangup_signal.wait()),
        asyncio.ensure_future(a.redirect.wait()),
        asyncio.ensure_future(b.redirect.wait()),
    ]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    unbridge = {
        "calling": ("switch_ivr_bridge.c", "switch_ivr_multi_threaded_bridge", 1800),
        "pre": [("Bridge-A-Unique-ID", a_channel.uuid), ("Bridge-B-Unique-ID", b_channel.uuid)],
    }
    if not a_channel.down and not b_channel.down and (a.redirect.is_set() or b.redirect.is_set()):
        # A `uuid_bridge` took one side away (CF_TRANSFER/CF_REDIRECT): the bridge ends, nobody hangs up for it.
        switch.fire("CHANNEL_UNBRIDGE", a_channel, **unbridge)  # type: ignore[arg-type]
        a_channel.partner = None
        b_channel.partner = None
        if b.redirect.is_set() and not a.redirect.is_set():
            # The originator's bridge returns; switch_ivr_multi_threaded_bridge's hangup_after_bridge applies.
            av.set("bridge_hangup_cause", "NORMAL_CLEARING")
            hang_up = truthy(av.get("hangup_after_bridge")) and not truthy(av.get("park_after_bridge"))
            if a.transfer_to is None and hang_up:
                await switch.hangup(a, "NORMAL_CLEARING")
                raise HungUp
        return
    if a_channel.down and not b_channel.down and truthy(bv.get("park_after_bridge")):
        # audio_bridge_on_exchange_media: the other side left; park_after_bridge parks this one.
        switch.fire("CHANNEL_UNBRIDGE", a_channel, **unbridge)  # type: ignore[arg-type]
        a_channel.partner = None
        b_channel.partner = None
        a.partner_teardown = None
        raise HungUp
    if a_channel.down:
        # The caller hung up: the b-leg goes with it (a08's order, the b-leg reported first).
        await switch.hangup(b, "NORMAL_CLEARING")
        switch.set_state(b, "CS_HANGUP")
        switch.set_callstate(b, "HANGUP")
        switch.fire("CHANNEL_UNBRIDGE", a_channel, **unbridge)  # type: ignore[arg-type]
        a.partner_teardown = b
        raise HungUp
    # The agent hung up: the caller stays and the extension goes on, unless hangup_after_bridge says otherwise.
    switch.fire("CHANNEL_UNBRIDGE", a_channel, **unbridge)  # type: ignore[arg-type]
    cause = b_channel.hangup_cause or "NORMAL_CLEARING"
    av.set("bridge_hangup_cause", cause)
    a_channel.partner = None
    a.deferred_teardown.append(b)
    if a.transfer_to is None and truthy(av.get("hangup_after_bridge")) and not truthy(av.get("park_after_bridge")):
        await switch.hangup(a, cause)
        raise HungUp


def truthy(value: str | None) -> bool:
    """switch_true."""
    return (value or "").lower() in ("true", "yes", "on", "1", "enabled", "active", "allow")


APPLICATIONS: dict[str, Application] = {
    "answer": app_answer,
    "pre_answer": app_pre_answer,
    "ring_ready": app_ring_ready,
    "playback": app_playback,
    "speak": app_speak,
    "sleep": app_sleep,
    "play_and_get_digits": app_play_and_get_digits,
    "read": app_read,
    "record_session": app_record_session,
    "record": app_record,
    "stop_record_session": app_stop_record_session,
    "set": app_set,
    "multiset": app_multiset,
    "unset": app_unset,
    "export": app_export,
    "hash": app_hash,
    "hangup": app_hangup,
    "sched_hangup": app_sched_hangup,
    "park": app_park,
    "socket": app_socket,
    "transfer": app_transfer,
    "eavesdrop": app_eavesdrop,
    "bridge": app_bridge,
}

"""The one adapter between call control and FreeSWITCH: the call's own outbound socket, or the node command path.

Everything call control asks of the switch goes through here, in FreeSWITCH's
own terms: dialplan applications on the caller's channel (`playback`,
`play_and_get_digits`, `bridge`, `record`, `multiset`), and API commands
(`uuid_break`, `uuid_kill`, `uuid_hold`, `uuid_record`, `uuid_setvar`,
`http_put`). A call whose controlling process died is driven by API commands
alone, through the process that holds its node's inbound socket
(`NodeLine`).
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from backend.channels.voice.commands import SwitchCommandError, SwitchCommands
from backend.channels.voice.esl import ChannelGone, ConnectionLost, Event, OutboundSession
from backend.channels.voice.media import quoted_argument

MENU_REGEX = ".+"
"""play_and_get_digits accepts any keys: the IVR flow decides what is valid (and says so)."""
DIGITS_VARIABLE = "cc_ivr_digits"


class CallerGone(Exception):
    """The caller's channel went away (hang-up, or the switch dropped the socket)."""


@dataclass(frozen=True, slots=True)
class ApiAnswer:
    """An API command's output: `-ERR ...` is an answer too (`ok` False)."""

    ok: bool
    text: str


class SwitchLine(Protocol):
    """API commands for one call's node, whichever way they travel."""

    async def api(self, command: str) -> ApiAnswer:
        """Run an API command on the call's node."""
        ...


def file_string(files: Sequence[str]) -> str:
    """One FreeSWITCH file string for several files: `file_string://a!b` (TTS text may hold no `!`)."""
    cleaned = [f.replace("!", ".") if f.startswith("tts://") else f for f in files]
    return cleaned[0] if len(cleaned) == 1 else "file_string://" + "!".join(cleaned)


def terminators_for(options: Sequence[str]) -> str:
    """A terminator that is not a menu key (play_and_get_digits always has one: `#` by default)."""
    for candidate in ("#", "*", "D"):
        if candidate not in options:
            return candidate
    return "D"


class CallChannel:
    """The caller's channel under our control through its `socket ... async full` connection."""

    def __init__(self, session: OutboundSession) -> None:
        self.session = session
        self.uuid = session.uuid

    @property
    def down(self) -> bool:
        """The channel hung up (or the socket is gone)."""
        return self.session.channel_down or self.session.closed

    async def execute(self, application: str, argument: str | None = None) -> Event:
        """Run a dialplan application on the caller's channel and return its CHANNEL_EXECUTE_COMPLETE."""
        if self.down:
            raise CallerGone(application)
        try:
            return await self.session.execute(application, argument)
        except (ChannelGone, ConnectionLost) as exc:
            raise CallerGone(application) from exc

    async def api(self, command: str) -> ApiAnswer:
        """An API command over the call's own socket (allowed with `full` control)."""
        try:
            reply = await self.session.api(command)
        except ConnectionLost as exc:
            raise CallerGone(command) from exc
        return ApiAnswer(reply.ok, reply.text.strip())

    async def set_many(self, values: dict[str, str]) -> None:
        """`multiset` with `|` between assignments (values may hold spaces, never `|`)."""
        if not values:
            return
        items = []
        for name, value in values.items():
            if "|" in value or "|" in name:
                raise ValueError(f"channel variable {name} cannot hold a |")
            items.append(f"{name}={value}")
        await self.execute("multiset", "^^|" + "|".join(items))

    async def export(self, name: str, value: str) -> None:
        """Set a variable on the caller's channel and on every leg it originates from now on."""
        await self.execute("export", f"{name}={value}")

    async def play(self, files: Sequence[str]) -> Event:
        """`playback` of one or more files (prompts, TTS, music); returns the completion."""
        return await self.execute("playback", file_string(files))

    async def collect(
        self,
        files: Sequence[str],
        *,
        min_digits: int,
        max_digits: int,
        timeout_ms: int,
        terminators: str,
        digit_timeout_ms: int | None = None,
    ) -> str | None:
        """`play_and_get_digits` once (the flow counts the retries): the keys pressed, or None for silence.

        The prompt is interruptible by the first key, as a caller expects; the terminator is not returned.
        """
        prompt = quoted_argument(file_string(files)) if files else "silence_stream://250"
        argument = " ".join(
            [
                str(min_digits),
                str(max_digits),
                "1",
                str(max(timeout_ms, 1000)),
                terminators or "#",
                prompt,
                "silence_stream://250",
                DIGITS_VARIABLE,
                MENU_REGEX,
                str(max(digit_timeout_ms or timeout_ms, 1000)),
            ]
        )
        done = await self.execute("play_and_get_digits", argument)
        if self.down:
            raise CallerGone("play_and_get_digits")
        digits = done.variable(DIGITS_VARIABLE) or done.variable(f"{DIGITS_VARIABLE}_invalid")
        return digits or None

    async def bridge(self, dial_string: str) -> Event:
        """`bridge`: returns when the bridge ends, or when no leg answered (see `originate_disposition`)."""
        return await self.execute("bridge", dial_string)

    async def break_media(self) -> None:
        """`uuid_break`: stop what the caller hears (music, a prompt) so the next instruction runs."""
        await self.api(f"uuid_break {self.uuid}")

    async def hangup(self, cause: str = "NORMAL_CLEARING") -> None:
        """End the call. A call already gone is not an error: after `hangup_after_bridge` the switch closes the
        socket (or resets it) while we may still be sending this."""
        with contextlib.suppress(CallerGone):
            await self.execute("hangup", cause)


class SocketLine:
    """API commands over a live call's own socket."""

    def __init__(self, channel: CallChannel) -> None:
        self.channel = channel

    async def api(self, command: str) -> ApiAnswer:
        return await self.channel.api(command)


class NodeLine:
    """API commands for a call whose socket is gone: through the process holding its node's inbound socket."""

    def __init__(self, commands: SwitchCommands, node_id: uuid.UUID) -> None:
        self.commands = commands
        self.node_id = node_id

    async def api(self, command: str) -> ApiAnswer:
        try:
            reply = await self.commands.api(self.node_id, command)
        except SwitchCommandError as exc:
            return ApiAnswer(False, f"-ERR {exc}")
        return ApiAnswer(reply.ok, reply.text.strip())


def seconds_left(timeout_ms: int) -> int:
    """A whole number of seconds for `call_timeout`/`leg_timeout`, at least one."""
    return max(1, math.ceil(timeout_ms / 1000))

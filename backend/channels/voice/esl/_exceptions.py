"""ESL errors, grouped by what the caller should do about them."""

from __future__ import annotations


class ESLError(Exception):
    """Base class of every error raised by the ESL library."""


class TransportError(ESLError):
    """The connection is unusable: reconnect (the inbound client does so on its own, with back-off)."""


class ConnectError(TransportError):
    """The switch could not be reached: it is down or the address is wrong; retry later."""


class ConnectionLost(TransportError):
    """The switch closed the connection, or we closed it; commands still waiting have failed."""


class NotConnected(TransportError):
    """No connection is up at the moment (the client is between reconnects); retry the command later."""


class ProtocolError(TransportError):
    """The peer sent bytes that are not ESL (garbage, a bad or oversized frame); the connection was dropped."""


class Timeout(TransportError):
    """No answer in time. For a command the connection is dropped, since replies can no longer be matched."""


class RefusedError(ESLError):
    """The switch refused us on purpose: fix the configuration, retrying as-is will not help."""


class AuthenticationError(RefusedError):
    """`auth` was answered `-ERR invalid`: the event-socket password is wrong."""


class AccessDenied(RefusedError):
    """`text/rude-rejection`: the switch's `apply-inbound-acl` does not allow our address."""


class CommandError(ESLError):
    """The switch answered a command, an `api` call or a background job with `-ERR`; the input was wrong.

    The connection is still fine.
    """

    def __init__(self, command: str, reply: str) -> None:
        super().__init__(f"{command!r} failed: {reply.strip()}")
        self.command = command
        self.reply = reply


class ChannelGone(ESLError):
    """The call's channel hung up or the outbound socket closed before an application completed."""

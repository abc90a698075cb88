"""A stand-in for the backend's HTTP side (xml_curl and CDR endpoints) that records exactly what it received."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

from tests.support.freeswitch_captures import fixture


@dataclass
class RecordedRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    at: float

    @property
    def form(self) -> list[tuple[str, str]]:
        """The urlencoded body's fields in order (FreeSWITCH leaves `,` unencoded and uses %20)."""
        pairs = []
        for item in self.body.decode().split("&"):
            name, _, value = item.partition("=")
            pairs.append((name, unquote(value)))
        return pairs

    def field(self, name: str) -> str | None:
        return next((value for key, value in self.form if key == name), None)


Responder = Callable[[RecordedRequest], tuple[int, str, bytes]]

NOT_FOUND = fixture("xml_curl/served_not_found.xml").read_bytes()


@dataclass
class BackendStandIn:
    """HTTP/1.1 server on 127.0.0.1 answering with `responder`; every request is kept in `requests`."""

    responder: Responder | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode().strip()
            method, target, _ = request_line.split(" ", 2)
            headers = []
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().rstrip("\r\n").partition(": ")
                headers.append((name, value))
                if name.lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            request = RecordedRequest(method, target, headers, body, asyncio.get_running_loop().time())
            self.requests.append(request)
            status, content_type, payload = (self.responder or default_responder)(request)
            reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}.get(status, "OK")
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
                f"Connection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def default_responder(request: RecordedRequest) -> tuple[int, str, bytes]:
    return 200, "text/xml", NOT_FOUND


def directory_user(user: str, *, password: str = "1234", domain: str = "127.0.0.1") -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<document type="freeswitch/xml">
  <section name="directory">
    <domain name="{domain}">
      <groups><group name="default"><users>
        <user id="{user}">
          <params><param name="password" value="{password}"/></params>
          <variables><variable name="user_context" value="default"/><variable name="xml_curl_served" value="true"/></variables>
        </user>
      </users></group></groups>
    </domain>
  </section>
</document>""".encode()


# The captures' call: the vanilla `global` extension's hash/export actions, then fixture_scenario_call.
A08_DIALPLAN = b"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<document type="freeswitch/xml"><section name="dialplan"><context name="default">
<extension name="global"><condition field="destination_number" expression="^7400$">
<action application="hash" data="insert/${domain_name}-spymap/${caller_id_number}/${uuid}"/>
<action application="hash" data="insert/${domain_name}-last_dial/${caller_id_number}/${destination_number}"/>
<action application="hash" data="insert/${domain_name}-last_dial/global/${uuid}"/>
<action application="export" data="RFC2822_DATE=${strftime(%a, %d %b %Y %T %z)}"/>
<action application="answer"/>
<action application="playback" data="tone_stream://%(500,500,440);loops=2"/>
<action application="play_and_get_digits"
 data="1 1 1 5000 # tone_stream://%(200,0,600) silence_stream://250 fixture_digit \\d"/>
<action application="record_session" data="$${recordings_dir}/fixture_${uuid}.wav"/>
<action application="bridge" data="user/1001@${domain_name}"/>
</condition></extension></context></section></document>"""


def socket_dialplan(port: int, destination: str = "7401", mode: str = "async full") -> bytes:
    return f"""<document type="freeswitch/xml"><section name="dialplan"><context name="default">
<extension name="fixture_outbound_socket"><condition field="destination_number" expression="^{destination}$">
<action application="socket" data="127.0.0.1:{port} {mode}"/></condition></extension>
</context></section></document>""".encode()


def fixture_responder(dialplan: bytes) -> Responder:
    """Directory: every user with password 1234; dialplan: `dialplan`; anything else: not found."""

    def respond(request: RecordedRequest) -> tuple[int, str, bytes]:
        section = request.field("section")
        if section == "directory" and request.field("user"):
            return 200, "text/xml", directory_user(request.field("user") or "")
        if section == "dialplan":
            return 200, "text/xml", dialplan
        return 200, "text/xml", NOT_FOUND

    return respond


async def until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01) -> None:
    """Wait until `predicate()` is true: the simulator's state is polled, never waited out with a fixed sleep."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polling another component's plain attributes
            await asyncio.sleep(interval)

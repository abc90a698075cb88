"""The end-to-end voice rig: the backend over real HTTP, simulators as processes, links with shortened intervals.

Everything here runs the production code path: the application's own routes
served by uvicorn on 127.0.0.1, `contactcenter switch-sim` processes (or
`SwitchSimulator` in-process) speaking real ESL, xml_curl and mod_json_cdr, and
`SwitchLinks` holding the nodes under real Redis leases. Only intervals are
shortened, through the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import httpx
import uvicorn
from litestar import Litestar

from backend.config import Settings
from tests.support.freeswitch_captures import REPO_ROOT

T = TypeVar("T")

SHORT_LINKS: dict[str, Any] = {
    "esl_lease_ttl_seconds": 0.9,
    "esl_lease_renew_seconds": 0.2,
    "esl_lease_poll_seconds": 0.1,
    "switch_nodes_refresh_seconds": 0.3,
    "esl_resync_min_seconds": 0.5,
    "esl_reconnect_initial_seconds": 0.05,
    "esl_reconnect_max_seconds": 0.4,
    "esl_reconnect_jitter": 0.1,
    "esl_connect_timeout_seconds": 2.0,
    "esl_command_timeout_seconds": 3.0,
    "switch_event_retry_seconds": 0.02,
    "switch_command_timeout_seconds": 3.0,
}
"""Lease, poll and reconnect intervals in tenths of a second, so takeovers are measured, never waited out."""


def link_settings(settings: Settings, pattern: str, **overrides: Any) -> Settings:
    """The application's settings with short link intervals, holding only the nodes matching `pattern`."""
    return replace(settings, **{**SHORT_LINKS, "esl_node_pattern": pattern, **overrides})


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Poll `check` until it returns something true, and return that (fails the test past `timeout`)."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < timeout:
        last = await check()
        if last:
            return last  # type: ignore[return-value]
        await asyncio.sleep(interval)
    raise AssertionError(f"not true within {timeout}s (last: {last!r})")


class BackendServer:
    """The application served over real HTTP by uvicorn in the test's event loop (stop and start it again)."""

    def __init__(self, app: Litestar, port: int = 0) -> None:
        self.app = app
        self.port = port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, lifespan="off", log_config=None, access_log=False
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """The backend goes away: connections refused from now on."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server = None
        self._task = None


def simulator_environment(
    backend: BackendServer, name: str, secret: str, *, err_dir: str, heartbeat: float = 0.2
) -> dict[str, str]:
    """How a simulated node is pointed at the backend, as the README says for a real FreeSWITCH."""
    return {
        "CC_SIM_HOSTNAME": name,
        "CC_SIM_ESL_PORT": "0",
        "CC_SIM_CONTROL_PORT": "0",
        "CC_SIM_XML_CURL_DIRECTORY_URL": f"{backend.url}/api/v1/switch/directory",
        "CC_SIM_XML_CURL_DIALPLAN_URL": f"{backend.url}/api/v1/switch/dialplan",
        "CC_SIM_XML_CURL_CREDENTIALS": f"{name}:{secret}",
        "CC_SIM_CDR_URL": f"{backend.url}/api/v1/switch/cdr",
        "CC_SIM_CDR_CREDENTIALS": f"{name}:{secret}",
        "CC_SIM_CDR_DELAY": "0.1",
        "CC_SIM_CDR_ERR_LOG_DIR": err_dir,
        "CC_SIM_HEARTBEAT": str(heartbeat),
        "CC_SIM_TIME_SCALE": "0.02",
        "CC_SIM_ANSWER_DELAY": "0",
        "CC_LOG_LEVEL": "WARNING",
    }


@dataclass
class SimProcess:
    """`contactcenter switch-sim` as its own process: a node that can be killed with SIGKILL."""

    environment: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    esl_port: int = 0
    control_port: int = 0
    hostname: str = ""
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=10))

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "backend.cli",
            "switch-sim",
            cwd=REPO_ROOT,
            env={**os.environ, **self.environment},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        async with asyncio.timeout(30):
            ready = json.loads(await self.process.stdout.readline())
        self.esl_port, self.control_port, self.hostname = ready["esl_port"], ready["control_port"], ready["hostname"]

    @property
    def control(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    async def call(self, method: str, path: str, **payload: Any) -> Any:
        response = await self.http.request(method, f"{self.control}{path}", json=payload or None)
        assert response.status_code < 300, response.text
        return response.json()

    async def kill(self) -> None:
        """kill -9: no goodbye, no hang-ups, no CDRs; the sockets just die."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        with contextlib.suppress(Exception):
            await self.http.aclose()

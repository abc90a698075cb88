"""A whole simulated node: event socket, heartbeat, control endpoint and scenarios, in-process or as a process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys

from backend.channels.voice.simulator._config import SimulatorConfig
from backend.channels.voice.simulator._control import ControlApi
from backend.channels.voice.simulator._esl import InboundServer
from backend.channels.voice.simulator._http import JsonServer
from backend.channels.voice.simulator._scenario import Scenario, run_scenario
from backend.channels.voice.simulator._switch import Switch

logger = logging.getLogger("backend.channels.voice.simulator")


class SwitchSimulator:
    """Start and stop a simulated FreeSWITCH node; `switch` is the in-process control API for tests."""

    def __init__(self, config: SimulatorConfig | None = None, *, control: bool = True) -> None:
        self.config = config or SimulatorConfig()
        self.switch = Switch(self.config)
        self.esl = InboundServer(self.switch)
        self.control = JsonServer(ControlApi(self.switch), self.config.control_host, self.config.control_port)
        self._with_control = control

    @property
    def esl_port(self) -> int:
        return self.esl.port

    @property
    def control_port(self) -> int:
        return self.control.port

    async def start(self) -> None:
        await self.esl.start()
        if self._with_control:
            await self.control.start()
        self.switch.start_heartbeat()

    async def stop(self) -> None:
        """Stop like a node that goes away: calls end without hanging up cleanly, sockets close."""
        await self.esl.close()
        if self._with_control:
            await self.control.close()
        await self.switch.stop()

    async def __aenter__(self) -> SwitchSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def play(self, scenario: Scenario) -> list[str]:
        return await run_scenario(self.switch, scenario)


async def serve(config: SimulatorConfig, scenarios: list[Scenario]) -> None:
    """Run until SIGINT/SIGTERM; prints one JSON line with the ports once listening."""
    simulator = SwitchSimulator(config)
    await simulator.start()
    ready = {
        "ready": True,
        "esl_port": simulator.esl_port,
        "control_port": simulator.control_port,
        "hostname": config.hostname,
        "core_uuid": simulator.switch.core_uuid,
    }
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    for scenario in scenarios:
        simulator.switch.spawn(simulator.play(scenario), "scenario")
    await stop.wait()
    await simulator.stop()

"""A FreeSWITCH simulator that speaks the real protocols (ESL both ways, xml_curl, json_cdr) for tests and demos."""

from backend.channels.voice.simulator._config import SimulatorConfig
from backend.channels.voice.simulator._runner import SwitchSimulator, serve
from backend.channels.voice.simulator._scenario import (
    CallPlan,
    LoadPlan,
    Scenario,
    Step,
    load_scenario_file,
    parse_scenario,
    run_scenario,
)
from backend.channels.voice.simulator._switch import Endpoint, Switch, write_wav

__all__ = [
    "CallPlan",
    "Endpoint",
    "LoadPlan",
    "Scenario",
    "SimulatorConfig",
    "Step",
    "Switch",
    "SwitchSimulator",
    "load_scenario_file",
    "parse_scenario",
    "run_scenario",
    "serve",
    "write_wav",
]

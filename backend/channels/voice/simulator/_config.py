"""The switch simulator's settings: every address, interval and limit, from CC_SIM_* variables or the CLI."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, str(default)))


def _scratch(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), "cc-sim", name)


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


@dataclass(slots=True)
class SimulatorConfig:
    """What a simulated FreeSWITCH node listens on, whom it calls, and how fast its clock runs."""

    hostname: str = field(default_factory=lambda: _env("CC_SIM_HOSTNAME", "fs-sim-1"))
    """FreeSWITCH-Hostname / switchname of the node, and `hostname=` in xml_curl requests."""
    ipv4: str = field(default_factory=lambda: _env("CC_SIM_IPV4", "127.0.0.1"))
    """FreeSWITCH-IPv4 and the SIP profile address."""
    esl_host: str = field(default_factory=lambda: _env("CC_SIM_ESL_HOST", "127.0.0.1"))
    """Where the inbound event socket listens (FreeSWITCH: 127.0.0.1)."""
    esl_port: int = field(default_factory=lambda: _int("CC_SIM_ESL_PORT", 8021))
    """The inbound event socket's port (FreeSWITCH: 8021); 0 picks a free one."""
    esl_password: str = field(default_factory=lambda: _env("CC_SIM_ESL_PASSWORD", "ClueCon"))
    """The event-socket password."""
    esl_allowed: tuple[str, ...] = field(
        default_factory=lambda: tuple(a for a in _env("CC_SIM_ESL_ALLOWED", "127.0.0.0/8,::1/128").split(",") if a)
    )
    """Networks allowed to connect (apply-inbound-acl); others get text/rude-rejection."""
    control_host: str = field(default_factory=lambda: _env("CC_SIM_CONTROL_HOST", "127.0.0.1"))
    """The test-control HTTP endpoint (always loopback)."""
    control_port: int = field(default_factory=lambda: _int("CC_SIM_CONTROL_PORT", 8099))
    """The test-control HTTP port; 0 picks a free one."""
    xml_curl_url: str = field(default_factory=lambda: _env("CC_SIM_XML_CURL_URL", ""))
    """gateway-url of the xml_curl binding for directory and dialplan; empty: only the static dialplan."""
    xml_curl_directory_url: str = field(default_factory=lambda: _env("CC_SIM_XML_CURL_DIRECTORY_URL", ""))
    """A binding of its own for `directory` (FreeSWITCH allows one per section); empty: xml_curl_url."""
    xml_curl_dialplan_url: str = field(default_factory=lambda: _env("CC_SIM_XML_CURL_DIALPLAN_URL", ""))
    """A binding of its own for `dialplan`; empty: xml_curl_url."""
    xml_curl_timeout: float = field(default_factory=lambda: _float("CC_SIM_XML_CURL_TIMEOUT", 3.0))
    """xml_curl's `timeout` (seconds); past it FreeSWITCH falls back to its static XML."""
    xml_curl_credentials: str = field(default_factory=lambda: _env("CC_SIM_XML_CURL_CREDENTIALS", ""))
    """xml_curl's `gateway-credentials`, `user:password`, sent as HTTP basic auth when set."""
    cdr_url: str = field(default_factory=lambda: _env("CC_SIM_CDR_URL", ""))
    """mod_json_cdr `url`; empty disables CDR posting."""
    cdr_credentials: str = field(default_factory=lambda: _env("CC_SIM_CDR_CREDENTIALS", ""))
    """mod_json_cdr `cred`, `user:password`, sent as HTTP basic auth when set."""
    cdr_retries: int = field(default_factory=lambda: _int("CC_SIM_CDR_RETRIES", 2))
    """mod_json_cdr `retries`: extra attempts after the first."""
    cdr_delay: float = field(default_factory=lambda: _float("CC_SIM_CDR_DELAY", 1.0))
    """mod_json_cdr `delay` between attempts, in seconds (FreeSWITCH takes whole seconds; tests shorten it)."""
    cdr_timeout: float = field(default_factory=lambda: _float("CC_SIM_CDR_TIMEOUT", 5.0))
    """mod_json_cdr `timeout` of one POST, in seconds."""
    cdr_err_log_dir: str = field(default_factory=lambda: _env("CC_SIM_CDR_ERR_LOG_DIR", _scratch("json_cdr_err")))
    """Where a CDR that could not be posted is written as `<uuid>.cdr.json`."""
    cdr_log_b_leg: bool = field(default_factory=lambda: _env("CC_SIM_CDR_LOG_B_LEG", "1") == "1")
    """mod_json_cdr `log-b-leg`."""
    cdr_encode_values: bool = field(default_factory=lambda: _env("CC_SIM_CDR_ENCODE_VALUES", "1") == "1")
    """mod_json_cdr `encode-values`: URL-encode values inside the JSON."""
    heartbeat_interval: float = field(default_factory=lambda: _float("CC_SIM_HEARTBEAT", 20.0))
    """event-heartbeat-interval (FreeSWITCH's default is 20 s; the product configures a few seconds)."""
    recordings_dir: str = field(default_factory=lambda: _env("CC_SIM_RECORDINGS", _scratch("recordings")))
    """$${recordings_dir}: where record_session writes WAV files."""
    sip_port: int = field(default_factory=lambda: _int("CC_SIM_SIP_PORT", 5060))
    """The simulated `internal` profile's SIP port (appears in URIs only)."""
    domain: str = field(default_factory=lambda: _env("CC_SIM_DOMAIN", "127.0.0.1"))
    """$${domain}: the default SIP domain of static users."""
    time_scale: float = field(default_factory=lambda: _float("CC_SIM_TIME_SCALE", 1.0))
    """Media durations (prompts, tones, TTS, ringing) are multiplied by this; tests use 0.01."""
    ring_timeout: float = field(default_factory=lambda: _float("CC_SIM_RING_TIMEOUT", 60.0))
    """call_timeout default for bridge/originate to an endpoint that does not answer, in seconds."""
    answer_delay: float = field(default_factory=lambda: _float("CC_SIM_ANSWER_DELAY", 0.5))
    """How long a simulated agent endpoint rings before it answers, in seconds (scaled)."""
    speak_seconds_per_char: float = field(default_factory=lambda: _float("CC_SIM_SPEAK_PER_CHAR", 0.06))
    """How long `speak` talks per character of text (scaled)."""
    default_playback_seconds: float = field(default_factory=lambda: _float("CC_SIM_PLAYBACK_SECONDS", 2.0))
    """Length of a prompt file whose length the simulator cannot know (scaled)."""
    registration_expires: int = field(default_factory=lambda: _int("CC_SIM_REG_EXPIRES", 3600))
    """Expires of simulated registrations, in seconds."""
    max_sessions: int = field(default_factory=lambda: _int("CC_SIM_MAX_SESSIONS", 1000))
    """max-sessions, reported in HEARTBEAT and `status`."""
    event_queue_size: int = field(default_factory=lambda: _int("CC_SIM_EVENT_QUEUE", 100_000))
    """Per-listener event queue (FreeSWITCH's MAX_QUEUE_LEN); a listener that overflows it is killed."""
    request_log_size: int = field(default_factory=lambda: _int("CC_SIM_REQUEST_LOG", 10_000))
    """How many of the latest requests (ESL commands, xml_curl, CDR deliveries) the node keeps for the control API
    and tests: a node that runs for days (the demo's) must not grow without end."""
    http_cache_headers: tuple[tuple[str, str], ...] = field(
        default_factory=lambda: tuple(
            (name.strip(), value.strip())
            for name, _, value in (item.partition(":") for item in _env("CC_SIM_HTTP_CACHE_HEADERS", "").split(";"))
            if name.strip()
        )
    )
    """Headers mod_http_cache's profile adds to its GETs and PUTs (`name: value;name: value`): the switch secret."""
    http_timeout: float = field(default_factory=lambda: _float("CC_SIM_HTTP_TIMEOUT", 10.0))
    """mod_http_cache's connect and transfer limit for one GET or PUT, in seconds."""
    scenario_dir: str = field(default_factory=lambda: _env("CC_SIM_SCENARIOS", ""))
    """Scenario files (JSON or YAML) to play at start-up; empty plays none."""

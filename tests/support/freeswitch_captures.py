"""FreeSWITCH 1.10.12's captured bytes (tests/fixtures/freeswitch): where they are and how tests read them.

The one place every test finds the captures: the conformance and parser tests replay
`.esl` files and their `.jsonl` transcripts, the backend tests replay the HTTP
requests and events. They are kept in the repository, byte for byte as captured
(`.gitattributes` stops any line-ending conversion), so a fresh clone tests alone;
`CC_FREESWITCH_FIXTURES` points elsewhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository's root directory."""
FIXTURES = Path(os.environ.get("CC_FREESWITCH_FIXTURES", REPO_ROOT / "tests" / "fixtures" / "freeswitch"))
NODE_NAME = "fs-node-1"
"""The captures' switchname: requests are replayed byte for byte, so the test node carries it."""
A_LEG = "7376847b-6112-4072-9af1-5a29049ccd1f"
"""The caller's leg of the captured scenario call (1000 -> 7400)."""
B_LEG = "24fc06a7-8d67-4a2f-bb7d-1bebd658e967"
"""The leg it bridged to (user 1001)."""


def fixture(*parts: str) -> Path:
    """A capture file, named as `fixture("json_cdr", name)` or `fixture("inbound_esl/a01_auth_ok_exit.esl")`."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"FreeSWITCH capture {path} missing: the captures live in tests/fixtures/freeswitch")
    return path


def esl_files() -> list[Path]:
    """Every captured `.esl` byte stream."""
    files = sorted(FIXTURES.glob("*/*.esl"))
    if not files:
        raise FileNotFoundError(f"no .esl captures under {FIXTURES}")
    return files


def transcript(esl_path: Path) -> list[dict[str, Any]]:
    """The `.jsonl` transcript beside a `.esl` capture: one record per write or frame, in order."""
    return [json.loads(line) for line in esl_path.with_suffix(".jsonl").read_text().splitlines() if line.strip()]


def http_request(group: str, name: str) -> tuple[str, dict[str, str], bytes]:
    """(request line, headers, body) of a captured HTTP request, exactly as FreeSWITCH's libcurl sent it."""
    raw = fixture(group, name).read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body)
    return lines[0], headers, body


def xml_curl_body(name: str) -> bytes:
    """The form body of a captured mod_xml_curl request."""
    return http_request("xml_curl", name)[2]


def rewrite_form(body: bytes, changes: Mapping[str, str]) -> bytes:
    """The same form with some fields' values replaced, encoded as FreeSWITCH does (`,` bare, spaces `%20`).

    Every other byte stays as captured. A name not in the form is appended.
    """
    parts = body.decode("ascii").split("&")
    seen = set()
    for index, part in enumerate(parts):
        name, _, _ = part.partition("=")
        if name in changes and name not in seen:
            parts[index] = f"{name}={quote(changes[name], safe=',')}"
            seen.add(name)
    parts += [f"{quote(name, safe='')}={quote(value, safe=',')}" for name, value in changes.items() if name not in seen]
    return "&".join(parts).encode("ascii")


def esl_events(group: str, name: str) -> list[dict[str, Any]]:
    """The events of a captured `event json` session, parsed as FreeSWITCH sent them."""
    events = []
    for line in fixture(group, name).read_text().splitlines():
        record = json.loads(line)
        if record["dir"] == "recv" and record.get("content_type") == "text/event-json":
            events.append(json.loads(record["data"].split("\n\n", 1)[1]))
    return events


def a08_events() -> list[dict[str, Any]]:
    """The scenario call of `inbound_esl/a08` (1000 -> 7400 -> bridge to 1001), with registrations and heartbeats."""
    return esl_events("inbound_esl", "a08_event_json_all_scenario_call.jsonl")


def json_cdr(name: str) -> tuple[str, bytes]:
    """(request target, body) of a captured mod_json_cdr POST, or ("", bytes) for an err-log-dir file."""
    if name.endswith(".cdr.json"):
        return "", fixture("json_cdr", name).read_bytes()
    line, _, body = http_request("json_cdr", name)
    return line.split(" ")[1], body

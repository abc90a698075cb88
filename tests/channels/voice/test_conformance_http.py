"""The simulator's HTTP side against the captures: xml_curl form fields, mod_json_cdr retries and err-log-dir."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket

import pytest

from backend.channels.voice.esl import InboundClient
from backend.channels.voice.simulator import Endpoint, SwitchSimulator
from tests.channels.voice.support import A08_DIALPLAN, BackendStandIn, RecordedRequest, fixture_responder, until
from tests.channels.voice.test_conformance_inbound import simulator_config
from tests.support.freeswitch_captures import fixture

pytestmark = pytest.mark.integration


def captured_request(name: str) -> tuple[str, list[str], bytes]:
    raw = fixture(name).read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    return lines[0], [line.split(":", 1)[0] for line in lines[1:]], body


def field_names(body: bytes) -> list[str]:
    return [item.split("=", 1)[0] for item in body.decode().split("&")]


def non_variable(names: list[str]) -> list[str]:
    return [name for name in names if not name.startswith("variable_")]


async def test_xml_curl_requests_have_freeswitchs_fields_in_its_order():
    backend = BackendStandIn(fixture_responder(A08_DIALPLAN))
    await backend.start()
    async with SwitchSimulator(simulator_config(xml_curl_url=f"{backend.url}/fsapi")) as simulator:
        switch = simulator.switch
        assert await switch.register(Endpoint("1001", "127.0.0.1", answer_delay=0, hangup_after=0.1))
        uuid = await switch.place_call("7400", from_user="1000", caller_name="sipp")
        await asyncio.sleep(0.4)
        switch.press(uuid, "0")
        client = InboundClient("127.0.0.1", simulator.esl_port, "ClueCon")
        await client.start(timeout=5)
        assert (await client.api("originate user/9876@127.0.0.1 &park()")).text == "-ERR SUBSCRIBER_ABSENT"
        await client.close()
        await until(lambda: not switch.legs)
    await backend.close()

    def find(predicate) -> RecordedRequest:
        return next(r for r in backend.requests if predicate(r))

    cases = {
        "c05_directory_sip_auth_register_1001": find(lambda r: r.field("sip_auth_method") == "REGISTER"),
        "c06_directory_message_count_1001": find(lambda r: r.field("action") == "message-count"),
        "c07_directory_sip_auth_invite_1000_a1hash": find(lambda r: r.field("sip_auth_method") == "INVITE"),
        "c09_directory_user_call_1001_bridge": find(
            lambda r: r.field("action") == "user_call" and r.field("user") == "1001"
        ),
        "c10_directory_user_call_nonexistent_9876": find(lambda r: r.field("user") == "9876"),
    }
    for name, request in cases.items():
        line, header_names, body = captured_request(f"xml_curl/{name}.request.txt")
        assert f"{request.method} {request.target} HTTP/1.1" == line, name
        assert [h for h, _ in request.headers] == header_names, name
        assert dict(request.headers)["User-Agent"] == "freeswitch-xml/1.0"
        assert dict(request.headers)["Content-Type"] == "application/x-www-form-urlencoded"
        assert field_names(request.body) == field_names(body), name
    dialplan = find(lambda r: r.field("section") == "dialplan")
    _, header_names, body = captured_request("xml_curl/c08_dialplan_inbound_call_7400.request.txt")
    assert non_variable(field_names(dialplan.body)) == non_variable(field_names(body))
    assert {"variable_sip_from_user", "variable_sip_req_user", "variable_call_uuid"} <= set(field_names(dialplan.body))
    assert dialplan.field("Caller-Destination-Number") == "7400" and dialplan.field("Hunt-Destination-Number") == "7400"
    # FreeSWITCH's form encoding: `,` stays, spaces are %20, `:` and `@` are escaped.
    assert re.search(rb"Event-Date-GMT=\w{3},%20\d\d%20", dialplan.body)
    assert b"Channel-Name=sofia/internal/1000%40127.0.0.1" in dialplan.body


def cdr_config(url: str, err_dir: str, **extra):
    return simulator_config(cdr_url=url, cdr_retries=2, cdr_delay=0.2, cdr_err_log_dir=err_dir, **extra)


async def short_call(simulator: SwitchSimulator) -> str:
    uuid = await simulator.switch.place_call("7499", caller_number="15550100")
    await until(lambda: not simulator.switch.legs and simulator.switch.cdr_results)
    return uuid


async def test_json_cdr_retries_then_writes_the_err_log_dir_file(tmp_path):
    backend = BackendStandIn(lambda request: (500, "text/plain", b"boom\n"))
    await backend.start()
    async with SwitchSimulator(cdr_config(f"{backend.url}/cdr", str(tmp_path))) as simulator:
        uuid = await short_call(simulator)
    await backend.close()
    posts = [r for r in backend.requests if r.target == f"/cdr?uuid={uuid}"]
    assert len(posts) == 3  # 1 + retries
    assert len({p.body for p in posts}) == 1  # the same bytes each time
    gaps = [b.at - a.at for a, b in itertools.pairwise(posts)]
    assert all(gap >= 0.19 for gap in gaps), gaps
    line, header_names, captured_body = captured_request("json_cdr/d04_cdr_post_answered_500_try1.request.txt")
    assert line.startswith("POST /cdr?uuid=")
    assert [h for h, _ in posts[0].headers] == header_names
    assert dict(posts[0].headers)["User-Agent"] == "freeswitch-json/1.0"
    document = json.loads(posts[0].body)
    assert list(document) == list(json.loads(captured_body))
    assert document["variables"]["uuid"] == uuid
    assert "%3A" in document["variables"]["start_stamp"]  # encode-values=true: values URL-encoded
    saved = tmp_path / f"{uuid}.cdr.json"
    assert saved.read_bytes() == posts[0].body + b"\n"
    captured_file = fixture("json_cdr/d07_err_log_dir_file_after_500.be8eca59-0658-4698-8142-5884a677f46f.cdr.json")
    assert captured_file.read_bytes().endswith(b"}\n")


async def test_json_cdr_with_the_endpoint_down_also_lands_in_err_log_dir(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with SwitchSimulator(cdr_config(f"http://127.0.0.1:{port}/cdr", str(tmp_path))) as simulator:
        uuid = await short_call(simulator)
        result = simulator.switch.cdr_results[0]
    assert result == {"uuid": uuid, "delivered": False, "attempts": 3, "file": str(tmp_path / f"{uuid}.cdr.json")}
    assert json.loads((tmp_path / f"{uuid}.cdr.json").read_bytes())["variables"]["uuid"] == uuid


async def test_json_cdr_posts_each_leg_once_b_leg_first(tmp_path):
    backend = BackendStandIn(lambda request: (200, "text/plain", b"ok"))
    await backend.start()
    async with SwitchSimulator(cdr_config(f"{backend.url}/cdr", str(tmp_path))) as simulator:
        assert await simulator.switch.register(Endpoint("1001", "127.0.0.1", answer_delay=0, hangup_after=0.2))
        uuid = await simulator.switch.place_call("7403", caller_number="15550100")
        await until(lambda: len(backend.requests) >= 2)
    await backend.close()
    targets = [r.target for r in backend.requests]
    assert len(targets) == 2 and targets[1] == f"/cdr?uuid={uuid}"
    assert not list(tmp_path.iterdir())


async def test_directory_and_dialplan_can_have_bindings_of_their_own():
    directory = BackendStandIn(fixture_responder(A08_DIALPLAN))
    dialplan = BackendStandIn(fixture_responder(A08_DIALPLAN))
    await directory.start()
    await dialplan.start()
    config = simulator_config(
        xml_curl_directory_url=f"{directory.url}/directory",
        xml_curl_dialplan_url=f"{dialplan.url}/dialplan",
        xml_curl_credentials="fs-node-1:dev-switch-secret",
    )
    async with SwitchSimulator(config) as simulator:
        assert await simulator.switch.register(Endpoint("1001", "127.0.0.1"))
        await simulator.switch.place_call("7499")
        await until(lambda: dialplan.requests and not simulator.switch.legs)
    await directory.close()
    await dialplan.close()
    assert {r.field("section") for r in directory.requests} == {"directory"}
    assert {r.field("section") for r in dialplan.requests} == {"dialplan"}
    authorization = dict(dialplan.requests[0].headers)["Authorization"]
    assert authorization == "Basic ZnMtbm9kZS0xOmRldi1zd2l0Y2gtc2VjcmV0"
    assert [h for h, _ in dialplan.requests[0].headers][:3] == ["Host", "Authorization", "User-Agent"]

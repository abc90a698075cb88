"""CDRs from every way FreeSWITCH reports a leg: the hang-up event, mod_json_cdr's posts and retries, its err-log-dir.

Whatever arrives, and however often, each leg is one row; the row is committed
before the switch is told OK; nothing unattributable is dropped.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, text

from backend.channels.voice.cdrs import CdrRecorder, import_cdr_directory
from backend.channels.voice.legs import leg_from_event
from backend.channels.voice.models import CallLeg, UnattributedLeg
from backend.db.engine import tenant_transaction
from tests.factories import Factory
from tests.support.freeswitch_captures import A_LEG, B_LEG, a08_events, json_cdr

pytestmark = pytest.mark.integration

CDR = "/api/v1/switch/cdr"
D01 = "d01_cdr_a_leg_scenario_call_7400.request.txt"
D02 = "d02_cdr_b_leg_scenario_call_7400.request.txt"
RETRIED = "be8eca59-0658-4698-8142-5884a677f46f"
DOWN = "f071984c-0c05-4f3e-bc57-ece607d20d61"


def _at(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1_000_000, UTC)


def with_variables(body: bytes, **variables: str) -> bytes:
    """The captured CDR with variables added as our dialplan would have set them (URL-encoded like the rest)."""
    document = json.loads(body)
    document["variables"].update({name: quote(value, safe="") for name, value in variables.items()})
    return json.dumps(document, separators=(",", ":")).encode()


def renamed(body: bytes, leg: str, new_leg: str) -> bytes:
    """The same CDR for another leg UUID (so that tests do not share legs)."""
    return body.replace(leg.encode(), new_leg.encode())


def hangup_event(leg: str, **variables: str) -> dict[str, Any]:
    event = next(e for e in a08_events() if e["Event-Name"] == "CHANNEL_HANGUP_COMPLETE" and e["Unique-ID"] == leg)
    return {**event, **{f"variable_{name}": value for name, value in variables.items()}}


async def post_cdr(client, body: bytes, headers: dict[str, str], leg: str | None = None):
    return await client.post(
        CDR,
        params={"uuid": leg} if leg else None,
        content=body,
        headers={**headers, "content-type": "application/json", "user-agent": "freeswitch-json/1.0"},
    )


async def rows(sessionmaker, tenant_id: uuid.UUID, leg: str) -> list[CallLeg]:
    async with tenant_transaction(sessionmaker, tenant_id) as session:
        return list((await session.scalars(select(CallLeg).where(CallLeg.leg_uuid == uuid.UUID(leg)))).all())


async def unattributed(sessionmaker, leg: str) -> list[UnattributedLeg]:
    async with sessionmaker() as session:
        found = await session.scalars(select(UnattributedLeg).where(UnattributedLeg.leg_uuid == uuid.UUID(leg)))
        return list(found.all())


async def test_a_posted_cdr_is_stored_once_however_often_it_comes(
    factory: Factory, client, sessionmaker, switch_node, switch_headers
):
    ctx = await factory.tenant()
    target, body = json_cdr(D01)
    assert target == f"/cdr?uuid={A_LEG}"
    body = with_variables(body, cc_tenant_id=str(ctx.tenant_id))
    for _ in range(3):
        response = await post_cdr(client, body, switch_headers, A_LEG)
        assert response.status_code == 200, response.text
        assert response.text == "OK"
    [row] = await rows(sessionmaker, ctx.tenant_id, A_LEG)
    assert row.sources == ["json_cdr"]
    assert row.node_id == switch_node["id"] and row.node_name == "fs-node-1"
    assert row.call_uuid == uuid.UUID(A_LEG)
    assert (row.direction, row.caller_number, row.caller_name, row.destination_number) == (
        "inbound",
        "1000",
        "sipp",
        "7400",
    )
    assert row.started_at == _at(1795413797228968)
    assert row.answered_at == _at(1795413797228968)
    assert row.bridged_at == _at(1795413799908956)
    assert row.ended_at == _at(1795413805768939)
    assert (row.duration_ms, row.billable_ms) == (8540, 8540)
    assert (row.hangup_cause, row.hangup_cause_q850, row.disposition) == ("NORMAL_CLEARING", 16, "answered")
    assert row.details["sip_call_id"] == "1-19380@127.0.0.1"

    listed = await client.get("/api/v1/voice/cdrs", params={"call_uuid": A_LEG}, headers=ctx.headers)
    assert [c["leg_uuid"] for c in listed.json()["items"]] == [A_LEG]
    other = await factory.tenant()
    assert (await client.get("/api/v1/voice/cdrs", headers=other.headers)).json()["items"] == []


async def test_the_hangup_event_and_the_post_of_a_leg_make_one_row(
    factory: Factory, app, client, sessionmaker, switch_node, switch_headers
):
    """a08's CHANNEL_HANGUP_COMPLETE and d01/d02's posts are the same two legs: two rows, each from both sources."""
    ctx = await factory.tenant()
    voice = app.state.voice
    tenant = str(ctx.tenant_id)
    # a-leg: the event first, then the post; b-leg the other way round (it is posted first in real life).
    first = await voice.hangup_complete(switch_node["id"], hangup_event(A_LEG, cc_tenant_id=tenant))
    assert first.outcome == "created"
    assert (
        await post_cdr(client, with_variables(json_cdr(D01)[1], cc_tenant_id=tenant), switch_headers)
    ).status_code == 200
    assert (
        await post_cdr(client, with_variables(json_cdr(D02)[1], cc_tenant_id=tenant), switch_headers)
    ).status_code == 200
    second = await voice.hangup_complete(switch_node["id"], hangup_event(B_LEG, cc_tenant_id=tenant))
    assert second.outcome == "merged"
    again = await voice.hangup_complete(switch_node["id"], hangup_event(B_LEG, cc_tenant_id=tenant))
    assert again.outcome == "duplicate"
    [a] = await rows(sessionmaker, ctx.tenant_id, A_LEG)
    [b] = await rows(sessionmaker, ctx.tenant_id, B_LEG)
    assert a.sources == b.sources == ["event", "json_cdr"]
    assert b.call_uuid == uuid.UUID(A_LEG) and b.direction == "outbound"
    assert b.billable_ms == 5860
    assert await app.state.voice.live.count(switch_node["id"]) == 0


async def test_a_seats_legs_find_their_tenant_by_sip_domain(factory: Factory, app, sessionmaker, switch_node):
    """Without our variables, the a-leg's `domain_name` and the b-leg's `dialed_domain` name the tenant."""
    ctx = await factory.tenant()
    domain = (await factory.sip_seat(ctx))["domain"]
    a_leg, b_leg = str(uuid.uuid4()), str(uuid.uuid4())
    for leg, original in ((a_leg, A_LEG), (b_leg, B_LEG)):
        event = hangup_event(original)
        event = {k: (v.replace(original, leg) if isinstance(v, str) else v) for k, v in event.items()}
        event = {k: (v.replace("127.0.0.1", domain) if k.startswith("variable_d") else v) for k, v in event.items()}
        result = await app.state.voice.hangup_complete(switch_node["id"], event)
        assert result.tenant_id == ctx.tenant_id, leg
    assert len(await rows(sessionmaker, ctx.tenant_id, a_leg)) == 1


async def test_an_inbound_leg_finds_its_tenant_by_the_number_dialled(factory: Factory, app, sessionmaker, switch_node):
    ctx = await factory.tenant()
    number = await factory.number(ctx)
    leg = str(uuid.uuid4())
    event = {k: (v.replace(A_LEG, leg) if isinstance(v, str) else v) for k, v in hangup_event(A_LEG).items()}
    event["Caller-Destination-Number"] = number["number"].lstrip("+")
    event["variable_domain_name"] = "carrier.example"
    result = await app.state.voice.hangup_complete(switch_node["id"], event)
    assert result.tenant_id == ctx.tenant_id
    [row] = await rows(sessionmaker, ctx.tenant_id, leg)
    assert row.did == number["number"]


async def test_mod_json_cdr_retries_and_its_err_log_dir_end_as_one_row_each(
    factory: Factory, app, client, sessionmaker, switch_node, switch_headers, tmp_path: Path
):
    """d04-d06 are one leg posted three times (the recorder answered 500), d07 the file left after; d08 the
    file left while the endpoint was down. Loopback test calls belong to no tenant: kept, unattributed."""
    tries = [json_cdr(f"d0{n}_cdr_post_answered_500_try{n - 3}.request.txt") for n in (4, 5, 6)]
    assert len({body for _, body in tries}) == 1  # FreeSWITCH resends the very same bytes
    for target, body in tries:
        assert target == f"/cdr?uuid={RETRIED}"
        assert (await post_cdr(client, body, switch_headers, RETRIED)).status_code == 200
    err_dir = tmp_path / "json_cdr_err"
    (err_dir / "2026-11-23-06-05").mkdir(parents=True)
    for name, leg in (
        (f"d07_err_log_dir_file_after_500.{RETRIED}.cdr.json", RETRIED),
        (f"d08_err_log_dir_file_endpoint_down.{DOWN}.cdr.json", DOWN),
    ):
        shutil.copy(_capture(name), err_dir / f"{leg}.cdr.json")
    ctx = await factory.tenant()
    tenant_leg = str(uuid.uuid4())
    tenant_cdr = renamed(with_variables(json_cdr(D01)[1], cc_tenant_id=str(ctx.tenant_id)), A_LEG, tenant_leg)
    (err_dir / "2026-11-23-06-05" / f"{tenant_leg}.cdr.json").write_bytes(tenant_cdr)
    (err_dir / "broken.cdr.json").write_bytes(b'{"variables": ')
    (err_dir / "notes.txt").write_text("not a CDR")
    done = tmp_path / "imported"

    report = await import_cdr_directory(app.state.voice.cdrs, err_dir, done)
    assert (report.imported, report.duplicates, report.unattributed, report.rejected, report.failed) == (1, 0, 2, 1, 0)
    assert sorted(p.name for p in done.iterdir()) == sorted(f"{leg}.cdr.json" for leg in (RETRIED, DOWN, tenant_leg))
    assert [p.name for p in (err_dir / ".rejected").iterdir()] == ["broken.cdr.json"]
    assert (err_dir / "notes.txt").exists()

    [retried] = await unattributed(sessionmaker, RETRIED)
    assert retried.sources == ["err_log", "json_cdr"]
    assert retried.node_name == "fs-node-1"
    assert len(await unattributed(sessionmaker, DOWN)) == 1
    [row] = await rows(sessionmaker, ctx.tenant_id, tenant_leg)
    assert row.sources == ["err_log"]

    # The same files again (FreeSWITCH wrote them twice, an operator copied them back): nothing new.
    for path in done.iterdir():
        shutil.copy(path, err_dir / path.name)
    report = await import_cdr_directory(app.state.voice.cdrs, err_dir)
    assert (report.imported, report.duplicates, report.unattributed) == (0, 1, 2)
    assert not list(err_dir.glob("*.cdr.json"))
    assert len(await rows(sessionmaker, ctx.tenant_id, tenant_leg)) == 1


def _capture(name: str) -> Path:
    from tests.support.freeswitch_captures import fixture

    return fixture("json_cdr", name)


def test_the_import_command_reads_the_err_log_dir(factory: Factory, tmp_path: Path, switch_node):
    """`contactcenter import-cdrs` (what a cron job on the node runs), against the real database."""
    from backend.cli import main

    err_dir = tmp_path / "err"
    err_dir.mkdir()
    leg = str(uuid.uuid4())
    (err_dir / f"{leg}.cdr.json").write_bytes(renamed(json_cdr(D02)[1], B_LEG, leg))
    result = CliRunner().invoke(main, ["import-cdrs", "--dir", str(err_dir)])
    assert result.exit_code == 0, result.output
    assert "1 unattributed" in result.output
    assert not list(err_dir.glob("*.cdr.json"))


@pytest.mark.parametrize(
    ("body", "params", "field"),
    [
        (b"\x00\xff not json", None, "body"),
        (b"[1, 2, 3]", None, "body"),
        (b'{"variables": {"uuid": "nope"}}', None, "body"),
        (None, {"uuid": B_LEG}, "uuid"),
    ],
)
async def test_bad_cdr_bodies_are_problems_and_write_nothing(
    body, params, field, client, sessionmaker, switch_node, switch_headers
):
    sent = body if body is not None else json_cdr(D01)[1]
    response = await client.post(
        CDR, params=params, content=sent, headers={**switch_headers, "content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == field
    async with sessionmaker() as session:
        count = await session.scalar(
            select(func.count()).select_from(UnattributedLeg).where(UnattributedLeg.leg_uuid == uuid.UUID(A_LEG))
        )
    assert count == 0


async def test_parallel_deliveries_of_one_leg_make_one_row(
    factory: Factory, client, sessionmaker, switch_node, switch_headers
):
    ctx = await factory.tenant()
    leg = str(uuid.uuid4())
    body = renamed(with_variables(json_cdr(D01)[1], cc_tenant_id=str(ctx.tenant_id)), A_LEG, leg)
    responses = await asyncio.gather(*(post_cdr(client, body, switch_headers, leg) for _ in range(12)))
    assert {r.status_code for r in responses} == {200}
    assert len(await rows(sessionmaker, ctx.tenant_id, leg)) == 1


async def test_form_encoded_cdrs_are_accepted_too(factory: Factory, client, sessionmaker, switch_node, switch_headers):
    """mod_json_cdr with `encode=true` posts `cdr=<urlencoded JSON>` as a form."""
    ctx = await factory.tenant()
    leg = str(uuid.uuid4())
    body = renamed(with_variables(json_cdr(D01)[1], cc_tenant_id=str(ctx.tenant_id)), A_LEG, leg)
    response = await client.post(
        CDR,
        content=b"cdr=" + quote(body.decode(), safe="").encode(),
        headers={**switch_headers, "content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    assert len(await rows(sessionmaker, ctx.tenant_id, leg)) == 1


async def test_the_callers_leg_ends_its_interaction_once(factory: Factory, app, client, sessionmaker, switch_node):
    """A caller who hangs up while waiting abandons; the timeline says so once, whatever repeats."""
    ctx = await factory.tenant()
    interaction = await factory.waiting_interaction(ctx, channel="voice")
    leg = str(uuid.uuid4())
    event = {k: (v.replace(A_LEG, leg) if isinstance(v, str) else v) for k, v in hangup_event(A_LEG).items()}
    event = {**event, "variable_cc_tenant_id": str(ctx.tenant_id), "variable_cc_interaction_id": str(interaction)}
    for _ in range(2):
        await app.state.voice.hangup_complete(switch_node["id"], event)
    body = (await client.get(f"/api/v1/interactions/{interaction}", headers=ctx.headers)).json()
    assert body["state"] == "ended" and body["outcome"] == "abandoned"
    ended = [e for e in body["timeline"] if e["name"] == "ended"]
    assert len(ended) == 1
    assert ended[0]["data"]["leg_uuid"] == leg
    assert ended[0]["data"]["hangup_cause"] == "NORMAL_CLEARING"
    assert ended[0]["at"].startswith("2026-11-23T06:03:25")
    [row] = await rows(sessionmaker, ctx.tenant_id, leg)
    assert row.interaction_id == interaction


async def test_a_leg_closed_for_a_lost_node_gives_way_to_freeswitchs_report(
    factory: Factory, app, sessionmaker, switch_node
):
    ctx = await factory.tenant()
    recorder = app.state.voice.cdrs
    leg = str(uuid.uuid4())
    event = {k: (v.replace(A_LEG, leg) if isinstance(v, str) else v) for k, v in hangup_event(A_LEG).items()}
    event["variable_cc_tenant_id"] = str(ctx.tenant_id)
    facts = leg_from_event(event)
    await recorder.record(facts.closed(_at(1795413801000000)), "node_failure", switch_node["id"])
    [lost] = await rows(sessionmaker, ctx.tenant_id, leg)
    assert (lost.disposition, lost.ended_at, lost.sources) == ("node_failure", _at(1795413801000000), ["node_failure"])
    assert (await recorder.record(facts, "event", switch_node["id"])).outcome == "merged"
    [real] = await rows(sessionmaker, ctx.tenant_id, leg)
    assert (real.disposition, real.ended_at, real.sources) == (
        "answered",
        _at(1795413805768939),
        ["event", "node_failure"],
    )
    assert (await recorder.record(facts.closed(_at(1795413801000000)), "node_failure")).outcome == "duplicate"


async def test_an_unattributable_leg_is_kept_for_the_provider(client, sessionmaker, switch_node, switch_headers):
    """The capture's own call (domain 127.0.0.1, number 7400) belongs to no tenant: kept, not dropped."""
    leg = str(uuid.uuid4())
    body = renamed(json_cdr(D02)[1], B_LEG, leg)
    assert (await post_cdr(client, body, switch_headers, leg)).status_code == 200
    [kept] = await unattributed(sessionmaker, leg)
    assert kept.reason.startswith("no tenant")
    assert kept.leg["destination_number"] == "1001"
    async with sessionmaker() as session:
        assert await session.scalar(text("SELECT count(*) FROM voice_cdrs")) == 0  # no tenant context: no rows


async def test_legs_reported_together_share_commits_and_a_bad_one_fails_alone(
    factory: Factory, app, sessionmaker, switch_node
):
    """Group commit: hang-ups arriving while a commit runs are written by the next one (a multi-row INSERT per
    tenant), each caller returning once its own leg is durable; a leg the database refuses fails by itself."""
    recorder = app.state.voice.cdrs
    first, second = await factory.tenant(), await factory.tenant()
    legs = {ctx.tenant_id: [str(uuid.uuid4()) for _ in range(15)] for ctx in (first, second)}
    events = []
    for tenant_id, uuids in legs.items():
        for leg in uuids:
            event = {k: (v.replace(A_LEG, leg) if isinstance(v, str) else v) for k, v in hangup_event(A_LEG).items()}
            events.append({**event, "variable_cc_tenant_id": str(tenant_id)})
    refused = dict(events[3], **{"Unique-ID": str(uuid.uuid4()), "variable_cc_tenant_id": str(first.tenant_id)})
    refused_leg = replace(leg_from_event(refused), direction="sideways")  # the table's CHECK refuses it
    before = recorder.batches_written
    stored = await asyncio.gather(*(recorder.record_event(event, switch_node["id"]) for event in events[:20]))
    assert {r.outcome for r in stored} == {"created"}
    assert recorder.batches_written - before < 20  # commits were shared
    # One leg the database refuses, among others: it fails alone, the others are stored.
    before = recorder.batches_written
    *stored, failed = await asyncio.gather(
        *(recorder.record_event(event, switch_node["id"]) for event in events[20:]),
        recorder.record(refused_leg, "event", switch_node["id"]),
        return_exceptions=True,
    )
    assert isinstance(failed, Exception)
    assert all(not isinstance(r, Exception) and r.outcome == "created" for r in stored), stored
    assert recorder.batches_written - before < len(stored)
    for ctx in (first, second):
        async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
            found = await session.scalars(select(CallLeg.leg_uuid).where(CallLeg.tenant_id == ctx.tenant_id))
            assert {str(u) for u in found.all()} == set(legs[ctx.tenant_id])
    # A repeated report of a stored leg, in a batch with new ones, merges into its row.
    again = await asyncio.gather(recorder.record_event(events[0], switch_node["id"]), recorder.record_event(events[1]))
    assert {r.outcome for r in again} == {"duplicate"}


async def test_two_writers_reporting_the_same_legs_in_opposite_orders_do_not_deadlock(
    factory: Factory, app, sessionmaker, switch_node
):
    """A holder (hang-up events) and an API worker (mod_json_cdr) often report the same legs at once; each batch
    takes its rows' locks in leg order, so neither waits for the other in a cycle (a deadlock would fail a batch
    and make the recorder write it again in halves)."""
    tenants = [await factory.tenant() for _ in range(3)]
    events = []
    for index in range(60):
        leg = str(uuid.uuid4())
        event = {k: (v.replace(A_LEG, leg) if isinstance(v, str) else v) for k, v in hangup_event(A_LEG).items()}
        events.append({**event, "variable_cc_tenant_id": str(tenants[index % 3].tenant_id)})
    holder, api = CdrRecorder(sessionmaker), CdrRecorder(sessionmaker)
    for attempt in range(5):
        batch = [dict(e, **{"Unique-ID": str(uuid.uuid4())}) for e in events] if attempt else events
        results = await asyncio.gather(
            *(holder.record_event(event, switch_node["id"]) for event in batch),
            *(api.record_event(event, switch_node["id"]) for event in reversed(batch)),
        )
        assert {r.outcome for r in results} <= {"created", "duplicate", "merged"}, {r.outcome for r in results}
    # One commit per writer per round: no batch was refused and split.
    assert holder.batches_written == api.batches_written == 5


async def test_a_leg_reported_alone_for_a_known_tenant_is_one_statement(
    factory: Factory, app, sessionmaker, engine, switch_node
):
    """`record_cdr_leg` (migration 0024): once the tenant is confirmed, a report that has no other to share a commit
    with is one statement, without a transaction of the ORM's, whether it creates the row, folds into it or repeats
    it; and another tenant never sees the row."""
    from sqlalchemy import event

    ctx = await factory.tenant()
    other = await factory.tenant()
    recorder = CdrRecorder(sessionmaker)
    tenant = str(ctx.tenant_id)
    first_leg = leg_from_event(hangup_event(A_LEG, cc_tenant_id=tenant))
    assert (await recorder.record(first_leg, "event", switch_node["id"])).outcome == "created"  # confirms the tenant
    transactions: list[object] = []

    def began(connection: object) -> None:
        transactions.append(connection)

    b_leg = leg_from_event(hangup_event(B_LEG, cc_tenant_id=tenant))
    event.listen(engine.sync_engine, "begin", began)
    try:
        created = await recorder.record(b_leg, "event", switch_node["id"])
        merged = await recorder.record(replace(b_leg, caller_name="Alice"), "json_cdr", switch_node["id"])
        repeated = await recorder.record(b_leg, "json_cdr", switch_node["id"])
    finally:
        event.remove(engine.sync_engine, "begin", began)
    assert transactions == []
    assert (created.outcome, merged.outcome, repeated.outcome) == ("created", "merged", "duplicate")
    assert created.cdr_id == merged.cdr_id == repeated.cdr_id
    [row] = await rows(sessionmaker, ctx.tenant_id, B_LEG)
    assert row.sources == ["event", "json_cdr"]
    assert row.caller_name == (b_leg.caller_name or "Alice")  # a report only fills what the row lacks
    assert await rows(sessionmaker, other.tenant_id, B_LEG) == []

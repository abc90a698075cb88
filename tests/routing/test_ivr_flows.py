"""IVR flows over the API and the service: validation with field errors, drafts, immutable versions, pinning."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from backend.channels.voice.media import PromptLibrary
from backend.db.engine import tenant_transaction
from backend.lib.problems import InvalidInput
from backend.routing import ivr_service
from backend.routing.ivr_interpreter import DigitsEntered, Enqueue, PlaybackDone
from backend.routing.schemas import IvrFlowIn
from tests.factories import TONE_FLOW, Factory, MediaFactory

pytestmark = pytest.mark.integration


def menu_flow(queue_a: str, queue_b: str) -> dict:
    return {
        "start": "menu",
        "nodes": {
            "menu": {
                "type": "menu",
                "prompt": {"kind": "tts", "text": "1 or 2"},
                "options": {"1": "a", "2": "b"},
            },
            "a": {"type": "queue", "queue_id": queue_a},
            "b": {"type": "queue", "queue_id": queue_b},
        },
    }


async def test_save_refuses_references_of_another_tenant_naming_each_field(factory: Factory):
    a = await factory.tenant()
    b = await factory.tenant()
    media = MediaFactory(factory)
    foreign_queue = await factory.queue(b)
    foreign_hours = await factory.business_hours(b)
    foreign_prompt = (await media.prompt(b))["id"]
    foreign_agent = (await factory.user(b))["id"]
    graph = {
        "start": "h",
        "nodes": {
            "h": {"type": "hours", "business_hours_id": str(foreign_hours), "open": "p", "closed": "vm"},
            "p": {"type": "play", "prompt": {"kind": "file", "prompt_id": foreign_prompt}, "next": "q"},
            "q": {"type": "queue", "queue_id": str(foreign_queue)},
            "vm": {"type": "voicemail", "agent_id": str(foreign_agent)},
        },
    }
    response = await factory.client.post(
        "/api/v1/routing/ivr-flows", json={"name": "Main", "graph": graph}, headers=a.headers
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    errors = {e["field"]: e["message"] for e in response.json()["errors"]}
    assert errors == {
        "graph.nodes.h.business_hours_id": "is not business hours of this tenant",
        "graph.nodes.p.prompt.prompt_id": "is not a prompt of this tenant",
        "graph.nodes.q.queue_id": "is not a queue of this tenant",
        "graph.nodes.vm.agent_id": "is not an active user of this tenant",
    }
    listed = await factory.client.get("/api/v1/routing/ivr-flows", headers=a.headers)
    assert listed.json()["items"] == []  # nothing half-written


async def test_structural_errors_are_field_errors_and_malformed_nodes_are_400(factory: Factory):
    a = await factory.tenant()
    bad = {"start": "x", "nodes": {"x": {"type": "play", "prompt": {"kind": "tts", "text": "hi"}, "next": "gone"}}}
    response = await factory.client.post(
        "/api/v1/routing/ivr-flows", json={"name": "F", "graph": bad}, headers=a.headers
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "graph.nodes.x.next"
    unknown = {"start": "x", "nodes": {"x": {"type": "teleport"}}}
    response = await factory.client.post(
        "/api/v1/routing/ivr-flows", json={"name": "F", "graph": unknown}, headers=a.headers
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_size_limit_is_the_setting(factory: Factory, sessionmaker, settings_obj):
    a = await factory.tenant()
    tight = dataclasses.replace(settings_obj, ivr_max_nodes=1)
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        with pytest.raises(InvalidInput) as caught:
            await ivr_service.create_flow(
                session, a.system(), IvrFlowIn(name="Big", graph=_graph(TONE_FLOW)), PromptLibrary(), tight
            )
    assert caught.value.errors == [{"field": "graph.nodes", "message": "at most 1 nodes"}]


def _graph(raw: dict):
    import msgspec

    from backend.routing.ivr import FlowGraph

    return msgspec.convert(raw, FlowGraph)


async def test_publishing_pins_calls_to_their_version(factory: Factory, sessionmaker, settings_obj):
    a = await factory.tenant()
    first, second = await factory.queue(a), await factory.queue(a)
    created = await factory.client.post(
        "/api/v1/routing/ivr-flows",
        json={"name": "Main", "graph": menu_flow(str(first), str(first))},
        headers=a.headers,
    )
    assert created.status_code == 201, created.text
    flow_id = created.json()["id"]
    assert created.json()["published_version"] is None
    v1 = await factory.client.post(f"/api/v1/routing/ivr-flows/{flow_id}/publish", headers=a.headers)
    assert v1.status_code == 201 and v1.json()["version"] == 1

    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        pinned = await ivr_service.current_version(session, uuid.UUID(flow_id))
    ivr = pinned.interpreter(settings_obj)
    in_progress = ivr.start({"caller_number": "+33600000000"})

    # The draft moves on, and is published as version 2, while the call is in the menu.
    saved = await factory.client.put(
        f"/api/v1/routing/ivr-flows/{flow_id}",
        json={"name": "Main", "graph": menu_flow(str(second), str(second)), "draft_revision": 1},
        headers=a.headers,
    )
    assert saved.status_code == 200 and saved.json()["draft_revision"] == 2
    stale = await factory.client.put(
        f"/api/v1/routing/ivr-flows/{flow_id}",
        json={"name": "Main", "graph": menu_flow(str(first), str(first)), "draft_revision": 1},
        headers=a.headers,
    )
    assert stale.status_code == 409
    v2 = await factory.client.post(f"/api/v1/routing/ivr-flows/{flow_id}/publish", headers=a.headers)
    assert v2.json()["version"] == 2

    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        again = await ivr_service.pinned_version(session, uuid.UUID(flow_id), in_progress.state.version)
        newest = await ivr_service.current_version(session, uuid.UUID(flow_id))
    finished = again.interpreter(settings_obj).advance(in_progress.state, DigitsEntered("1"))
    assert finished.action == Enqueue(first, None, {}, None)  # the old version's queue
    new_call = newest.interpreter(settings_obj).start()
    assert newest.interpreter(settings_obj).advance(new_call.state, DigitsEntered("2")).action.queue_id == second  # type: ignore[union-attr]

    versions = await factory.client.get(f"/api/v1/routing/ivr-flows/{flow_id}/versions", headers=a.headers)
    assert [v["version"] for v in versions.json()["items"]] == [2, 1]
    one = await factory.client.get(f"/api/v1/routing/ivr-flows/{flow_id}/versions/1", headers=a.headers)
    assert one.json()["graph"]["nodes"]["a"]["queue_id"] == str(first)
    assert (
        await factory.client.get(f"/api/v1/routing/ivr-flows/{flow_id}/versions/x", headers=a.headers)
    ).status_code == 404


async def test_published_versions_cannot_be_changed_even_by_sql(factory: Factory, sessionmaker):
    a = await factory.tenant()
    flow_id = await MediaFactory(factory).flow(a)
    for statement in ("UPDATE ivr_flow_versions SET graph = '{}'", "DELETE FROM ivr_flow_versions"):
        with pytest.raises(DBAPIError, match="permission denied"):
            async with tenant_transaction(sessionmaker, a.tenant_id) as session:
                await session.execute(text(statement + " WHERE flow_id = :f"), {"f": flow_id})


async def test_numbers_point_at_published_flows_only_and_flows_in_use_are_kept(factory: Factory):
    a = await factory.tenant()
    b = await factory.tenant()
    media = MediaFactory(factory)
    number = await factory.number(a)
    draft_only = await media.flow(a, publish=False)
    published = await media.flow(a)
    foreign = await media.flow(b)
    url = f"/api/v1/voice/numbers/{number['id']}"
    for flow in (draft_only, foreign, uuid.uuid4()):
        response = await factory.client.patch(url, json={"ivr_flow_id": str(flow)}, headers=a.headers)
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["field"] == "ivr_flow_id"
    response = await factory.client.patch(url, json={"ivr_flow_id": str(published)}, headers=a.headers)
    assert response.status_code == 200 and response.json()["ivr_flow_id"] == str(published)
    refused = await factory.client.delete(f"/api/v1/routing/ivr-flows/{published}", headers=a.headers)
    assert refused.status_code == 409 and number["number"] in refused.json()["detail"]
    await factory.client.patch(url, json={"ivr_flow_id": None}, headers=a.headers)
    archived = await factory.client.delete(f"/api/v1/routing/ivr-flows/{published}", headers=a.headers)
    assert archived.status_code == 204
    listed = await factory.client.get("/api/v1/routing/ivr-flows?archived=true", headers=a.headers)
    assert [f["id"] for f in listed.json()["items"]] == [str(published)]
    # Calls already in an archived flow's version keep it.
    version = await factory.client.get(f"/api/v1/routing/ivr-flows/{published}/versions/1", headers=a.headers)
    assert version.status_code == 200


async def test_queues_hours_and_prompts_used_by_a_flow_are_not_deleted(factory: Factory):
    a = await factory.tenant()
    media = MediaFactory(factory)
    queue = await factory.queue(a)
    hours = await factory.business_hours(a)
    prompt = (await media.prompt(a))["id"]
    graph = {
        "start": "h",
        "nodes": {
            "h": {"type": "hours", "business_hours_id": str(hours), "open": "p", "closed": "p"},
            "p": {"type": "play", "prompt": {"kind": "file", "prompt_id": prompt}, "next": "q"},
            "q": {"type": "queue", "queue_id": str(queue)},
        },
    }
    await media.flow(a, graph)
    for url in (
        f"/api/v1/routing/queues/{queue}",
        f"/api/v1/routing/business-hours/{hours}",
        f"/api/v1/voice/prompts/{prompt}",
    ):
        response = await factory.client.delete(url, headers=a.headers)
        assert response.status_code == 409, (url, response.text)
        assert "IVR flows" in response.json()["detail"]


async def test_a_flow_runs_with_prompts_resolved_for_the_switch(factory: Factory, app, sessionmaker, settings_obj):
    a = await factory.tenant()
    prompt = await MediaFactory(factory).prompt(a)
    graph = {
        "start": "p",
        "nodes": {
            "p": {"type": "play", "prompt": {"kind": "file", "prompt_id": prompt["id"]}, "next": "t"},
            "t": {"type": "play", "prompt": {"kind": "tts", "text": "Bye | ${hack}", "voice": "kal"}, "next": "e"},
            "e": {"type": "hangup"},
        },
    }
    flow_id = await MediaFactory(factory).flow(a, graph)
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        pinned = await ivr_service.current_version(session, flow_id)
        ivr = pinned.interpreter(settings_obj)
        first = ivr.start()
        second = ivr.advance(first.state, PlaybackDone())
        files = await app.state.prompt_player.file_strings(
            session,
            a.tenant_id,
            [*first.action.speech, *second.action.speech],  # type: ignore[union-attr]
        )
    base = settings_obj.switch_media_base_url
    assert files[0] == (
        f"http_cache://{base}/api/v1/switch/prompts/{a.tenant_id}/{prompt['id']}/{prompt['sha256']}.wav"
    )
    assert files[1] == f"tts://{settings_obj.tts_engine}|kal|Bye hack"

"""Call control runs IVR flows end to end: every node type, driven by keys a simulated caller presses."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.channels.voice.call_rig import CallRig, call_rig
from tests.channels.voice.rig import eventually
from tests.factories import Factory, MediaFactory, TenantCtx

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ALWAYS_OPEN = [{"day": day, "start": "00:00", "end": "24:00"} for day in range(7)]


@pytest.fixture(scope="module")
async def rig(app, client, factory, tmp_path_factory) -> AsyncIterator[CallRig]:
    async with call_rig(app, client, factory, tmp_path_factory.mktemp("ivr")) as made:
        yield made


async def hours(factory: Factory, ctx: TenantCtx, weekly: list[dict[str, Any]]) -> str:
    response = await factory.client.post(
        "/api/v1/routing/business-hours",
        json={"name": f"h{uuid.uuid4().hex[:6]}", "weekly": weekly},
        headers=ctx.headers,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def tts(text: str) -> dict[str, str]:
    return {"kind": "tts", "text": text}


def full_flow(
    prompt_id: str, gold: uuid.UUID, standard: uuid.UUID, business_hours: str, *, menu_timeout: int = 30
) -> dict[str, Any]:
    """Every node type: set language, play a file and TTS, a menu, a digit collection, branches on a variable and
    on the customer, business hours, queues, a callback offer, voicemail and hang-up."""
    return {
        "start": "lang",
        "nodes": {
            "lang": {"type": "set_language", "language": "fr-FR", "voice": "alice", "next": "welcome"},
            "welcome": {"type": "play", "prompt": {"kind": "file", "prompt_id": prompt_id}, "next": "greet"},
            "greet": {"type": "play", "prompt": tts("Bienvenue"), "next": "menu"},
            "menu": {
                "type": "menu",
                "prompt": tts("Press 1 for accounts, 2 for opening hours"),
                "options": {"1": "account", "2": "hours"},
                "invalid_prompt": tts("That is not an option"),
                "retry_prompt": tts("Please choose"),
                "timeout_seconds": menu_timeout,
                "max_retries": 2,
                "on_failure": "bye",
            },
            "account": {
                "type": "collect",
                "prompt": tts("Enter your account number, then hash"),
                "variable": "account",
                "min_digits": 4,
                "max_digits": 8,
                "timeout_seconds": 30,
                "next": "vip",
            },
            "vip": {
                "type": "branch",
                "source": "variable",
                "name": "account",
                "cases": [{"op": "prefix", "value": "9", "next": "customer"}],
                "default": "bye",
            },
            "customer": {
                "type": "branch",
                "source": "customer",
                "name": "tags",
                "cases": [{"op": "equals", "value": "gold", "next": "gold"}],
                "default": "standard",
            },
            "gold": {"type": "queue", "queue_id": str(gold), "variables": ["account"], "attributes": {"path": "gold"}},
            "standard": {"type": "queue", "queue_id": str(standard)},
            "hours": {"type": "hours", "business_hours_id": business_hours, "open": "callback", "closed": "vm"},
            "callback": {
                "type": "callback_offer",
                "prompt": tts("Press 1 to be called back"),
                "queue_id": str(standard),
                "timeout_seconds": 30,
                "confirmation": tts("We will call you back"),
                "declined": "bye",
            },
            "vm": {
                "type": "voicemail",
                "queue_id": str(standard),
                "greeting": tts("Leave a message"),
                "max_seconds": 60,
            },
            "bye": {"type": "hangup", "prompt": tts("Goodbye")},
        },
    }


async def collecting(rig: CallRig, leg: str, count: int) -> bool:
    """The caller's channel is in its `count`-th digit collection (the prompt is playing or keys are awaited)."""
    found = rig.switch.find(leg)
    if found is None:
        return False
    runs = sum(1 for app, _ in found.channel.app_log if app == "play_and_get_digits")
    return runs >= count and found.channel.variables.get("current_application") == "play_and_get_digits"


async def press_at(rig: CallRig, leg: str, count: int, digits: str) -> None:
    await eventually(lambda: collecting(rig, leg, count))
    assert rig.switch.press(leg, digits)


async def ivr_nodes(rig: CallRig, ctx: TenantCtx, interaction_id: str) -> list[tuple[str, str | None]]:
    timeline = (await rig.interaction(ctx, interaction_id))["timeline"]
    return [(e["data"].get("node"), e["data"].get("rejected")) for e in timeline if e["name"] == "ivr_step"]


async def test_a_caller_walks_the_menu_enters_digits_and_reaches_the_queue_the_flow_chose(
    rig: CallRig, factory: Factory
):
    media = MediaFactory(factory)
    ctx = await factory.tenant()
    prompt = await media.prompt(ctx)
    gold, standard = await factory.queue(ctx), await factory.queue(ctx)
    await factory.customer(ctx, phones=["+33612345678"], tags=["gold"])
    flow = await media.flow(ctx, full_flow(prompt["id"], gold, standard, await hours(factory, ctx, ALWAYS_OPEN)))
    did = await rig.number(ctx, flow_id=flow)
    agent = await rig.agent(ctx)
    leg = await rig.call(did)
    await press_at(rig, leg, 1, "7")  # not an option: the invalid prompt, then the menu again
    await press_at(rig, leg, 2, "1")
    await press_at(rig, leg, 3, "9123#")
    iid = (await rig.interaction_of(ctx, leg))["id"]
    connected = await eventually(lambda: rig.state_is(ctx, iid, "connected"))
    assert connected["queue_id"] == str(gold) and connected["agent_id"] == str(agent.user_id)
    assert connected["attributes"]["account"] == "9123"
    assert connected["attributes"]["language"] == "fr-FR" and connected["attributes"]["path"] == "gold"
    assert await ivr_nodes(rig, ctx, iid) == [
        ("lang", None),
        ("welcome", None),
        ("greet", None),
        ("menu", None),
        ("menu", "7"),
        ("account", None),
        ("vip", None),
        ("customer", None),
        ("gold", None),
    ]
    played = rig.app_log(leg)
    # The uploaded prompt, from our switch media route through http_cache (fetched with the switch secret).
    fetched = [r for r in rig.switch.requests if r["kind"] == "http_cache" and prompt["sha256"] in str(r["url"])]
    assert fetched and fetched[0]["status"] == 200
    assert any(app == "playback" and prompt["sha256"] in data for app, data in played)
    # TTS in the voice the flow chose, the menu prompt quoted as one argument of play_and_get_digits.
    assert ("playback", "tts://flite|alice|Bienvenue") in played
    menus = [data for app, data in played if app == "play_and_get_digits"]
    assert menus[0].startswith("1 1 1 30000 # 'tts://flite|alice|Press 1 for accounts, 2 for opening hours'")
    assert menus[1].startswith("1 1 1 30000 # 'file_string://tts://flite|alice|That is not an option!")
    assert menus[2].startswith("4 8 1 30000 # ")
    await rig.switch.caller_hangup(leg)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))


async def test_closed_hours_send_the_caller_to_voicemail_which_becomes_the_calls_interaction(
    rig: CallRig, factory: Factory
):
    media = MediaFactory(factory)
    ctx = await factory.tenant()
    prompt = await media.prompt(ctx)
    queue = await factory.queue(ctx)
    flow = await media.flow(ctx, full_flow(prompt["id"], queue, queue, await hours(factory, ctx, [])))
    did = await rig.number(ctx, flow_id=flow)
    leg = await rig.call(did)
    await press_at(rig, leg, 1, "2")
    iid = (await rig.interaction_of(ctx, leg))["id"]

    async def recording_message() -> bool:
        found = rig.switch.find(leg)
        return found is not None and found.channel.variables.get("current_application") == "record"

    await eventually(recording_message)
    await rig.switch.caller_hangup(leg)  # the caller says their piece, then hangs up
    ended = await eventually(lambda: _with_voicemail(rig, ctx, iid))
    assert ended["outcome"] == "voicemail" and ended["state"] == "ended"
    voicemail_id = ended["attributes"]["voicemail_id"]
    audio = await rig.client.get(f"/api/v1/voice/voicemails/{voicemail_id}/audio", headers=ctx.headers)
    assert audio.status_code == 200 and audio.content[:4] == b"RIFF" and audio.content[8:12] == b"WAVE"
    assert [n for n, _ in await ivr_nodes(rig, ctx, iid)][-2:] == ["hours", "vm"]
    upload = [r for r in rig.switch.requests if r["kind"] == "http_cache" and r["method"] == "PUT"]
    assert any(voicemail_id in str(r["url"]) and r["status"] == 200 for r in upload)


async def _with_voicemail(rig: CallRig, ctx: TenantCtx, iid: str) -> dict[str, Any] | None:
    body = await rig.interaction(ctx, iid)
    return body if body["attributes"].get("voicemail_id") else None


async def test_open_hours_offer_a_callback_that_keeps_its_place_after_the_caller_hangs_up(
    rig: CallRig, factory: Factory
):
    media = MediaFactory(factory)
    ctx = await factory.tenant()
    prompt = await media.prompt(ctx)
    queue = await factory.queue(ctx)
    flow = await media.flow(ctx, full_flow(prompt["id"], queue, queue, await hours(factory, ctx, ALWAYS_OPEN)))
    did = await rig.number(ctx, flow_id=flow)
    leg = await rig.call(did)
    await press_at(rig, leg, 1, "2")
    await press_at(rig, leg, 2, "1")
    iid = (await rig.interaction_of(ctx, leg))["id"]
    await eventually(lambda: _gone_and_reported(rig, ctx, leg))
    body = await rig.interaction(ctx, iid)
    assert (body["channel"], body["state"]) == ("callback", "queued")
    assert body["attributes"]["callback_number"] == "+33612345678"
    assert "callback_requested" in [e["name"] for e in body["timeline"]]
    assert await rig.app.state.routing.matcher.state(ctx.tenant_id, uuid.UUID(iid)) == "waiting"


async def _gone_and_reported(rig: CallRig, ctx: TenantCtx, leg: str) -> bool:
    return rig.gone(leg) and bool(await rig.legs(ctx, leg_uuid=uuid.UUID(leg)))


async def test_keys_outside_the_menu_use_up_its_retries_and_the_flow_says_goodbye(
    rig: CallRig, factory: Factory, caplog
):
    media = MediaFactory(factory)
    ctx = await factory.tenant()
    prompt = await media.prompt(ctx)
    queue = await factory.queue(ctx)
    flow = await media.flow(ctx, full_flow(prompt["id"], queue, queue, await hours(factory, ctx, ALWAYS_OPEN)))
    did = await rig.number(ctx, flow_id=flow)
    leg = await rig.call(did)
    for attempt, key in enumerate("789", start=1):
        await press_at(rig, leg, attempt, key)
    iid = (await rig.interaction_of(ctx, leg))["id"]
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["outcome"] == "ivr"
    assert [r for _, r in await ivr_nodes(rig, ctx, iid) if r] == ["7", "8"]
    assert [n for n, _ in await ivr_nodes(rig, ctx, iid)][-1] == "bye"
    assert "ivr_input_not_accepted" in caplog.text
    assert await rig.app.state.routing.matcher.state(ctx.tenant_id, uuid.UUID(iid)) is None


async def test_silence_at_a_menu_replays_it_then_gives_up(rig: CallRig, factory: Factory):
    media = MediaFactory(factory)
    ctx = await factory.tenant()
    prompt = await media.prompt(ctx)
    queue = await factory.queue(ctx)
    graph = full_flow(prompt["id"], queue, queue, await hours(factory, ctx, ALWAYS_OPEN), menu_timeout=1)
    flow = await media.flow(ctx, graph)
    leg = await rig.call(await rig.number(ctx, flow_id=flow))
    iid = (await rig.interaction_of(ctx, leg))["id"]
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    played = [data for _, data in rig.app_log(leg)]
    assert ended["outcome"] == "ivr"
    assert sum(1 for data in played if "Please choose" in data) == 2  # the retry prompt, before each new try


def transfer_flow(agent_id: uuid.UUID, queue_id: uuid.UUID, number: str) -> dict[str, Any]:
    return {
        "start": "menu",
        "nodes": {
            "menu": {
                "type": "menu",
                "prompt": tts("Press 1 for your agent, 2 for the outside, 3 for sales"),
                "options": {"1": "agent", "2": "outside", "3": "sales"},
                "timeout_seconds": 30,
            },
            "agent": {"type": "transfer", "target": "agent", "agent_id": str(agent_id)},
            "outside": {"type": "transfer", "target": "external", "number": number},
            "sales": {"type": "transfer", "target": "queue", "queue_id": str(queue_id)},
        },
    }


async def test_a_transfer_node_puts_the_call_straight_through_to_an_agent(rig: CallRig, factory: Factory):
    media = MediaFactory(factory)
    ctx = await factory.tenant()
    agent = await rig.agent(ctx)
    flow = await media.flow(ctx, transfer_flow(agent.user_id, await factory.queue(ctx), "+33142685300"))
    leg = await rig.call(await rig.number(ctx, flow_id=flow))
    await press_at(rig, leg, 1, "1")
    iid = (await rig.interaction_of(ctx, leg))["id"]
    connected = await eventually(lambda: rig.state_is(ctx, iid, "connected"))
    assert connected["agent_id"] == str(agent.user_id)
    await eventually(lambda: _in_state(rig, agent, "busy"))
    await rig.switch.caller_hangup(leg)
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["outcome"] == "handled"


async def test_a_transfer_node_to_a_queue_and_one_to_the_outside_through_a_carrier(rig: CallRig, factory: Factory):
    media = MediaFactory(factory)
    ctx = await factory.tenant()
    gateway = await media.outbound_route("+33")
    queue = await factory.queue(ctx)
    agent = await rig.agent(ctx)
    flow = await media.flow(ctx, transfer_flow(agent.user_id, queue, "+33142685300"))
    did = await rig.number(ctx, flow_id=flow)

    to_queue = await rig.call(did)
    await press_at(rig, to_queue, 1, "3")
    first = (await rig.interaction_of(ctx, to_queue))["id"]
    connected = await eventually(lambda: rig.state_is(ctx, first, "connected"))
    assert connected["queue_id"] == str(queue)
    await rig.switch.caller_hangup(to_queue)
    await eventually(lambda: rig.state_is(ctx, first, "ended"))

    outside = await rig.call(did, caller_number="+33699999999")
    await press_at(rig, outside, 1, "2")
    second = (await rig.interaction_of(ctx, outside))["id"]
    ended = await eventually(lambda: rig.state_is(ctx, second, "ended"))
    assert ended["outcome"] == "transferred"
    bridges = [data for app, data in rig.app_log(outside) if app == "bridge"]
    await eventually(lambda: _bridged(rig, outside))
    assert bridges == [f"sofia/gateway/{gateway}/+33142685300"]
    await rig.switch.caller_hangup(outside)
    await eventually(lambda: _gone_and_reported(rig, ctx, outside))


async def _bridged(rig: CallRig, leg: str) -> bool:
    found = rig.switch.find(leg)
    return found is not None and bool(found.channel.partner)


async def test_publishing_a_new_version_does_not_change_a_call_in_the_old_one(rig: CallRig, factory: Factory):
    media = MediaFactory(factory)
    ctx = await factory.tenant()
    old_queue, new_queue = await factory.queue(ctx), await factory.queue(ctx)
    graph = {
        "start": "menu",
        "nodes": {
            "menu": {"type": "menu", "prompt": tts("Press 1"), "options": {"1": "q"}, "timeout_seconds": 30},
            "q": {"type": "queue", "queue_id": str(old_queue)},
        },
    }
    flow = await media.flow(ctx, graph)
    leg = await rig.call(await rig.number(ctx, flow_id=flow))
    await eventually(lambda: collecting(rig, leg, 1))
    # Meanwhile the flow is changed and published: new calls would go to the new queue.
    graph["nodes"]["q"]["queue_id"] = str(new_queue)
    detail = (await rig.client.get(f"/api/v1/routing/ivr-flows/{flow}", headers=ctx.headers)).json()
    saved = await rig.client.put(
        f"/api/v1/routing/ivr-flows/{flow}",
        json={"name": detail["name"], "graph": graph},
        headers=ctx.headers,
    )
    assert saved.status_code == 200, saved.text
    published = await rig.client.post(f"/api/v1/routing/ivr-flows/{flow}/publish", headers=ctx.headers)
    assert published.status_code == 201, published.text
    # A draft that fails validation is refused on save and changes nothing either.
    broken = await rig.client.put(
        f"/api/v1/routing/ivr-flows/{flow}",
        json={"name": detail["name"], "graph": {"start": "menu", "nodes": {"menu": graph["nodes"]["menu"]}}},
        headers=ctx.headers,
    )
    assert broken.status_code == 422, broken.text
    assert rig.switch.press(leg, "1")
    iid = (await rig.interaction_of(ctx, leg))["id"]
    queued = await eventually(lambda: rig.state_is(ctx, iid, "queued"))
    assert queued["queue_id"] == str(old_queue)
    steps = [e["data"] for e in queued["timeline"] if e["name"] == "ivr_step"]
    assert {s["version"] for s in steps} == {1}
    await rig.switch.caller_hangup(leg)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    # The next call, in the same call-control process (which keeps decoded versions), starts on version 2.
    second = await rig.call(await rig.number(ctx, flow_id=flow))
    await eventually(lambda: collecting(rig, second, 1))
    assert rig.switch.press(second, "1")
    second_iid = (await rig.interaction_of(ctx, second))["id"]
    queued = await eventually(lambda: rig.state_is(ctx, second_iid, "queued"))
    assert queued["queue_id"] == str(new_queue)
    assert {e["data"]["version"] for e in queued["timeline"] if e["name"] == "ivr_step"} == {2}
    await rig.switch.caller_hangup(second)


def step_flow(queue_id: uuid.UUID) -> dict[str, Any]:
    return {
        "start": "welcome",
        "nodes": {
            "welcome": {"type": "play", "prompt": tts("Welcome"), "next": "menu"},
            "menu": {
                "type": "menu",
                "prompt": tts("Choose"),
                "options": {"1": "account", "2": "vm", "3": "callback", "4": "q"},
                "timeout_seconds": 30,
            },
            "account": {
                "type": "collect",
                "prompt": tts("Account"),
                "variable": "account",
                "timeout_seconds": 30,
                "next": "q",
            },
            "vm": {"type": "voicemail", "queue_id": str(queue_id), "max_seconds": 60},
            "callback": {
                "type": "callback_offer",
                "prompt": tts("Press 1"),
                "queue_id": str(queue_id),
                "timeout_seconds": 30,
                "declined": "q",
            },
            "q": {"type": "queue", "queue_id": str(queue_id)},
        },
    }


async def running(rig: CallRig, leg: str, application: str) -> bool:
    found = rig.switch.find(leg)
    return found is not None and found.channel.variables.get("current_application") == application


@pytest.mark.parametrize(
    ("step", "keys", "application", "phase", "outcome"),
    [
        ("play", "", "playback", "ivr", "abandoned"),
        ("menu", "", "play_and_get_digits", "ivr", "abandoned"),
        ("collect", "1", "play_and_get_digits", "ivr", "abandoned"),
        ("callback_offer", "3", "play_and_get_digits", "ivr", "abandoned"),
        ("voicemail", "2", "record", "voicemail", "voicemail"),
        ("queue", "4", "playback", "queued", "abandoned"),
        ("ringing", "4", "bridge", "ringing", "abandoned"),
        ("talking", "4", "bridge", "bridged", "handled"),
    ],
)
async def test_a_caller_who_hangs_up_at_any_step_leaves_nothing_behind(
    rig: CallRig, factory: Factory, caplog, step: str, keys: str, application: str, phase: str, outcome: str
):
    media = MediaFactory(factory)
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    agent = None
    if step in ("ringing", "talking"):
        agent = await rig.agent(ctx, answer_delay=60.0 if step == "ringing" else 0.0)
    flow = await media.flow(ctx, step_flow(queue))
    leg = await rig.call(await rig.number(ctx, flow_id=flow))
    if keys:
        await press_at(rig, leg, 1, keys)
        if step in ("collect", "callback_offer"):
            await eventually(lambda: collecting(rig, leg, 2))
    iid = (await rig.interaction_of(ctx, leg))["id"]
    if step == "talking":
        await eventually(lambda: rig.state_is(ctx, iid, "connected"))
    elif step == "queue":
        await eventually(lambda: rig.state_is(ctx, iid, "queued"))
    await eventually(lambda: running(rig, leg, application))
    record = await rig.control.services.store.for_interaction(ctx.tenant_id, uuid.UUID(iid))
    assert record is not None and record.phase == phase
    await rig.switch.caller_hangup(leg)
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["outcome"] == outcome
    routing = rig.app.state.routing
    assert await routing.matcher.state(ctx.tenant_id, uuid.UUID(iid)) is None
    assert await routing.matcher.waiting(ctx.tenant_id, queue) == []
    await eventually(lambda: _forgotten(rig, ctx, iid))
    if agent is not None:
        assert await routing.matcher.load(ctx.tenant_id, agent.user_id) in ({}, {"voice": 0})
        await eventually(lambda: _in_state(rig, agent, ("wrap_up" if step == "talking" else "available")))
    if outcome == "abandoned":
        await eventually(lambda: _logged(caplog, "caller_hung_up"))
        if phase in ("queued", "ringing"):
            abandoned = next(e for e in ended["timeline"] if e["name"] == "abandoned")
            assert abandoned["data"]["waited_seconds"] > 0


async def _forgotten(rig: CallRig, ctx: TenantCtx, iid: str) -> bool:
    return await rig.control.services.store.for_interaction(ctx.tenant_id, uuid.UUID(iid)) is None


async def _logged(caplog: Any, text: str) -> bool:
    return text in caplog.text


async def _in_state(rig: CallRig, agent: Any, state: str) -> bool:
    return await rig.agent_state(agent) == state

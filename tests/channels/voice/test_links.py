"""The switch nodes' inbound links: the Redis lease, the ordered event feed, resynchronisation, commands, bad input.

Each test holds its own nodes only (`CC_ESL_NODES` set to its nodes' names), with
intervals shortened by settings; simulators run in-process here (`SwitchSimulator`),
as processes in test_switch_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from backend.channels.voice.commands import (
    CommandRejected,
    CommandRequest,
    CommandTimeout,
    NodeUnavailable,
    encode_request,
    lease_key,
    reply_key,
    requests_key,
    status_key,
)
from backend.channels.voice.esl import CommandParser
from backend.channels.voice.esl._wire import body_frame, event_frame, reply_frame
from backend.channels.voice.links import NodeLease, SwitchLinks
from backend.channels.voice.models import SwitchNode, UnattributedLeg
from backend.channels.voice.service import SUBSCRIBED_EVENTS
from backend.channels.voice.simulator import Endpoint, SwitchSimulator
from backend.db.base import utcnow
from backend.lib.redis_client import make_redis
from tests.channels.voice.rig import eventually, link_settings
from tests.channels.voice.test_conformance_inbound import simulator_config
from tests.factories import Factory, unique
from tests.support.freeswitch_captures import B_LEG, a08_events

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def holding(app, pattern: str, *, redis=None, switchboard=None, **overrides: Any) -> AsyncIterator[SwitchLinks]:
    """A `SwitchLinks` as a worker runs it, for the nodes matching `pattern`, stopped cleanly afterwards."""
    settings = link_settings(app.state.settings, pattern, **overrides)
    links = SwitchLinks(switchboard or app.state.voice, redis or app.state.redis, settings)
    await links.start()
    try:
        yield links
    finally:
        await links.stop()


async def node_row(sessionmaker, node_id: uuid.UUID) -> SwitchNode:
    async with sessionmaker() as session:
        row = await session.scalar(select(SwitchNode).where(SwitchNode.id == node_id))
    assert row is not None
    return row


def asked(simulator: SwitchSimulator, kind: str = "esl") -> list[str]:
    return [str(item.get("command")) for item in simulator.switch.requests if item["kind"] == kind]


# --- the lease ------------------------------------------------------------------------------------


async def test_a_lease_has_one_holder_renewed_only_by_it_and_released_only_by_it(redis):
    node = uuid.uuid4()
    mine, theirs = NodeLease(redis, node, "mine", 0.5), NodeLease(redis, node, "theirs", 0.5)
    assert await mine.acquire() is not None
    assert await theirs.acquire() is None
    assert await theirs.renew() is None and not await theirs.release()
    valid = await mine.renew()
    assert valid is not None and valid - time.monotonic() <= 0.5
    assert await mine.holder() == "mine"
    await asyncio.sleep(0.6)  # not renewed: it lapses, and the other may take it
    assert await theirs.acquire() is not None
    assert await mine.renew() is None
    assert await theirs.release() and await mine.holder() is None


# --- holding a node -------------------------------------------------------------------------------


async def test_the_holder_subscribes_resynchronises_and_feeds_every_event_in_order(
    factory: Factory, app, client, sessionmaker, redis
):
    name = unique("fs-link-")
    config = simulator_config(hostname=name, heartbeat_interval=0.2, time_scale=0.4)
    async with SwitchSimulator(config) as simulator:
        node = await factory.switch_node(name=name, esl_port=simulator.esl_port)
        async with holding(app, name) as links:
            await eventually(lambda: _up(sessionmaker, node["id"]))
            commands = asked(simulator)
            assert commands[:1] == ["auth ClueCon"]
            assert f"event json BACKGROUND_JOB {' '.join(SUBSCRIBED_EVENTS)}" in commands
            assert "api show channels as json" in commands and "api show registrations as json" in commands
            assert await redis.get(lease_key(node["id"])) == links.token

            leg = await simulator.switch.place_call("7499", caller_number="15550100")
            live = app.state.voice.live
            await eventually(lambda: _count(live, node["id"], 1))
            await eventually(lambda: _count(live, node["id"], 0))
            async with sessionmaker() as session:
                stored = await session.scalar(select(UnattributedLeg).where(UnattributedLeg.leg_uuid == uuid.UUID(leg)))
            assert stored is not None and stored.sources == ["event"] and stored.node_name == name

            ops = await factory.provider_headers()
            path = f"/api/v1/ops/switch-nodes/{node['id']}/link"

            async def reported() -> dict[str, Any] | None:
                seen = (await client.get(path, headers=ops)).json()
                return seen if seen["events"] > 0 else None  # published at each renewal

            seen = await eventually(reported)
            assert (seen["held"], seen["holder"], seen["connected"], seen["error"]) == (True, links.token, True, None)
            assert seen["dropped"] == 0 and seen["failed"] == 0
            [link] = links.links.values()
            assert link.client.dropped_events == 0 and link.stats.failed == 0
        # A clean stop releases the lease: the node is free for another process at once.
        assert await redis.get(lease_key(node["id"])) is None
        assert await redis.exists(status_key(node["id"])) == 0
        seen = (await client.get(f"/api/v1/ops/switch-nodes/{node['id']}/link", headers=ops)).json()
        assert (seen["held"], seen["connected"]) == (False, False)


async def _up(sessionmaker, node_id: uuid.UUID) -> bool:
    return (await node_row(sessionmaker, node_id)).health == "up"


async def _count(live, node_id: uuid.UUID, expected: int) -> bool:
    return await live.count(node_id) == expected


# --- takeover -------------------------------------------------------------------------------------


class HolderLog:
    """Samples which `SwitchLinks` act as a node's holder, every few milliseconds: never two at once."""

    def __init__(self, node_id: uuid.UUID, *groups: SwitchLinks) -> None:
        self.node_id = node_id
        self.groups = groups
        self.overlaps = 0
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            holders = tuple(
                g.token for g in self.groups if (link := g.links.get(self.node_id)) is not None and link.valid()
            )
            if len(holders) > 1:
                self.overlaps += 1
            self.samples.append((time.monotonic(), holders))
            await asyncio.sleep(0.002)

    def first_held_by(self, token: str, after: float) -> float | None:
        return next((t for t, holders in self.samples if t >= after and token in holders), None)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def test_a_holder_that_stops_renewing_gives_way_without_two_holders_at_once(factory: Factory, app, sessionmaker):
    """The holder hangs (its renewals never return): it stops acting before its lease can lapse; the other
    process, with its own Redis client, takes over once it lapses, within the lease time plus a poll."""
    name = unique("fs-take-")
    async with SwitchSimulator(simulator_config(hostname=name, heartbeat_interval=0.2)) as simulator:
        node = await factory.switch_node(name=name, esl_port=simulator.esl_port)
        other_redis = make_redis(app.state.settings.redis_url)
        try:
            async with holding(app, name) as first:
                await eventually(lambda: _held(first, node["id"]))
                async with holding(app, name, redis=other_redis) as second:
                    watch = HolderLog(node["id"], first, second)
                    await asyncio.sleep(0.5)  # the second process polls meanwhile and finds the lease taken
                    assert node["id"] not in second.links
                    link = first.links[node["id"]]
                    hang = asyncio.Event()

                    async def renewal_that_hangs() -> float | None:
                        await hang.wait()
                        return None

                    link.lease.renew = renewal_that_hangs  # type: ignore[method-assign]
                    assert first._task is not None
                    first._task.cancel()  # the whole process hangs: it stops polling too
                    froze = time.monotonic()
                    try:
                        await eventually(lambda: _held(second, node["id"]), timeout=5)
                    except AssertionError:
                        raise
                    await eventually(lambda: _connected(second, node["id"]))
                    await watch.stop()
                    ttl = second.settings.esl_lease_ttl_seconds
                    took = (watch.first_held_by(second.token, froze) or 0) - froze
                    assert watch.overlaps == 0
                    assert took <= ttl + 3 * second.settings.esl_lease_poll_seconds + 0.5, took
                    assert node["id"] not in first.links and not link.holding
                    assert not link.client.connected  # the lost holder closed its socket
                    assert len(simulator.switch.listeners) == 1
                    hang.set()
                    assert (await node_row(sessionmaker, node["id"])).health == "up"
        finally:
            await other_redis.aclose()


async def test_a_clean_stop_hands_the_node_over_within_a_poll(factory: Factory, app):
    name = unique("fs-hand-")
    async with SwitchSimulator(simulator_config(hostname=name, heartbeat_interval=0.2)) as simulator:
        node = await factory.switch_node(name=name, esl_port=simulator.esl_port)
        async with holding(app, name) as second:
            first = SwitchLinks(app.state.voice, app.state.redis, second.settings)
            second_task, second._task = second._task, None  # the second process starts polling later
            assert second_task is not None
            second_task.cancel()
            await first.start()
            await eventually(lambda: _connected(first, node["id"]))
            await second.start()
            watch = HolderLog(node["id"], first, second)
            stopped = time.monotonic()
            await first.stop()
            await eventually(lambda: _held(second, node["id"]), timeout=3)
            await watch.stop()
            took = (watch.first_held_by(second.token, stopped) or 0) - stopped
            assert watch.overlaps == 0
            assert took <= 4 * second.settings.esl_lease_poll_seconds + 0.3, took


async def test_a_holder_whose_lease_was_taken_closes_its_socket_at_once(factory: Factory, app, redis, caplog):
    name = unique("fs-lost-")
    async with SwitchSimulator(simulator_config(hostname=name, heartbeat_interval=0.2)) as simulator:
        node = await factory.switch_node(name=name, esl_port=simulator.esl_port)
        async with holding(app, name) as links:
            await eventually(lambda: _connected(links, node["id"]))
            link = links.links[node["id"]]
            await redis.set(lease_key(node["id"]), "someone-else", px=1500)
            taken = time.monotonic()
            await eventually(lambda: _not(link.holding))
            lost_after = time.monotonic() - taken
            assert lost_after <= links.settings.esl_lease_renew_seconds + 0.3, lost_after
            await eventually(lambda: _equal(len(simulator.switch.listeners), 0), timeout=3)
            assert "switch_link_lost" in caplog.text
            # Once the other's lease lapses, this process takes the node back.
            await eventually(lambda: _connected(links, node["id"]), timeout=5)
            assert await redis.get(lease_key(node["id"])) == links.token


async def test_nodes_added_changed_and_drained_are_followed_without_a_restart(
    factory: Factory, app, client, sessionmaker
):
    prefix = unique("fs-ops-")
    async with (
        SwitchSimulator(simulator_config(hostname=f"{prefix}-a", heartbeat_interval=0.2)) as a,
        SwitchSimulator(simulator_config(hostname=f"{prefix}-b", heartbeat_interval=0.2)) as b,
        SwitchSimulator(simulator_config(hostname=f"{prefix}-a", heartbeat_interval=0.2)) as a_moved,
    ):
        first = await factory.switch_node(name=f"{prefix}-a", esl_port=a.esl_port)
        async with holding(app, f"{prefix}-*") as links:
            await eventually(lambda: _connected(links, first["id"]))
            second = await factory.switch_node(name=f"{prefix}-b", esl_port=b.esl_port)
            await eventually(lambda: _connected(links, second["id"]), timeout=5)
            await eventually(lambda: _up(sessionmaker, second["id"]))

            ops = await factory.provider_headers()
            moved = await client.patch(
                f"/api/v1/ops/switch-nodes/{first['id']}", json={"esl_port": a_moved.esl_port}, headers=ops
            )
            assert moved.status_code == 200, moved.text
            await eventually(lambda: _equal(len(a_moved.switch.listeners), 1), timeout=5)
            await eventually(lambda: _equal(len(a.switch.listeners), 0))

            drained = await client.post(f"/api/v1/ops/switch-nodes/{second['id']}/drain", headers=ops)
            assert drained.status_code == 200
            await asyncio.sleep(2 * links.settings.switch_nodes_refresh_seconds)
            assert links.links[second["id"]].client.connected  # its calls go on, so its events still matter


async def _held(links: SwitchLinks, node_id: uuid.UUID) -> bool:
    link = links.links.get(node_id)
    return link is not None and link.valid()


async def _connected(links: SwitchLinks, node_id: uuid.UUID) -> bool:
    link = links.links.get(node_id)
    return link is not None and link.valid() and link.client.connected and link.stats.resyncs > 0


async def _not(value: bool) -> bool:
    return not value


async def _equal(value: object, expected: object) -> bool:
    return value == expected


# --- commands from other processes ----------------------------------------------------------------


async def test_other_processes_command_a_node_through_its_holder(factory: Factory, app, redis, caplog):
    name = unique("fs-cmd-")
    config = simulator_config(hostname=name, heartbeat_interval=0.2, ring_timeout=0.3, time_scale=1.0)
    async with SwitchSimulator(config) as simulator:
        switch = simulator.switch
        node = await factory.switch_node(name=name, esl_port=simulator.esl_port)
        commands = app.state.voice.commands
        with pytest.raises(NodeUnavailable):  # nobody holds it: said at once, the switch never saw it
            await commands.api(node["id"], "status")
        async with holding(app, name) as links:
            await eventually(lambda: _connected(links, node["id"]))
            status = await commands.api(node["id"], "status")
            assert status.ok and "UP" in status.text
            for user, behaviour in (("1001", "answer"), ("1002", "busy"), ("1003", "answer")):
                assert await switch.register(Endpoint(user, "127.0.0.1", behaviour=behaviour, answer_delay=0))

            call = await commands.originate(
                "user/1001@127.0.0.1", "&park()", node_id=node["id"], variables={"cc_interaction_id": "42"}
            )
            assert call.ok and call.cause is None and str(call.leg_uuid) in switch.legs
            assert switch.legs[str(call.leg_uuid)].channel.variables.get("cc_interaction_id") == "42"
            busy = await commands.originate("user/1002@127.0.0.1", "&park()", node_id=node["id"])
            assert (busy.ok, busy.cause) == (False, "USER_BUSY")
            listening = await commands.eavesdrop(node["id"], call.leg_uuid, "user/1003@127.0.0.1")
            assert listening.ok
            assert (await commands.set_variable(node["id"], call.leg_uuid, "cc_note", "vip")).ok
            assert (await commands.hangup(node["id"], call.leg_uuid)).ok
            await eventually(lambda: _equal(str(call.leg_uuid) in switch.legs, False))
            gone = await commands.hangup(node["id"], uuid.uuid4())
            assert not gone.ok and gone.text == "-ERR No such channel!"
            jobs = [item["command"] for item in switch.requests if str(item.get("command", "")).startswith("bgapi")]
            assert jobs[0].startswith(f"bgapi originate {{origination_uuid={call.leg_uuid},cc_interaction_id=42}}")

            # Without a node named: the one pick_node chooses (nodes nobody holds are skipped).
            anywhere = await commands.originate("user/1003@127.0.0.1", "&park()")
            assert anywhere.ok and anywhere.node_id == node["id"]

            # What cannot go into a command line is refused before it is sent.
            for bad in (
                commands.api(node["id"], "status\n\nexit"),
                commands.originate("user/1001@127.0.0.1", "&park()", variables={"x": "a,b}"}),
                commands.hangup(node["id"], call.leg_uuid, cause="NORMAL; exit"),
            ):
                with pytest.raises(CommandRejected):
                    await bad

            # Garbage in the request list is logged and skipped; a request nobody waits for any more is dropped.
            await redis.rpush(requests_key(node["id"]), "{not a request")
            late = CommandRequest(id=uuid.uuid4().hex, kind="api", command="status", deadline=time.time() - 5)
            await redis.rpush(requests_key(node["id"]), encode_request(late))
            answer = await redis.blpop([reply_key(node["id"], late.id)], timeout=3)
            assert answer is not None and '"expired"' in answer[1]
            assert (await commands.api(node["id"], "status")).ok
            assert "switch_command_garbled" in caplog.text and "switch_command_expired" in caplog.text


async def test_a_holder_that_never_answers_is_a_timeout_not_a_hang(redis, app):
    node = uuid.uuid4()
    await redis.set(lease_key(node), "a-process-that-hangs", px=5000)
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        await app.state.voice.commands.api(node, "status", within=0.3)
    assert time.monotonic() - started < 1.5
    await redis.delete(lease_key(node), requests_key(node))


# --- after a reconnect, the node's own state wins -------------------------------------------------


async def test_after_a_reconnect_the_nodes_own_channels_and_registrations_win(
    factory: Factory, app, client, sessionmaker
):
    """While the connection was down a call ended, a phone unregistered and another registered: events the
    holder never saw. After the reconnect it re-reads the node and converges within 5 s."""
    name = unique("fs-resync-")
    config = simulator_config(hostname=name, heartbeat_interval=0.2, time_scale=1.0)
    ctx = await factory.tenant()
    gone_seat, new_seat = await factory.sip_seat(ctx), await factory.sip_seat(ctx)
    async with SwitchSimulator(config) as simulator:
        switch = simulator.switch
        node = await factory.switch_node(name=name, esl_port=simulator.esl_port)
        async with holding(app, name, esl_reconnect_initial_seconds=0.5, esl_reconnect_jitter=0) as links:
            await eventually(lambda: _connected(links, node["id"]))
            assert await switch.register(Endpoint(gone_seat["username"], gone_seat["domain"], answer_delay=0))
            await eventually(lambda: _registered(client, ctx, gone_seat["user_id"], True))
            call = await switch.place_call("7498")
            await eventually(lambda: _count(app.state.voice.live, node["id"], 1))

            for listener in list(switch.listeners):
                listener.kill()  # the connection drops; what follows is never sent to us
            await eventually(lambda: _equal(links.links[node["id"]].client.connected, False))
            switch.unregister(gone_seat["username"])
            assert await switch.register(Endpoint(new_seat["username"], new_seat["domain"], answer_delay=0))
            await switch.caller_hangup(call)
            reconnects = links.links[node["id"]].stats.resyncs

            await eventually(lambda: _resynced(links, node["id"], reconnects), timeout=3)
            converged = time.monotonic()
            await eventually(lambda: _count(app.state.voice.live, node["id"], 0), timeout=5)
            await eventually(lambda: _registered(client, ctx, gone_seat["user_id"], False), timeout=5)
            await eventually(lambda: _registered(client, ctx, new_seat["user_id"], True), timeout=5)
            assert time.monotonic() - converged < 5


async def test_a_consumer_that_falls_behind_drops_counts_and_resynchronises(factory: Factory, app, caplog):
    """The reader never waits for us: past the buffer, events are dropped, counted, logged, and the node's
    state is read again once the consumer catches up."""
    name = unique("fs-slow-")
    slow = SlowSwitchboard(app)
    async with SwitchSimulator(simulator_config(hostname=name, heartbeat_interval=0)) as simulator:
        node = await factory.switch_node(name=name, esl_port=simulator.esl_port)
        async with holding(app, name, switchboard=slow, esl_event_queue_size=5) as links:
            await eventually(lambda: _connected(links, node["id"]))
            link = links.links[node["id"]]
            for _ in range(40):
                _fire_progress(simulator)
            await eventually(lambda: _equal(link.client.dropped_events > 0, True))
            await eventually(lambda: _equal(link.stats.resyncs >= 2, True), timeout=5)
            assert link.stats.events + link.client.dropped_events == 40
            assert "switch_events_dropped" in caplog.text


def _fire_progress(simulator: SwitchSimulator) -> None:
    """An event of a leg the node never had: it goes through the lanes and is logged as unusable."""
    simulator.switch.fire(
        "CHANNEL_PROGRESS",
        calling=("switch_channel.c", "switch_channel_perform_mark_ring_ready_value", 3638),
        post=[("Unique-ID", str(uuid.uuid4()))],
    )


async def test_a_heartbeat_counts_when_it_arrives_not_when_a_backlog_lets_it_be_applied(
    factory: Factory, app, sessionmaker
):
    """A holder far behind (one lane, each event 0.3 s to apply) keeps its node alive: liveness is when the
    HEARTBEAT arrived, written at once, so the watchdog does not fail a busy but healthy node over."""
    name = unique("fs-busy-")
    slow = SlowSwitchboard(app, delay=0.3)
    async with SwitchSimulator(simulator_config(hostname=name, heartbeat_interval=0)) as simulator:
        node = await factory.switch_node(name=name, esl_port=simulator.esl_port)
        async with holding(app, name, switchboard=slow, switch_event_lanes=1) as links:
            await eventually(lambda: _connected(links, node["id"]))
            link = links.links[node["id"]]
            for _ in range(20):
                _fire_progress(simulator)
            await asyncio.sleep(0.2)
            sent = utcnow()
            simulator.switch.fire_heartbeat()

            async def recorded() -> bool:
                row = await node_row(sessionmaker, node["id"])
                return row.last_heartbeat_at is not None and row.last_heartbeat_at >= sent

            await eventually(recorded, timeout=2)
            assert len(slow.applied) < 10, "the backlog is still being applied"
            row = await node_row(sessionmaker, node["id"])
            assert row.health == "up" and row.stats["version"]
            assert link.stats.failed == 0


class SlowSwitchboard:
    """The real switchboard behind a consumer that takes its time (or fails on purpose)."""

    def __init__(self, app, *, delay: float = 0.02, failures: dict[str, list[BaseException]] | None = None) -> None:
        self.voice = app.state.voice
        self.delay = delay
        self.failures = failures or {}
        self.applied: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.voice, name)

    async def handle_event(self, node_id: uuid.UUID, event, **when: Any) -> None:
        await asyncio.sleep(self.delay)
        key = event.get("cc_test_mark") or event.get("Event-Name")
        pending = self.failures.get(key)
        if pending:
            raise pending.pop(0)
        self.applied.append(key)
        await self.voice.handle_event(node_id, event, **when)


async def _registered(client, ctx, user_id: uuid.UUID, expected: bool) -> bool:
    state = (await client.get(f"/api/v1/routing/agents/{user_id}/state", headers=ctx.headers)).json()
    return state["voice_registered"] is expected


async def _resynced(links: SwitchLinks, node_id: uuid.UUID, before: int) -> bool:
    link = links.links.get(node_id)
    return link is not None and link.client.connected and link.stats.resyncs > before


# --- bad input ------------------------------------------------------------------------------------


async def test_a_wrong_esl_password_is_logged_retried_with_back_off_and_the_node_stays_unhealthy(
    factory: Factory, app, client, sessionmaker, caplog
):
    name = unique("fs-pw-")
    config = simulator_config(hostname=name, heartbeat_interval=0.2, esl_password="the-right-one")
    async with SwitchSimulator(config) as simulator:
        node = await factory.switch_node(name=name, esl_port=simulator.esl_port, esl_password="a-wrong-one")
        ops = await factory.provider_headers()
        async with holding(app, name, esl_reconnect_initial_seconds=0.05, esl_reconnect_max_seconds=0.8) as links:

            async def attempts() -> list[float]:
                found = [float(i["at"]) for i in simulator.switch.requests if i.get("command") == "auth a-wrong-one"]
                return found if len(found) >= 5 else []

            times = await eventually(attempts, timeout=10)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert gaps[3] > 2 * gaps[0], gaps  # exponential back-off, not a tight loop
            assert "refused the password" in caplog.text
            assert "switch_link_unhealthy" in caplog.text and "AuthenticationError" in caplog.text
            assert (await node_row(sessionmaker, node["id"])).health != "up"
            choice = await app.state.voice.pick_node()
            assert choice is None or choice.id != node["id"]

            async def refused() -> dict[str, Any] | None:
                seen = (await client.get(f"/api/v1/ops/switch-nodes/{node['id']}/link", headers=ops)).json()
                return seen if seen["error"] else None

            seen = await eventually(refused)
            assert seen["held"] and not seen["connected"] and "AuthenticationError" in seen["error"]

            # The operators correct the password: taken up without a restart.
            fixed = await client.patch(
                f"/api/v1/ops/switch-nodes/{node['id']}", json={"esl_password": "the-right-one"}, headers=ops
            )
            assert fixed.status_code == 200
            await eventually(lambda: _connected(links, node["id"]), timeout=5)
            await eventually(lambda: _up(sessionmaker, node["id"]))


async def test_garbage_unknown_events_unusable_events_and_unknown_calls_are_logged_not_fatal(
    factory: Factory, app, sessionmaker, caplog
):
    """A peer that sends an unknown event, a CUSTOM subclass we never asked for, a hang-up without a leg, the
    CDR of a call nobody knows, then bytes that are not ESL: each is logged, the link reconnects and goes on."""
    from sqlalchemy.exc import OperationalError

    name = unique("fs-junk-")
    unknown_call = str(uuid.uuid4())
    hangup = next(e for e in a08_events() if e["Event-Name"] == "CHANNEL_HANGUP_COMPLETE")  # the b-leg's
    hangup = {k: (v.replace(B_LEG, unknown_call) if isinstance(v, str) else v) for k, v in hangup.items()}
    first_connection = [
        {"Event-Name": "SOMETHING_NEW", "Core-UUID": "x"},
        {"Event-Name": "CUSTOM", "Event-Subclass": "conference::maintenance"},
        {"Event-Name": "CHANNEL_HANGUP_COMPLETE", "Unique-ID": "not-a-uuid"},
        {**hangup, "cc_test_mark": "flaky"},
        {"Event-Name": "CHANNEL_PROGRESS", "Unique-ID": str(uuid.uuid4()), "cc_test_mark": "broken"},
        {"Event-Name": "HEARTBEAT", "cc_test_mark": "after"},
        {"Event-Name": "CHANNEL_UNBRIDGE", "Unique-ID": unknown_call, "cc_test_mark": "same-leg"},
    ]
    peer = FakeSwitch([first_connection, [{"Event-Name": "HEARTBEAT", "cc_test_mark": "second"}]], garbage=True)
    await peer.start()
    refused = OperationalError("SELECT 1", {}, ConnectionRefusedError("the database restarts"))
    board = SlowSwitchboard(app, delay=0, failures={"flaky": [refused, refused], "broken": [ValueError("a bug")]})
    try:
        node = await factory.switch_node(name=name, esl_port=peer.port)
        async with holding(app, name, switchboard=board) as links:
            await eventually(lambda: _equal("second" in board.applied, True), timeout=5)
            link = links.links[node["id"]]
    finally:
        await peer.close()
    # Nothing skipped silently: the flaky one retried twice then applied, the broken one logged; one leg's
    # events in the node's order, whatever the lanes did meanwhile; heartbeats written as they arrived.
    marks = [m for m in board.applied if m in {"flaky", "after", "same-leg", "second"}]
    assert sorted(marks) == ["after", "flaky", "same-leg", "second"]
    assert marks.index("flaky") < marks.index("same-leg") and marks.index("after") < marks.index("second")
    assert link.stats.retried == 2 and link.stats.failed == 1
    text = caplog.text
    for line in ("switch_event_unknown", "SOMETHING_NEW", "conference::maintenance", "switch_event_unusable"):
        assert line in text, line
    assert "switch_event_retry" in text and "switch_event_failed" in text and "a bug" in text
    assert "not ESL" in text  # the library's line for the garbage, then it reconnected
    async with sessionmaker() as session:
        stored = await session.scalar(
            select(UnattributedLeg).where(UnattributedLeg.leg_uuid == uuid.UUID(unknown_call))
        )
    assert stored is not None and stored.sources == ["event"]


async def test_a_registration_sent_right_behind_the_snapshot_is_applied_after_it(factory: Factory, app, sessionmaker):
    """The node answers `show registrations` (none) and, in the same write, sends the REGISTER of a phone that
    registered just after the list was made. That event belongs after the snapshot: applied before it, the
    reconcile against the (older, empty) list would drop the registration again, and the agent would stay
    unreachable until the phone's next refresh."""
    from backend.channels.voice.models import Registration
    from backend.db.engine import tenant_transaction

    ctx = await factory.tenant()
    seat = await factory.sip_seat(ctx)
    register = {
        "Event-Name": "CUSTOM",
        "Event-Subclass": "sofia::register",
        "username": seat["username"],
        "realm": seat["domain"],
        "contact": f'"" <sip:{seat["username"]}@127.0.0.1:5090>',
        "call-id": "race-1@127.0.0.1",
        "expires": "300",
        "status": "Registered(UDP)",
        "network-ip": "127.0.0.1",
        "network-port": "5090",
        "cc_test_mark": "after-snapshot",
    }
    peer = FakeSwitch([[register]])
    await peer.start()
    board = SlowSwitchboard(app, delay=0)
    try:
        node = await factory.switch_node(name=unique("fs-race-"), esl_port=peer.port)
        async with holding(app, node["name"], switchboard=board) as links:
            await eventually(lambda: _connected(links, node["id"]))
            await eventually(lambda: _equal("after-snapshot" in board.applied, True))
            await asyncio.sleep(0.2)  # whatever the link does next (a snapshot applied late would come now)
            async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
                rows = (await session.scalars(select(Registration).where(Registration.node_id == node["id"]))).all()
    finally:
        await peer.close()
    assert [row.sip_username for row in rows] == [seat["username"]]


class FakeSwitch:
    """A peer that speaks just enough ESL to be held, then sends what each connection's script says."""

    def __init__(self, scripts: list[list[dict[str, Any]]], *, garbage: bool = False) -> None:
        self.scripts = scripts
        self.garbage = garbage
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        script = self.scripts[index] if index < len(self.scripts) else []
        parser = CommandParser()
        writer.write(b"Content-Type: auth/request\n\n")
        try:
            while data := await reader.read(65536):
                for command in parser.feed(data):
                    line = command.line
                    if line.startswith("api "):
                        writer.write(body_frame("api/response", '{"row_count":0}'))
                    elif line == "exit":
                        writer.write(reply_frame("+OK bye"))
                        await writer.drain()
                        return
                    else:
                        writer.write(reply_frame("+OK"))
                    if line == "api show registrations as json":
                        for event in script:
                            writer.write(event_frame("json", [(k, str(v)) for k, v in event.items()]))
                        if index == 0 and self.garbage:
                            writer.write(b"this is not ESL\n\n")
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def test_a_process_holding_more_than_its_share_gives_a_node_to_one_that_started_later(factory: Factory, app):
    prefix = unique("fs-share-")
    async with (
        SwitchSimulator(simulator_config(hostname=f"{prefix}-a", heartbeat_interval=0.2)) as a,
        SwitchSimulator(simulator_config(hostname=f"{prefix}-b", heartbeat_interval=0.2)) as b,
    ):
        nodes = [
            await factory.switch_node(name=f"{prefix}-a", esl_port=a.esl_port),
            await factory.switch_node(name=f"{prefix}-b", esl_port=b.esl_port),
        ]
        other_redis = make_redis(app.state.settings.redis_url)
        try:
            async with holding(app, f"{prefix}-*", esl_rebalance_seconds=0.5) as first:
                for node in nodes:
                    await eventually(lambda node=node: _connected(first, node["id"]))
                async with holding(app, f"{prefix}-*", redis=other_redis, esl_rebalance_seconds=0.5) as second:
                    watches = [HolderLog(node["id"], first, second) for node in nodes]

                    async def spread() -> bool:
                        return len(first.links) == 1 and len(second.links) == 1

                    await eventually(spread, timeout=10)
                    moved = next(iter(second.links))
                    await eventually(lambda: _connected(second, moved))
                    for watch in watches:
                        await watch.stop()
                        assert watch.overlaps == 0
        finally:
            await other_redis.aclose()


async def test_one_legs_events_are_applied_in_the_nodes_order_while_lanes_run_side_by_side(factory: Factory, app):
    """Forty legs, five events each, interleaved; the switchboard takes a random while over each. Each leg's
    events come out in the order the node sent them, and the lanes overlap (it is not one at a time)."""
    import random

    rng = random.Random(5)
    legs = [str(uuid.uuid4()) for _ in range(40)]
    script = [
        {"Event-Name": "CHANNEL_PROGRESS", "Unique-ID": leg, "cc_test_mark": f"{leg}:{step}"}
        for step in range(5)
        for leg in legs
    ]
    peer = FakeSwitch([script])
    await peer.start()
    board = RandomlySlowSwitchboard(app, rng)
    try:
        node = await factory.switch_node(name=unique("fs-lanes-"), esl_port=peer.port)
        async with holding(app, node["name"], switchboard=board, switch_event_lanes=8) as links:
            await eventually(lambda: _equal(len(board.applied), len(script)), timeout=10)
            assert links.links[node["id"]].stats.failed == 0
    finally:
        await peer.close()
    for leg in legs:
        steps = [int(mark.split(":")[1]) for mark in board.applied if mark.startswith(leg)]
        assert steps == [0, 1, 2, 3, 4], (leg, steps)
    assert board.most_at_once > 1


class RandomlySlowSwitchboard(SlowSwitchboard):
    def __init__(self, app, rng) -> None:
        super().__init__(app, delay=0)
        self.rng = rng
        self.running = 0
        self.most_at_once = 0

    async def handle_event(self, node_id: uuid.UUID, event, **when: Any) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(self.rng.random() * 0.01)
            self.applied.append(event.get("cc_test_mark") or event.get("Event-Name"))
        finally:
            self.running -= 1


async def test_a_node_no_longer_registered_is_released(factory: Factory, app, redis):
    """Operators have no route that deletes a node yet; the registry read is what decides, so a node that
    disappears from it (here: from what the switchboard reports) is released at the next refresh."""
    name = unique("fs-gone-")
    async with SwitchSimulator(simulator_config(hostname=name, heartbeat_interval=0.2)) as simulator:
        node = await factory.switch_node(name=name, esl_port=simulator.esl_port)
        registry = Registry(app)
        async with holding(app, name, switchboard=registry) as links:
            await eventually(lambda: _connected(links, node["id"]))
            registry.hidden.add(node["id"])
            await eventually(lambda: _equal(node["id"] in links.links, False), timeout=5)
            assert await redis.get(lease_key(node["id"])) is None
            await eventually(lambda: _equal(len(simulator.switch.listeners), 0))


class Registry:
    """The real switchboard, with some nodes left out of the registered ones."""

    def __init__(self, app) -> None:
        self.voice = app.state.voice
        self.hidden: set[uuid.UUID] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.voice, name)

    async def esl_targets(self):
        return [target for target in await self.voice.esl_targets() if target.id not in self.hidden]

"""The matcher's atomic steps on the real Redis: strategies, skills, capacity, places, and concurrency."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from backend.routing.matcher import AgentRouting, Matcher, WaitingInteraction

pytestmark = pytest.mark.integration

NOW = 1_800_000_000_000


@pytest.fixture
def matcher(redis):
    return Matcher(redis, priority_step_ms=10_000)


def item(queue, *, enq=NOW, priority=50, channel="voice", strategy="longest_idle", req=(), timeout=20_000):
    return WaitingInteraction(uuid.uuid4(), queue, channel, priority, enq, timeout, strategy, req)


async def offer(matcher, tenant, it, now):
    """Offer `it` on arrival; returns who it was offered to (other offers made on the way are checked apart)."""
    offers = await matcher.offer_interaction(tenant, it, now)
    return next((o.agents for o in offers if o.interaction_id == it.interaction_id), ())


def agent(*, idle=NOW - 1000, capacity=None, skills=None, available=True):
    return AgentRouting(uuid.uuid4(), available, capacity or {"voice": 1, "webchat": 2}, skills or {}, idle)


async def test_longest_idle_agent_gets_the_offer_and_never_two(matcher):
    tenant, queue = uuid.uuid4(), uuid.uuid4()
    fresh, idle_long = agent(idle=NOW - 1_000), agent(idle=NOW - 60_000)
    for a in (fresh, idle_long):
        await matcher.set_agent(tenant, a)
    first = item(queue)
    await matcher.enqueue(tenant, first)
    assert await offer(matcher, tenant, first, NOW) == (idle_long.user_id,)
    assert await offer(matcher, tenant, first, NOW) == ()  # already offered: not twice
    second = item(queue)
    await matcher.enqueue(tenant, second)
    # idle_long has no voice capacity left; fresh gets the second one.
    assert await offer(matcher, tenant, second, NOW) == (fresh.user_id,)
    third = item(queue)
    await matcher.enqueue(tenant, third)
    assert await offer(matcher, tenant, third, NOW) == ()
    assert await matcher.waiting(tenant, queue) == [third.interaction_id]


async def test_skills_relax_over_wait_time(matcher):
    tenant, queue, skill = uuid.uuid4(), uuid.uuid4(), str(uuid.uuid4())
    junior = agent(skills={skill: 4})
    await matcher.set_agent(tenant, junior)
    call = item(queue, req=((skill, ((0, 7), (30, 3))),))
    await matcher.enqueue(tenant, call)
    assert await offer(matcher, tenant, call, NOW + 10_000) == ()  # needs 7 for 30 s
    assert await offer(matcher, tenant, call, NOW + 31_000) == (junior.user_id,)  # then 3 will do


async def test_agent_without_the_skill_is_never_offered(matcher):
    tenant, queue, skill = uuid.uuid4(), uuid.uuid4(), str(uuid.uuid4())
    await matcher.set_agent(tenant, agent(skills={}))
    call = item(queue, req=((skill, ((0, 1),)),))
    await matcher.enqueue(tenant, call)
    assert await offer(matcher, tenant, call, NOW + 999_000) == ()


async def test_best_skill_round_robin_and_fewest(matcher):
    tenant, queue, skill = uuid.uuid4(), uuid.uuid4(), str(uuid.uuid4())
    strong, weak = agent(skills={skill: 9}, idle=NOW), agent(skills={skill: 2}, idle=NOW - 99_000)
    for a in (strong, weak):
        await matcher.set_agent(tenant, a)
    call = item(queue, strategy="best_skill", req=((skill, ((0, 1),)),))
    await matcher.enqueue(tenant, call)
    assert await offer(matcher, tenant, call, NOW) == (strong.user_id,)
    assert (await matcher.accept(tenant, call.interaction_id, strong.user_id, NOW + 1)).verdict == "ok"
    chat = item(queue, channel="webchat", strategy="fewest_interactions")
    await matcher.enqueue(tenant, chat)
    assert await offer(matcher, tenant, chat, NOW) == (weak.user_id,)  # strong handled one already


async def test_offer_accept_reject_and_timeout_keep_the_old_place(matcher):
    tenant, queue = uuid.uuid4(), uuid.uuid4()
    a = agent()
    await matcher.set_agent(tenant, a)
    older, newer = item(queue, enq=NOW - 5_000), item(queue, enq=NOW)
    await matcher.enqueue(tenant, older)
    await matcher.enqueue(tenant, newer)
    assert await offer(matcher, tenant, older, NOW) == (a.user_id,)
    assert await matcher.waiting(tenant, queue) == [newer.interaction_id]
    assert await matcher.reject(tenant, older.interaction_id, a.user_id) == "ok"
    assert await matcher.waiting(tenant, queue) == [older.interaction_id, newer.interaction_id]
    assert await matcher.load(tenant, a.user_id) == {"voice": 0}
    assert (await matcher.offer_agent(tenant, a.user_id, NOW)).interaction_id == older.interaction_id
    expired = await matcher.expire_offers(tenant, NOW + 20_001)
    assert expired == [(older.interaction_id, a.user_id)]
    assert await matcher.waiting(tenant, queue) == [older.interaction_id, newer.interaction_id]
    assert (await matcher.offer_agent(tenant, a.user_id, NOW + 21_000)).interaction_id == older.interaction_id
    assert (await matcher.accept(tenant, older.interaction_id, a.user_id, NOW + 50_000)).verdict == "expired"
    assert (await matcher.accept(tenant, older.interaction_id, uuid.uuid4(), NOW + 21_001)).verdict == "not_yours"
    assert (await matcher.accept(tenant, older.interaction_id, a.user_id, NOW + 21_001)).verdict == "ok"
    assert (await matcher.accept(tenant, older.interaction_id, a.user_id, NOW + 21_002)).verdict == "not_offered"
    assert await matcher.finish(tenant, older.interaction_id) == a.user_id
    assert await matcher.load(tenant, a.user_id) == {"voice": 0}


async def test_ring_all_rings_every_eligible_agent_and_the_first_to_accept_takes_it(matcher):
    tenant, queue, skill = uuid.uuid4(), uuid.uuid4(), str(uuid.uuid4())
    first, second, unskilled = agent(skills={skill: 5}), agent(skills={skill: 8}), agent(skills={})
    busy = agent(skills={skill: 9}, capacity={"voice": 0})
    for a in (first, second, unskilled, busy):
        await matcher.set_agent(tenant, a)
    call = item(queue, strategy="ring_all", req=((skill, ((0, 1),)),))
    await matcher.enqueue(tenant, call)
    rung = await offer(matcher, tenant, call, NOW)
    assert set(rung) == {first.user_id, second.user_id}
    for a in (first, second):
        assert await matcher.load(tenant, a.user_id) == {"voice": 1}  # each phone rings: no second call
    other = item(queue, strategy="ring_all")
    await matcher.enqueue(tenant, other)
    # The two ringing phones have no room; the agent without capacity is skipped; only the last one is left.
    assert await offer(matcher, tenant, other, NOW) == (unskilled.user_id,)
    taken = await matcher.accept(tenant, call.interaction_id, second.user_id, NOW + 1)
    assert taken.verdict == "ok"
    assert taken.withdrawn == (first.user_id,)
    assert await matcher.load(tenant, first.user_id) == {"voice": 0}
    assert (await matcher.accept(tenant, call.interaction_id, first.user_id, NOW + 2)).verdict == "not_offered"
    assert await matcher.finish(tenant, call.interaction_id) == second.user_id
    assert await matcher.load(tenant, second.user_id) == {"voice": 0}


async def test_ring_all_rejections_and_expiry_return_the_call_to_its_place(matcher):
    tenant, queue = uuid.uuid4(), uuid.uuid4()
    one, two = agent(), agent()
    for a in (one, two):
        await matcher.set_agent(tenant, a)
    call = item(queue, strategy="ring_all")
    await matcher.enqueue(tenant, call)
    assert len(await offer(matcher, tenant, call, NOW)) == 2
    assert await matcher.reject(tenant, call.interaction_id, one.user_id) == "ringing"
    assert await matcher.load(tenant, one.user_id) == {"voice": 0}
    assert await matcher.reject(tenant, call.interaction_id, one.user_id) == "not_yours"
    assert await matcher.reject(tenant, call.interaction_id, two.user_id) == "ok"
    assert await matcher.waiting(tenant, queue) == [call.interaction_id]
    # Offered again (an agent freed up): ring-all rings both again; nobody answers in time.
    offered = await matcher.offer_agent(tenant, one.user_id, NOW + 1_000)
    assert offered is not None
    assert set(offered.agents) == {one.user_id, two.user_id}
    expired = await matcher.expire_offers(tenant, NOW + 21_001)
    assert sorted(expired) == sorted([(call.interaction_id, one.user_id), (call.interaction_id, two.user_id)])
    assert await matcher.waiting(tenant, queue) == [call.interaction_id]
    assert await matcher.load(tenant, one.user_id) == {"voice": 0}
    assert await matcher.load(tenant, two.user_id) == {"voice": 0}
    # A ringing call that ends (the caller hangs up) frees every phone it rang.
    await offer(matcher, tenant, call, NOW + 30_000)
    assert await matcher.finish(tenant, call.interaction_id) is None
    assert await matcher.load(tenant, one.user_id) == {"voice": 0}
    assert await matcher.load(tenant, two.user_id) == {"voice": 0}


async def test_ring_all_is_for_voice_only(matcher):
    tenant, queue = uuid.uuid4(), uuid.uuid4()
    idle_long, fresh = agent(idle=NOW - 60_000), agent(idle=NOW)
    for a in (idle_long, fresh):
        await matcher.set_agent(tenant, a)
    chat = item(queue, channel="webchat", strategy="ring_all")
    await matcher.enqueue(tenant, chat)
    assert await offer(matcher, tenant, chat, NOW) == (idle_long.user_id,)


async def test_an_agent_with_room_only_for_chats_finds_the_chat_behind_many_calls(redis):
    matcher = Matcher(redis, scan_depth=5)
    tenant, queue = uuid.uuid4(), uuid.uuid4()
    calls = [item(queue, enq=NOW + i) for i in range(20)]
    chat = item(queue, enq=NOW + 100, channel="webchat")
    for it in (*calls, chat):
        await matcher.enqueue(tenant, it)
    chatter = agent(capacity={"voice": 0, "webchat": 1})
    await matcher.set_agent(tenant, chatter)
    offered = await matcher.offer_agent(tenant, chatter.user_id, NOW + 200)
    assert offered is not None
    assert offered.interaction_id == chat.interaction_id
    assert await matcher.position(tenant, queue, calls[0].interaction_id) == 1


async def test_a_new_arrival_does_not_jump_older_work_the_agent_could_take(matcher):
    """The agent became available but has not been offered the older chat yet: the older one goes first, and
    the newcomer goes to the next agent with room (here the same agent's second slot)."""
    tenant, queue = uuid.uuid4(), uuid.uuid4()
    older = item(queue, enq=NOW, channel="webchat")
    await matcher.enqueue(tenant, older)
    a = agent(capacity={"webchat": 2})
    await matcher.set_agent(tenant, a)
    newer = item(queue, enq=NOW + 1, channel="webchat")
    await matcher.enqueue(tenant, newer)
    offers = await matcher.offer_interaction(tenant, newer, NOW + 2)
    assert [(o.interaction_id, o.agents) for o in offers] == [
        (older.interaction_id, (a.user_id,)),
        (newer.interaction_id, (a.user_id,)),
    ]
    assert offers[0].timeout_ms == 20_000
    assert await matcher.load(tenant, a.user_id) == {"webchat": 2}


async def test_enqueue_is_idempotent_and_leaves_an_offered_interaction_alone(matcher):
    tenant, queue, other_queue = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    a = agent()
    await matcher.set_agent(tenant, a)
    call = item(queue)
    await matcher.enqueue(tenant, call)
    await matcher.enqueue(tenant, call)
    assert await matcher.waiting(tenant, queue) == [call.interaction_id]
    moved = WaitingInteraction(call.interaction_id, other_queue, "voice", 50, NOW, 20_000, "longest_idle")
    await matcher.enqueue(tenant, moved)
    assert await matcher.waiting(tenant, queue) == []
    assert await matcher.waiting(tenant, other_queue) == [call.interaction_id]
    assert await offer(matcher, tenant, moved, NOW) == (a.user_id,)
    await matcher.enqueue(tenant, moved)  # a late duplicate must not undo the offer
    assert await matcher.waiting(tenant, other_queue) == []
    assert await matcher.load(tenant, a.user_id) == {"voice": 1}


async def test_priority_ages(matcher):
    """A higher priority starts ahead by 10 s a point; something waiting long enough still comes first."""
    tenant, queue = uuid.uuid4(), uuid.uuid4()
    old_low = item(queue, enq=NOW - 200_000, priority=10)
    new_high = item(queue, enq=NOW, priority=20)
    newer_high = item(queue, enq=NOW + 1, priority=30)
    for it in (new_high, old_low, newer_high):
        await matcher.enqueue(tenant, it)
    assert await matcher.waiting(tenant, queue) == [
        old_low.interaction_id,
        newer_high.interaction_id,
        new_high.interaction_id,
    ]
    assert await matcher.position(tenant, queue, new_high.interaction_id) == 3


async def test_tenants_do_not_see_each_other(matcher):
    a_tenant, b_tenant, queue = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    a_agent = agent()
    await matcher.set_agent(a_tenant, a_agent)
    call = item(queue)
    await matcher.enqueue(b_tenant, call)
    assert await offer(matcher, b_tenant, call, NOW) == ()
    assert await matcher.offer_agent(a_tenant, a_agent.user_id, NOW) is None


async def test_concurrent_matchers_never_double_assign_or_overrun(redis):
    """Several matchers (separate connections) race over one tenant: invariants hold after every step."""
    from redis.asyncio import Redis

    clients = [
        Redis.from_url(redis.connection_pool.connection_kwargs and _url(redis), decode_responses=True) for _ in range(4)
    ]
    matchers = [Matcher(c) for c in clients]
    tenant, queue, skill = uuid.uuid4(), uuid.uuid4(), str(uuid.uuid4())
    agents = [agent(capacity={"voice": 1, "webchat": 3}, skills={skill: random.randint(1, 10)}) for _ in range(15)]
    for a in agents:
        await matchers[0].set_agent(tenant, a)
    items = [
        item(
            queue,
            enq=NOW + i,
            channel=random.choice(["voice", "webchat"]),
            req=((skill, ((0, random.randint(1, 10)),)),) if i % 3 == 0 else (),
        )
        for i in range(300)
    ]
    offers: dict[uuid.UUID, uuid.UUID] = {}
    rng = random.Random(7)

    async def worker(m: Matcher, chunk: list[WaitingInteraction]) -> None:
        for it in chunk:
            await m.enqueue(tenant, it)
            for made in await m.offer_interaction(tenant, it, NOW + 1_000):
                assert made.interaction_id not in offers
                (offers[made.interaction_id],) = made.agents
            for a in rng.sample(agents, 3):
                offered = await m.offer_agent(tenant, a.user_id, NOW + 1_000)
                if offered is not None:
                    assert offered.interaction_id not in offers
                    assert offered.agents == (a.user_id,)
                    offers[offered.interaction_id] = a.user_id
            if offers and rng.random() < 0.5:
                # Forget the offer before Redis does: once the step is done another worker may re-offer it.
                iid = rng.choice(list(offers))
                owner = offers.pop(iid)
                if rng.random() < 0.5:
                    assert await m.reject(tenant, iid, owner) == "ok"
                else:
                    assert await m.finish(tenant, iid) == owner

    await asyncio.gather(*(worker(matchers[i % 4], items[i::4]) for i in range(4)))
    for a in agents:
        load = await matchers[0].load(tenant, a.user_id)
        assert load.get("voice", 0) <= 1
        assert load.get("webchat", 0) <= 3
        mine = [i for i, owner in offers.items() if owner == a.user_id]
        assert sum(load.values()) == len(mine)
    for c in clients:
        await c.aclose()


def _url(redis) -> str:
    kwargs = redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


async def _snapshot(redis, tenant: uuid.UUID) -> dict[str, object]:
    """Every routing key of the tenant and its value, without the tenant's prefix (to compare two tenants)."""
    prefix = Matcher.prefix(tenant)
    found: dict[str, object] = {}
    async for key in redis.scan_iter(match=prefix + "*"):
        kind = await redis.type(key)
        if kind == "hash":
            value: object = await redis.hgetall(key)
        elif kind == "set":
            value = sorted(await redis.smembers(key))
        else:
            value = await redis.zrange(key, 0, -1, withscores=True)
        found[key.removeprefix(prefix)] = value
    return found


async def test_finish_and_offer_does_what_finish_then_offer_agent_do(redis):
    """Two tenants with the same world, driven at random: one ends interactions with `finish` then
    `offer_agent`, the other with `finish_and_offer`; every outcome and the whole state stay the same."""
    matcher = Matcher(redis)
    rng = random.Random(11)
    two, one = uuid.uuid4(), uuid.uuid4()  # two steps, one step
    skill = str(uuid.uuid4())
    queues = [uuid.uuid4() for _ in range(3)]
    strategies = ["longest_idle", "best_skill", "ring_all"]
    agents = [
        agent(capacity={"voice": 1, "webchat": rng.randint(1, 3)}, skills={skill: rng.randint(1, 9)}, idle=NOW - n)
        for n in range(6)
    ]
    for tenant in (two, one):
        for a in agents:
            await matcher.set_agent(tenant, a)
    holding: dict[uuid.UUID, uuid.UUID] = {}  # interaction -> the agent it is with (offered or connected)
    rings: set[uuid.UUID] = set()  # ring-all calls: with nobody in particular until accepted, so accepted at once
    next_offers = 0
    for step in range(400):
        now = NOW + step * 100
        if rng.random() < 0.5:
            n = rng.randrange(3)
            it = item(
                queues[n],
                enq=now,
                channel=rng.choice(["voice", "webchat"]),
                strategy=strategies[n],
                req=((skill, ((0, rng.randint(1, 9)), (5, 1))),) if rng.random() < 0.5 else (),
            )
            if strategies[n] == "ring_all" and it.channel == "voice":
                rings.add(it.interaction_id)
            outcomes = []
            for tenant in (two, one):
                await matcher.enqueue(tenant, it)
                outcomes.append(await matcher.offer_interaction(tenant, it, now))
            assert outcomes[0] == outcomes[1]
            for made in outcomes[0]:
                if made.interaction_id in rings:  # the first agent takes it, the others stop ringing
                    for tenant in (two, one):
                        assert (await matcher.accept(tenant, made.interaction_id, made.agents[0], now)).ok
                holding[made.interaction_id] = made.agents[0]
        elif holding:
            iid = rng.choice(sorted(holding))
            who = holding.pop(iid)
            if rng.random() < 0.5:
                for tenant in (two, one):
                    assert (await matcher.accept(tenant, iid, who, now)).verdict in ("ok", "not_offered", "expired")
            was = await matcher.finish(two, iid)
            separately = await matcher.offer_agent(two, who, now)
            together = await matcher.finish_and_offer(one, iid, who, now)
            assert together.was_with == was == who
            assert together.offer == separately
            if separately is not None:
                next_offers += 1
                assert who in separately.agents
                if separately.interaction_id in rings:
                    for tenant in (two, one):
                        assert (await matcher.accept(tenant, separately.interaction_id, who, now)).ok
                holding[separately.interaction_id] = who
        if step % 50 == 0:
            assert await _snapshot(redis, two) == await _snapshot(redis, one)
    assert await _snapshot(redis, two) == await _snapshot(redis, one)
    assert next_offers > 20  # the freed agent was often offered more


async def test_finish_and_offer_keeps_capacity_and_skills(matcher):
    tenant, other_tenant, queue, skill = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), str(uuid.uuid4())
    me = agent(capacity={"voice": 1, "webchat": 1}, skills={})
    await matcher.set_agent(tenant, me)
    call, chat = item(queue, enq=NOW), item(queue, enq=NOW + 1, channel="webchat")
    for it in (call, chat):
        await matcher.enqueue(tenant, it)
        assert await offer(matcher, tenant, it, NOW + 10) == (me.user_id,)
        assert (await matcher.accept(tenant, it.interaction_id, me.user_id, NOW + 10)).ok
    # Waiting for them: a call needing a skill they lack, another tenant's chat, then a call and a chat they can take.
    skilled_call = item(queue, enq=NOW + 2, req=((skill, ((0, 1),)),))
    await matcher.enqueue(tenant, skilled_call)
    await matcher.enqueue(other_tenant, item(queue, enq=NOW + 3, channel="webchat"))
    next_call, next_chat = item(queue, enq=NOW + 4), item(queue, enq=NOW + 5, channel="webchat")
    for it in (next_call, next_chat):
        await matcher.enqueue(tenant, it)
    # The chat ends: the voice slot is still taken by the call, so only the next chat may come.
    freed = await matcher.finish_and_offer(tenant, chat.interaction_id, me.user_id, NOW + 20)
    assert freed.was_with == me.user_id
    assert not freed.held_nothing
    assert freed.offer is not None and freed.offer.interaction_id == next_chat.interaction_id
    assert await matcher.load(tenant, me.user_id) == {"voice": 1, "webchat": 1}
    # The call ends: the skilled call is passed over for the next call.
    freed = await matcher.finish_and_offer(tenant, call.interaction_id, me.user_id, NOW + 30)
    assert freed.offer is not None and freed.offer.interaction_id == next_call.interaction_id
    assert await matcher.load(tenant, me.user_id) == {"voice": 1, "webchat": 1}
    # Nothing they may take is left: the interaction ends all the same and nothing is offered.
    freed = await matcher.finish_and_offer(tenant, next_call.interaction_id, me.user_id, NOW + 40)
    assert freed.offer is None
    assert await matcher.state(tenant, next_call.interaction_id) is None
    assert await matcher.waiting(tenant, queue) == [skilled_call.interaction_id]


async def test_finish_and_offer_leaves_an_agent_going_to_wrap_up_alone(matcher, redis):
    tenant, queue = uuid.uuid4(), uuid.uuid4()
    me = agent(capacity={"voice": 1, "webchat": 2})
    await matcher.set_agent(tenant, me)
    first_chat, second_chat = item(queue, channel="webchat"), item(queue, enq=NOW + 1, channel="webchat")
    for it in (first_chat, second_chat):
        await matcher.enqueue(tenant, it)
        assert await offer(matcher, tenant, it, NOW + 10) == (me.user_id,)
    waiting_chat = item(queue, enq=NOW + 2, channel="webchat")
    await matcher.enqueue(tenant, waiting_chat)
    # Still holding a chat: no wrap-up yet, so they are offered more as usual.
    freed = await matcher.finish_and_offer(tenant, first_chat.interaction_id, me.user_id, NOW + 20, wrap_up=True)
    assert not freed.held_nothing
    assert freed.offer is not None and freed.offer.interaction_id == waiting_chat.interaction_id
    freed = await matcher.finish_and_offer(tenant, second_chat.interaction_id, me.user_id, NOW + 25, wrap_up=True)
    assert not freed.held_nothing and freed.offer is None  # nothing waiting
    call = item(queue, enq=NOW + 3)
    await matcher.enqueue(tenant, call)
    freed = await matcher.finish_and_offer(tenant, waiting_chat.interaction_id, me.user_id, NOW + 30, wrap_up=True)
    # The last one ends: they hold nothing and go to wrap-up, so the waiting call is not offered to them and
    # nobody else may offer them work until the engine makes them available again.
    assert freed.held_nothing and freed.offer is None
    assert not await redis.sismember(Matcher.prefix(tenant) + "avail", str(me.user_id))
    assert await matcher.offer_agent(tenant, me.user_id, NOW + 40) is None
    assert await matcher.waiting(tenant, queue) == [call.interaction_id]


async def test_finish_and_offer_offers_nothing_to_an_unavailable_agent(matcher):
    tenant, queue = uuid.uuid4(), uuid.uuid4()
    me = agent()
    await matcher.set_agent(tenant, me)
    call = item(queue)
    await matcher.enqueue(tenant, call)
    assert await offer(matcher, tenant, call, NOW) == (me.user_id,)
    await matcher.set_agent(tenant, AgentRouting(me.user_id, False, me.capacity, me.skills, me.idle_since_ms))
    await matcher.enqueue(tenant, item(queue, enq=NOW + 1))
    freed = await matcher.finish_and_offer(tenant, call.interaction_id, me.user_id, NOW + 10)
    assert freed.was_with == me.user_id and freed.held_nothing and freed.offer is None
    assert await matcher.load(tenant, me.user_id) == {"voice": 0}


async def test_an_arrival_reads_only_the_agents_with_room_on_its_channel(matcher, redis):
    """`room:<channel>` follows every change of load, capacity and availability: an agent busy on voice, away, or
    without a softphone (voice capacity 0) is out of it, so a new call never reads them; back with room, they are in."""
    tenant, queue = uuid.uuid4(), uuid.uuid4()
    talking, away, no_phone, free = agent(), agent(available=False), agent(capacity={"voice": 0, "webchat": 2}), agent()
    for a in (talking, away, no_phone, free):
        await matcher.set_agent(tenant, a)
    room = matcher.prefix(tenant) + "room:"

    async def with_room(channel: str) -> set[uuid.UUID]:
        return {uuid.UUID(member) for member in await redis.smembers(room + channel)}

    assert await with_room("voice") == {talking.user_id, free.user_id}
    assert await with_room("webchat") == {talking.user_id, no_phone.user_id, free.user_id}
    call = item(queue)
    await matcher.enqueue(tenant, call)
    taker = (await offer(matcher, tenant, call, NOW))[0]
    other = free.user_id if taker == talking.user_id else talking.user_id
    assert await with_room("voice") == {other}  # offered: the taker's one voice slot is used
    assert (await matcher.accept(tenant, call.interaction_id, taker, NOW)).ok
    assert await with_room("voice") == {other}
    await matcher.finish(tenant, call.interaction_id)
    assert await with_room("voice") == {talking.user_id, free.user_id}
    await matcher.set_agent(tenant, AgentRouting(free.user_id, False, {"voice": 1, "webchat": 2}, {}, NOW))
    assert await with_room("voice") == {talking.user_id}
    await matcher.set_agent(tenant, AgentRouting(no_phone.user_id, True, {"voice": 1, "webchat": 2}, {}, NOW))
    assert await with_room("voice") == {talking.user_id, no_phone.user_id}

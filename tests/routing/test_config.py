"""Routing configuration over the API: validation, ownership, audit."""

import pytest

from tests.factories import unique

pytestmark = pytest.mark.integration


async def test_queue_with_skills_hours_and_overflow_round_trips(client, factory):
    ctx = await factory.tenant()
    skill = await factory.skill(ctx)
    hours = await factory.business_hours(ctx)
    spill = await factory.queue(ctx)
    body = {
        "name": "Support FR",
        "strategy": "best_skill",
        "priority": 70,
        "max_wait_seconds": 300,
        "business_hours_id": str(hours),
        "overflow_action": {"type": "queue", "queue_id": str(spill)},
        "closed_action": {"type": "voicemail"},
        "no_agents_action": {"type": "callback", "message": "We will call you back"},
        "skills": [
            {
                "skill_id": str(skill),
                "steps": [{"after_seconds": 0, "min_level": 7}, {"after_seconds": 30, "min_level": 3}],
            }
        ],
    }
    response = await client.post("/api/v1/routing/queues", json=body, headers=ctx.headers)
    assert response.status_code == 201, response.text
    queue = response.json()
    assert queue["skills"][0]["steps"][1] == {"after_seconds": 30, "min_level": 3}
    assert queue["overflow_action"]["queue_id"] == str(spill)
    fetched = (await client.get(f"/api/v1/routing/queues/{queue['id']}", headers=ctx.headers)).json()
    assert fetched == queue
    audit = (await client.get("/api/v1/audit", params={"action": "queue.create"}, headers=ctx.headers)).json()
    assert any(e["target_id"] == queue["id"] for e in audit["items"])


async def test_overflow_cycle_is_refused(client, factory):
    ctx = await factory.tenant()
    first = await factory.queue(ctx)
    second = await factory.queue(ctx, overflow_action={"type": "queue", "queue_id": str(first)})
    response = await client.put(
        f"/api/v1/routing/queues/{first}",
        json={"name": unique("q"), "no_agents_action": {"type": "queue", "queue_id": str(second)}},
        headers=ctx.headers,
    )
    assert response.status_code == 422, response.text
    assert "cycle" in response.json()["detail"]
    # Nothing changed.
    unchanged = (await client.get(f"/api/v1/routing/queues/{first}", headers=ctx.headers)).json()
    assert unchanged["no_agents_action"]["type"] == "none"


@pytest.mark.parametrize(
    ("patch", "status", "field"),
    [
        ({"skills": [{"skill_id": "SKILL", "steps": [{"after_seconds": 0, "min_level": 11}]}]}, 400, "min_level"),
        (
            {
                "skills": [
                    {
                        "skill_id": "SKILL",
                        "steps": [{"after_seconds": 0, "min_level": 3}, {"after_seconds": 30, "min_level": 7}],
                    }
                ]
            },
            422,
            "skills[0].steps",
        ),
        ({"skills": [{"skill_id": "SKILL", "steps": [{"after_seconds": 10, "min_level": 3}]}]}, 422, "skills[0].steps"),
        ({"overflow_action": {"type": "queue"}}, 422, "overflow_action.queue_id"),
        ({"overflow_action": {"type": "voicemail", "queue_id": "SKILL"}}, 422, "overflow_action.queue_id"),
        ({"strategy": "random"}, 400, "strategy"),
        ({"priority": 101}, 400, "priority"),
        ({"business_hours_id": "00000000-0000-0000-0000-000000000000"}, 422, "business_hours_id"),
    ],
)
async def test_bad_queue_settings_are_refused(client, factory, patch, status, field):
    ctx = await factory.tenant()
    skill = str(await factory.skill(ctx))
    body = {"name": unique("q"), **patch}
    raw = str(body).replace("SKILL", skill).replace("'", '"').replace("True", "true")
    response = await client.post(
        "/api/v1/routing/queues", content=raw, headers={**ctx.headers, "content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    problem = response.json()
    assert any(field in e["field"] for e in problem.get("errors", [])) or field in problem["detail"], problem


async def test_other_tenants_ids_are_unknown_here(client, factory):
    a = await factory.tenant()
    b = await factory.tenant()
    foreign_skill = await factory.skill(a)
    foreign_queue = await factory.queue(a)
    response = await client.post(
        "/api/v1/routing/queues",
        json={
            "name": "x",
            "skills": [{"skill_id": str(foreign_skill), "steps": [{"after_seconds": 0, "min_level": 1}]}],
        },
        headers=b.headers,
    )
    assert response.status_code == 422
    response = await client.post(
        "/api/v1/routing/queues",
        json={"name": "y", "overflow_action": {"type": "queue", "queue_id": str(foreign_queue)}},
        headers=b.headers,
    )
    assert response.status_code == 422
    assert (await client.get(f"/api/v1/routing/queues/{foreign_queue}", headers=b.headers)).status_code == 404


async def test_agent_profile_levels_and_capacity(client, factory):
    ctx = await factory.tenant()
    agent = await factory.user(ctx)
    skill = await factory.skill(ctx)
    default = (await client.get(f"/api/v1/routing/agents/{agent['id']}", headers=ctx.headers)).json()
    assert default["capacity"] == {"voice": 1, "webchat": 3, "wechat": 3}
    response = await client.put(
        f"/api/v1/routing/agents/{agent['id']}",
        json={"capacity": {"voice": 1, "webchat": 4}, "skills": [{"skill_id": str(skill), "level": 8}]},
        headers=ctx.headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["skills"] == [{"skill_id": str(skill), "level": 8}]
    for level in (0, 11):
        bad = await client.put(
            f"/api/v1/routing/agents/{agent['id']}",
            json={"skills": [{"skill_id": str(skill), "level": level}]},
            headers=ctx.headers,
        )
        assert bad.status_code == 400, bad.text
    bad = await client.put(f"/api/v1/routing/agents/{agent['id']}", json={"capacity": {"fax": 1}}, headers=ctx.headers)
    assert bad.status_code == 400


async def test_business_hours_status_and_validation(client, factory):
    ctx = await factory.tenant(time_zone="Europe/Paris")
    hours = await factory.business_hours(ctx)
    status = await client.get(
        f"/api/v1/routing/business-hours/{hours}/status", params={"at": "2026-03-30T07:30:00Z"}, headers=ctx.headers
    )
    assert status.status_code == 200, status.text
    assert status.json()["open"] is True  # Monday 09:30 CEST
    closed = await client.get(
        f"/api/v1/routing/business-hours/{hours}/status", params={"at": "2026-03-28T10:00:00Z"}, headers=ctx.headers
    )
    assert closed.json()["open"] is False  # Saturday
    assert closed.json()["next_opening"].startswith("2026-03-30T07:00:00")
    overlapping = await client.post(
        "/api/v1/routing/business-hours",
        json={
            "name": "bad",
            "weekly": [{"day": 0, "start": "09:00", "end": "12:00"}, {"day": 0, "start": "11:00", "end": "14:00"}],
        },
        headers=ctx.headers,
    )
    assert overlapping.status_code == 422
    zone = await client.post(
        "/api/v1/routing/business-hours", json={"name": "bad", "time_zone": "Mars/Olympus"}, headers=ctx.headers
    )
    assert zone.status_code == 422
    assert zone.json()["errors"][0]["field"] == "time_zone"


async def test_codes_and_agent_permissions(client, factory):
    ctx = await factory.tenant()
    agent = await factory.user(ctx, login=True)
    created = await client.post(
        "/api/v1/routing/wrap-up-codes", json={"code": "sale", "label": "Sale made"}, headers=ctx.headers
    )
    assert created.status_code == 201
    duplicate = await client.post(
        "/api/v1/routing/wrap-up-codes", json={"code": "sale", "label": "Again"}, headers=ctx.headers
    )
    assert duplicate.status_code == 409
    assert (
        await client.post("/api/v1/routing/pause-reasons", json={"code": "Lunch!", "label": "x"}, headers=ctx.headers)
    ).status_code == 400
    # Agents may not change routing configuration.
    denied = await client.post("/api/v1/routing/skills", json={"name": "x"}, headers=agent["headers"])
    assert denied.status_code == 403

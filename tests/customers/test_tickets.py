"""Tickets: SLA due times, the status flow, comments and history, assignee notifications, versions."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from tests.support.asgi_websocket import websocket_connect

pytestmark = pytest.mark.integration

BASE = "/api/v1/tickets"


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def test_due_time_follows_the_priority_sla(client, factory):
    ctx = await factory.tenant()
    assert (await client.get(f"{BASE}/sla", headers=ctx.headers)).json() == {
        "urgent": 240,
        "high": 480,
        "normal": 1440,
        "low": 4320,
    }
    urgent = await factory.ticket(ctx, priority="urgent")
    assert _at(urgent["due_at"]) - _at(urgent["created_at"]) == timedelta(minutes=240)
    changed = await client.put(f"{BASE}/sla", json={"normal": 30}, headers=ctx.headers)
    assert changed.json()["normal"] == 30
    normal = await factory.ticket(ctx)
    assert _at(normal["due_at"]) - _at(normal["created_at"]) == timedelta(minutes=30)
    raised = await client.patch(
        f"{BASE}/{normal['id']}", json={"priority": "urgent"}, headers={**ctx.headers, "If-Match": normal["etag"]}
    )
    assert _at(raised.json()["due_at"]) - _at(normal["created_at"]) == timedelta(minutes=240)
    agent = await factory.user(ctx, role="agent", login=True)
    assert (await client.put(f"{BASE}/sla", json={"low": 1}, headers=agent["headers"])).status_code == 403


async def test_status_flow_and_full_history(client, factory):
    ctx = await factory.tenant()
    ticket = await factory.ticket(ctx)
    assert ticket["status"] == "new" and ticket["number"] == 1
    assert (await factory.ticket(ctx))["number"] == 2
    path = f"{BASE}/{ticket['id']}"
    version = ticket["etag"]
    for status in ("open", "pending", "open", "resolved", "open", "resolved", "closed"):
        response = await client.patch(path, json={"status": status}, headers={**ctx.headers, "If-Match": version})
        assert response.status_code == 200, (status, response.text)
        version = response.headers["etag"]
    final = response.json()
    assert final["closed_at"] is not None and final["resolved_at"] is not None
    reopened = await client.patch(path, json={"status": "open"}, headers={**ctx.headers, "If-Match": version})
    assert reopened.status_code == 409
    assert reopened.json()["errors"][0]["field"] == "status"
    stale = await client.patch(path, json={"subject": "x"}, headers={**ctx.headers, "If-Match": '"1"'})
    assert stale.status_code == 412
    comment = await client.post(f"{path}/comments", json={"body": "Customer called again"}, headers=ctx.headers)
    assert comment.status_code == 201
    history = (await client.get(path, headers=ctx.headers)).json()["history"]
    assert [h["kind"] for h in history] == ["created"] + ["changed"] * 7 + ["comment"]
    assert history[1]["changes"]["status"] == ["new", "open"]
    assert history[-1]["body"] == "Customer called again"


async def test_overdue_flag_and_filters(client, factory, sessionmaker):
    from sqlalchemy import update

    from backend.customers.models import Ticket
    from backend.db.engine import tenant_transaction

    ctx = await factory.tenant()
    customer = await factory.customer(ctx)
    late = await factory.ticket(ctx, customer_id=customer["id"], category="billing")
    on_time = await factory.ticket(ctx, priority="low")
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        await session.execute(
            update(Ticket)
            .where(Ticket.id == late["id"])
            .values(due_at=datetime.now().astimezone() - timedelta(hours=1))
        )
    overdue = (await client.get(BASE, params={"overdue": "true"}, headers=ctx.headers)).json()["items"]
    assert [t["id"] for t in overdue] == [late["id"]] and overdue[0]["overdue"] is True
    assert [
        t["id"] for t in (await client.get(BASE, params={"overdue": "false"}, headers=ctx.headers)).json()["items"]
    ] == [on_time["id"]]
    assert [
        t["id"]
        for t in (await client.get(BASE, params={"customer_id": customer["id"]}, headers=ctx.headers)).json()["items"]
    ] == [late["id"]]
    assert [
        t["id"] for t in (await client.get(BASE, params={"category": "billing"}, headers=ctx.headers)).json()["items"]
    ] == [late["id"]]
    assert [
        t["id"] for t in (await client.get(BASE, params={"priority": "low"}, headers=ctx.headers)).json()["items"]
    ] == [on_time["id"]]
    by_status = (
        await client.get(BASE, params={"status": ["new", "open"], "sort": "due_at"}, headers=ctx.headers)
    ).json()["items"]
    assert [t["id"] for t in by_status] == [late["id"], on_time["id"]]


async def test_ticket_from_an_interaction_takes_its_customer(client, factory):
    ctx = await factory.tenant()
    customer = await factory.customer(ctx)
    queue = await factory.queue(ctx)
    interaction = await client.post(
        "/api/v1/interactions",
        json={"channel": "webchat", "queue_id": str(queue), "customer_ref": customer["id"]},
        headers=ctx.headers,
    )
    ticket = await factory.ticket(ctx, interaction_id=interaction.json()["id"])
    assert ticket["customer_id"] == customer["id"]
    assert ticket["interaction_id"] == interaction.json()["id"]
    wrong = await client.post(BASE, json={"subject": "x", "customer_id": ticket["id"]}, headers=ctx.headers)
    assert wrong.status_code == 422


async def test_assignees_are_notified_in_real_time(client, factory, app):
    ctx = await factory.tenant()
    team = await factory.team(ctx)
    agent = await factory.member(ctx, team)
    other = await factory.user(ctx, login=True)
    ws_ticket = (await client.post("/api/v1/auth/ws-ticket", headers=agent["headers"])).json()["ticket"]
    async with websocket_connect(app, "/api/v1/agent/ws", query=f"ticket={ws_ticket}") as socket:
        assert (await socket.receive_message())["type"] == "websocket.accept"
        await socket.receive_json()  # hello
        by_team = await factory.ticket(ctx, subject="For the team", assignee_team_id=str(team))
        message = await socket.receive_json()
        assert message["type"] == "ticket" and message["event"] == "assigned"
        assert message["ticket"]["id"] == by_team["id"]
        moved = await client.patch(
            f"{BASE}/{by_team['id']}",
            json={"assignee_user_id": str(agent["id"])},
            headers={**ctx.headers, "If-Match": by_team["etag"]},
        )
        assert moved.json()["assignee_team_id"] is None
        assert (await socket.receive_json())["ticket"]["assignee_user_id"] == str(agent["id"])
        await client.post(f"{BASE}/{by_team['id']}/comments", json={"body": "Please call back"}, headers=ctx.headers)
        assert (await socket.receive_json())["event"] == "comment"
        # The agent's own comment does not notify the agent.
        await client.post(f"{BASE}/{by_team['id']}/comments", json={"body": "Done"}, headers=agent["headers"])
        await factory.ticket(ctx, subject="Someone else's", assignee_user_id=str(other["id"]))
        await client.post(f"{BASE}/{by_team['id']}/comments", json={"body": "Thanks"}, headers=ctx.headers)
        assert (await socket.receive_json())["ticket"]["id"] == by_team["id"]


async def test_assignee_must_be_of_the_tenant_and_only_one(client, factory):
    ctx = await factory.tenant()
    other = await factory.tenant()
    team = await factory.team(ctx)
    foreign = await client.post(
        BASE, json={"subject": "x", "assignee_user_id": str(other.owner_id)}, headers=ctx.headers
    )
    assert foreign.status_code == 422
    both = await client.post(
        BASE,
        json={"subject": "x", "assignee_user_id": str(ctx.owner_id), "assignee_team_id": str(team)},
        headers=ctx.headers,
    )
    assert both.status_code == 422

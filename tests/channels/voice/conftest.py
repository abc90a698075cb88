"""Shared pieces of the voice tests: a registered switch node named as in the captures, the switch secret."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.factories import Factory
from tests.support.freeswitch_captures import NODE_NAME


@pytest.fixture(scope="session")
async def switch_node(factory: Factory, app) -> dict[str, Any]:
    """The captures' node, `fs-node-1`, registered from 127.0.0.1 (the test client's address)."""
    node = await factory.switch_node(name=NODE_NAME, sources=["127.0.0.1/32"])
    await app.state.voice.heartbeat(node["id"])
    return node


@pytest.fixture
async def node_up(switch_node: dict[str, Any], app) -> uuid.UUID:
    """`fs-node-1`, heartbeating now (another test's watchdog pass may have marked it down)."""
    node_id: uuid.UUID = switch_node["id"]
    await app.state.voice.heartbeat(node_id)
    return node_id


@pytest.fixture(scope="session")
def switch_headers(settings_obj) -> dict[str, str]:
    """How our test requests present the switch secret (FreeSWITCH itself uses basic auth, tested apart)."""
    return {"x-switch-secret": settings_obj.switch_shared_secret}

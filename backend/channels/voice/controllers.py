"""Routes of the voice channel: the switch-facing xml_curl and CDR endpoints, provider operations, tenants' numbers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from litestar import Controller, Request, Response, get, patch, post
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.crypto import SecretBox
from backend.auth.principal import Principal
from backend.channels.voice import cdrs, nodes, numbers
from backend.channels.voice.commands import LinkStatus
from backend.channels.voice.legs import LegError, as_uuid, leg_from_json_cdr
from backend.channels.voice.nodes import NodeAddressBook
from backend.channels.voice.schemas import (
    CdrOut,
    NumberAssign,
    NumberCreate,
    NumberOut,
    NumberRouting,
    PoolNumberOut,
    SwitchLinkOut,
    SwitchNodeCreate,
    SwitchNodeOut,
    SwitchNodePatch,
)
from backend.channels.voice.service import VoiceSwitchboard
from backend.channels.voice.xml_curl import XmlCurl, parse_form
from backend.channels.voice.xml_documents import CONTENT_TYPE
from backend.db.session import after_commit
from backend.lib.pagination import Page, PageRequest
from backend.lib.problems import InvalidInput
from backend.routing import ivr_service

Disposition = Literal["answered", "no_answer", "busy", "cancelled", "refused", "failed", "node_failure"]


def _source(request: Request[Any, Any, Any]) -> str:
    client = request.scope.get("client")
    return str(client[0]) if client else ""


def _xml(document: bytes) -> Response[bytes]:
    return Response(document, media_type=CONTENT_TYPE, status_code=HTTP_200_OK)


class SwitchController(Controller):
    """What FreeSWITCH nodes call: mod_xml_curl's directory and dialplan bindings, and mod_json_cdr.

    Point the bindings at these URLs with the shared secret as HTTP basic-auth password
    (`gateway-credentials` / `cred` = `<node name>:<secret>`), from an address registered for the node.
    """

    path = "/api/v1/switch"
    tags = ["switch"]
    opt = {"access": "switch"}

    @post("/directory", operation_id="switch_directory", status_code=HTTP_200_OK)
    async def directory(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """mod_xml_curl `directory`: a seat's digest credentials and variables, or FreeSWITCH's "not found"."""
        xml_curl: XmlCurl = request.app.state.xml_curl
        form = parse_form(await request.body())
        return _xml(await xml_curl.directory(form, _source(request)))

    @post("/dialplan", operation_id="switch_dialplan", status_code=HTTP_200_OK)
    async def dialplan(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """mod_xml_curl `dialplan`: hand the call to call control, or refuse it with a hangup cause."""
        xml_curl: XmlCurl = request.app.state.xml_curl
        form = parse_form(await request.body())
        return _xml(await xml_curl.dialplan(form, _source(request)))

    @post("/cdr", operation_id="switch_cdr", status_code=HTTP_200_OK)
    async def cdr(
        self,
        request: Request[Any, Any, Any],
        uuid_: str | None = Parameter(query="uuid", default=None, max_length=64, description="The leg's UUID"),
    ) -> Response[str]:
        """mod_json_cdr: one leg's CDR, stored before this answers 200, once however often it is posted."""
        switchboard: VoiceSwitchboard = request.app.state.voice
        content_type = request.headers.get("content-type", "application/json")
        try:
            document = cdrs.parse_cdr_body(await request.body(), content_type)
            leg = leg_from_json_cdr(document)
        except LegError as exc:
            raise InvalidInput.field("body", str(exc)) from exc
        if uuid_ is not None and as_uuid(uuid_) != leg.leg_uuid:
            raise InvalidInput.field("uuid", "does not match the CDR's leg")
        try:
            await switchboard.cdrs.record(leg, "json_cdr")
        except LegError as exc:
            raise InvalidInput.field("body", str(exc)) from exc
        return Response("OK", media_type="text/plain", status_code=HTTP_200_OK)


def _moment(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch else None


def link_out(node_id: uuid.UUID, status: LinkStatus | None) -> SwitchLinkOut:
    """The API's view of a node's inbound link."""
    if status is None:
        return SwitchLinkOut(node_id, False, None, False, None, None, 0, 0, 0, None, None)
    return SwitchLinkOut(
        node_id=node_id,
        held=True,
        holder=status.holder,
        connected=status.connected,
        connected_since=_moment(status.since),
        error=status.error,
        events=status.events,
        dropped=status.dropped,
        failed=status.failed,
        lag_ms=status.lag_ms,
        reported_at=_moment(status.updated_at),
    )


def _box(request: Request[Any, Any, Any]) -> SecretBox:
    box: SecretBox = request.app.state.secret_box
    return box


def _forget_addresses(request: Request[Any, Any, Any], session: AsyncSession) -> None:
    book: NodeAddressBook = request.app.state.switch_sources

    async def invalidate() -> None:
        book.invalidate()

    after_commit(session, invalidate)


class SwitchNodeController(Controller):
    """Provider operations: the FreeSWITCH nodes of the cluster."""

    path = "/api/v1/ops/switch-nodes"
    tags = ["provider operations"]
    opt = {"access": "provider"}

    @get("/", operation_id="ops_list_switch_nodes")
    async def list_nodes(self, db_session: AsyncSession, page: PageRequest) -> Page[SwitchNodeOut]:
        """Every node with its health (up, down, draining, unknown) and last heartbeat."""
        items, cursor = await nodes.list_nodes(db_session, page)
        return Page(items, cursor)

    @post("/", operation_id="ops_register_switch_node")
    async def register(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: SwitchNodeCreate
    ) -> SwitchNodeOut:
        """Register a node; it takes calls from its first heartbeat. Its ESL password is stored encrypted."""
        node = await nodes.register_node(db_session, request.user, data, _box(request))
        _forget_addresses(request, db_session)
        return node

    @get("/{node_id:uuid}", operation_id="ops_get_switch_node")
    async def get_node(self, db_session: AsyncSession, node_id: uuid.UUID) -> SwitchNodeOut:
        """One node."""
        return await nodes.get_node(db_session, node_id)

    @get("/{node_id:uuid}/link", operation_id="ops_get_switch_node_link")
    async def link(
        self, request: Request[Any, Any, Any], db_session: AsyncSession, node_id: uuid.UUID
    ) -> SwitchLinkOut:
        """Which backend process holds the node's inbound event socket, and whether it is connected (or why not)."""
        await nodes.get_node(db_session, node_id)
        switchboard: VoiceSwitchboard = request.app.state.voice
        return link_out(node_id, await switchboard.commands.link_status(node_id))

    @patch("/{node_id:uuid}", operation_id="ops_update_switch_node")
    async def update(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        node_id: uuid.UUID,
        data: SwitchNodePatch,
    ) -> SwitchNodeOut:
        """Change how a node is reached (ESL address or password, source addresses, SIP address)."""
        node = await nodes.update_node(db_session, request.user, node_id, data, _box(request))
        _forget_addresses(request, db_session)
        return node

    @post("/{node_id:uuid}/drain", operation_id="ops_drain_switch_node", status_code=HTTP_200_OK)
    async def drain(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, node_id: uuid.UUID
    ) -> SwitchNodeOut:
        """No new calls or originations on the node; the calls on it go on."""
        return await nodes.set_draining(db_session, request.user, node_id, True)

    @post("/{node_id:uuid}/undrain", operation_id="ops_undrain_switch_node", status_code=HTTP_200_OK)
    async def undrain(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, node_id: uuid.UUID
    ) -> SwitchNodeOut:
        """Put a drained node back in service."""
        return await nodes.set_draining(db_session, request.user, node_id, False)


class NumberPoolController(Controller):
    """Provider operations: the pool of numbers (DIDs) and which tenant holds each."""

    path = "/api/v1/ops/numbers"
    tags = ["provider operations"]
    opt = {"access": "provider"}

    @get("/", operation_id="ops_list_numbers")
    async def list_pool(
        self,
        db_session: AsyncSession,
        page: PageRequest,
        tenant_id: uuid.UUID | None = None,
        free: bool | None = None,
        prefix: str | None = Parameter(default=None, max_length=16, pattern=r"^\+?[0-9]*$"),
    ) -> Page[PoolNumberOut]:
        """The pool; filter by tenant, free or assigned, or a prefix such as `+3314`."""
        items, cursor = await numbers.list_pool(db_session, page, tenant_id=tenant_id, free=free, prefix=prefix)
        return Page(items, cursor)

    @post("/", operation_id="ops_add_number")
    async def add(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: NumberCreate
    ) -> PoolNumberOut:
        """Add a number (E.164) to the free pool."""
        return await numbers.add_number(db_session, request.user, data)

    @post("/{number_id:uuid}/assign", operation_id="ops_assign_number", status_code=HTTP_200_OK)
    async def assign(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        number_id: uuid.UUID,
        data: NumberAssign,
    ) -> PoolNumberOut:
        """Give a free number to a tenant."""
        return await numbers.assign_number(db_session, request.user, number_id, data.tenant_id)

    @post("/{number_id:uuid}/release", operation_id="ops_release_number", status_code=HTTP_200_OK)
    async def release(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, number_id: uuid.UUID
    ) -> PoolNumberOut:
        """Take a number back into the free pool; its calls stop reaching the tenant at once."""
        return await numbers.release_number(db_session, request.user, number_id)


class NumberController(Controller):
    """The tenant's numbers and where each sends its calls."""

    path = "/api/v1/voice/numbers"
    tags = ["voice"]
    opt = {"access": "tenant"}

    @get("/", permission="queues:read", operation_id="list_numbers")
    async def list_numbers(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, page: PageRequest
    ) -> Page[NumberOut]:
        """The tenant's numbers (sort `number` or `assigned_at`)."""
        assert request.user.tenant_id is not None
        items, cursor = await numbers.list_numbers(db_session, request.user.tenant_id, page)
        return Page(items, cursor)

    @get("/{number_id:uuid}", permission="queues:read", operation_id="get_number")
    async def get_number(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, number_id: uuid.UUID
    ) -> NumberOut:
        """One number."""
        assert request.user.tenant_id is not None
        return await numbers.get_number(db_session, request.user.tenant_id, number_id)

    @patch("/{number_id:uuid}", permission="queues:write", operation_id="route_number")
    async def route(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        number_id: uuid.UUID,
        data: NumberRouting,
    ) -> NumberOut:
        """Point the number at one of the tenant's queues or published IVR flows (a flow wins); `null` removes it."""
        return await numbers.route_number(db_session, request.user, number_id, data, ivr_service.TenantIvrFlows())


class CdrController(Controller):
    """The tenant's call detail records, one per call leg."""

    path = "/api/v1/voice/cdrs"
    tags = ["voice"]
    opt = {"access": "tenant"}

    @get("/", permission="reports:read", operation_id="list_cdrs")
    async def list_cdrs(
        self,
        db_session: AsyncSession,
        page: PageRequest,
        interaction_id: uuid.UUID | None = None,
        call_uuid: uuid.UUID | None = None,
        disposition: Disposition | None = None,
    ) -> Page[CdrOut]:
        """Call legs, newest first (sort `ended_at` or `-ended_at`); filter by interaction, call or disposition."""
        items, cursor = await cdrs.list_cdrs(
            db_session, page, interaction_id=interaction_id, call_uuid=call_uuid, disposition=disposition
        )
        return Page(items, cursor)

"""What a call under control uses of the rest of the backend, each through its own service."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.channels.voice.call_control.records import CallStore
from backend.channels.voice.media import PromptPlayer, QueueAudio, tts_file_string
from backend.channels.voice.outbound import OutboundGuard
from backend.channels.voice.recordings import VoicemailDesk, media_stored
from backend.channels.voice.service import VoiceSwitchboard
from backend.config import Settings
from backend.customers import service as customers
from backend.customers.access import ALL_UNITS, SENSITIVE, Viewer
from backend.db.engine import tenant_transaction
from backend.lib.bounded import BoundedDict
from backend.lib.problems import NotFound
from backend.routing import ivr_service
from backend.routing import service as routing_service
from backend.routing.engine import RoutingEngine
from backend.routing.ivr import FilePrompt
from backend.routing.ivr_interpreter import Speech
from backend.routing.schemas import QueueOut
from backend.tenants import service as tenants

log = structlog.get_logger("voice.call_control")

SIP_DOMAINS_KEPT = 10_000
"""Tenants whose SIP domain a process keeps at most (then the oldest goes)."""
FLOW_VERSIONS_KEPT = 2_000
"""Decoded IVR flow versions a process keeps at most (then the oldest goes)."""


@dataclass
class CallServices:
    """The backend as one call sees it (shared by every call of a process)."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    routing: RoutingEngine
    voice: VoiceSwitchboard
    player: PromptPlayer
    voicemail: VoicemailDesk
    outbound: OutboundGuard
    store: CallStore
    spawn: Callable[[Coroutine[Any, Any, Any]], object] = field(default=asyncio.ensure_future)
    """Runs work that outlives a call (upload checks) in the process's own task set."""
    _sip_domains: BoundedDict[uuid.UUID, str] = field(
        default_factory=lambda: BoundedDict(SIP_DOMAINS_KEPT), init=False, repr=False
    )
    _flows: BoundedDict[tuple[uuid.UUID, uuid.UUID, int], Any] = field(
        default_factory=lambda: BoundedDict(FLOW_VERSIONS_KEPT), init=False, repr=False
    )

    async def ensure_uploaded(
        self,
        kind: Literal["recording", "voicemail"],
        tenant_id: uuid.UUID,
        item_id: uuid.UUID,
        node_id: uuid.UUID | None,
        url: str,
        path: str,
    ) -> bool:
        """After the call: the node uploads the file itself (`record_post_process_exec_api`); if it has not
        arrived after a while, ask the node again (`http_put` through its holder), a few times."""
        settings = self.settings
        for attempt in range(settings.call_control_upload_attempts + 1):
            await asyncio.sleep(settings.call_control_upload_wait_seconds)
            async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                if await media_stored(session, kind, item_id):
                    return True
            if attempt == settings.call_control_upload_attempts or node_id is None:
                break
            command = f"http_put {{profile={settings.switch_http_cache_profile}}}{url} {path}"
            try:
                reply = await self.voice.commands.bgapi(node_id, command)
                log.info("upload_asked_again", kind=kind, id=str(item_id), answer=reply.text[:40])
            except Exception as exc:
                log.warning("upload_not_asked", kind=kind, id=str(item_id), error=str(exc)[:200])
        log.warning("upload_missing", kind=kind, id=str(item_id), tenant_id=str(tenant_id))
        return False

    async def files(self, tenant_id: uuid.UUID, speech: tuple[Speech, ...] | list[Speech]) -> list[str]:
        """FreeSWITCH file strings for prompts and TTS (a prompt deleted since publishing is skipped, logged)."""
        if not any(isinstance(item.prompt, FilePrompt) for item in speech):
            return await self.player.file_strings(None, tenant_id, list(speech))  # speech only: no database
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            return await self.player.file_strings(session, tenant_id, list(speech))

    def tts(self, text: str, voice: str | None) -> str:
        """Speech as a file string in the call's voice."""
        return tts_file_string(self.settings, text, voice)

    async def queue(self, tenant_id: uuid.UUID, queue_id: uuid.UUID) -> tuple[QueueOut, QueueAudio]:
        """A queue's routing rules and what its callers hear (NotFound when it is not the tenant's)."""
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            queue = await routing_service.get_queue(session, queue_id)
            audio = await self.player.queue_audio(session, tenant_id, queue_id)
        return queue, audio

    async def hours_open(self, tenant_id: uuid.UUID, hours_id: uuid.UUID, at: datetime) -> bool:
        """Whether business hours are open now (hours that vanished count as closed)."""
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            try:
                return (await routing_service.business_hours_status(session, hours_id, at)).open
            except NotFound:
                log.warning("ivr_hours_missing", tenant_id=str(tenant_id), business_hours_id=str(hours_id))
                return False

    async def caller_attributes(self, tenant_id: uuid.UUID, number: str) -> dict[str, str]:
        """The caller's customer record as flat attributes for the flow (`known`, `name`, `tags`, custom fields)."""
        if not number:
            return {}
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            viewer = Viewer(tenant_id, None, "system", None, frozenset({SENSITIVE, ALL_UNITS}), frozenset())
            try:
                pop = await customers.screen_pop(session, viewer, phone=number)
            except Exception:
                log.warning("ivr_customer_lookup_failed", tenant_id=str(tenant_id), exc_info=True)
                return {}
        if not pop.customers:
            return {"known": "false"}
        customer = pop.customers[0]
        attributes: dict[str, str] = {"known": "true", "id": str(customer.id), "name": customer.name}
        attributes["tags"] = ",".join(customer.tags)
        for name, value in customer.custom.items():
            attributes[name] = _flat(value)
        return attributes

    async def sip_domain(self, tenant_id: uuid.UUID) -> str:
        """The tenant's SIP domain (seats are `user/<seat>@<domain>`); it never changes once the tenant exists, so
        each process reads it once per tenant."""
        known = self._sip_domains.get(tenant_id)
        if known is not None:
            return known
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            tenant = await tenants.find_tenant(session, tenant_id)
        if tenant is None:
            raise NotFound("No such tenant")
        return self._sip_domains.keep(tenant_id, tenant.sip_domain)

    async def pinned_flow(self, tenant_id: uuid.UUID, flow_id: uuid.UUID, version: int | None) -> Any:
        """The flow version a call runs: the one the dialplan pinned when it arrived, the one a resumed call is
        pinned to, or else the published one (read every time). A version never changes once published, so each
        process reads and decodes it once."""
        if version is not None and (pinned := self._flows.get((tenant_id, flow_id, version))) is not None:
            return pinned
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            if version is None:
                version = await ivr_service.published_version(session, flow_id)
            key = (tenant_id, flow_id, version)
            pinned = self._flows.get(key)
            if pinned is None:
                pinned = self._flows.keep(key, await ivr_service.pinned_version(session, flow_id, version))
        return pinned


def _flat(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)

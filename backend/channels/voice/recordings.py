"""Call recordings and voicemail: begun by call control, uploaded by the switch, played back with permission.

FreeSWITCH writes the audio on its own node. Call control (phase 2) begins a
recording here, which gives it an id and an upload URL, has the switch record
to a local file, and once the file is closed the switch PUTs it to
`/api/v1/switch/recordings/<tenant>/<id>/audio.wav` (mod_http_cache's
`http_put`, authenticated by its http_cache profile header; see
docs/decisions.md). The upload is idempotent by recording id: the same bytes
again are a no-op, different bytes for a stored recording are refused.

Voicemail follows the same path and then becomes an interaction (outcome
`voicemail`, through routing's engine), and a ticket when its queue says so
(`VoicemailTickets`, wired by the customer-store work; a no-op until then).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

import msgspec
import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.principal import Principal
from backend.channels.voice.audio import sniff_file
from backend.channels.voice.models import QueueVoiceSettings, Recording, Voicemail
from backend.channels.voice.schemas import PausedInterval, RecordingOut, VoicemailOut
from backend.config import Settings
from backend.customers import tickets as tickets_service
from backend.db.base import utcnow
from backend.db.engine import tenant_transaction
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import Conflict, Forbidden, InvalidInput, NotFound
from backend.lib.storage import ObjectStorage, Spooled, spool
from backend.routing import service as routing
from backend.routing.engine import RoutingEngine
from backend.routing.schemas import InteractionOut
from backend.tenants import audit
from backend.tenants import service as tenants

log = structlog.get_logger("voice.recordings")

UPLOAD_NAMES = {"audio.wav": "wav", "audio.mp3": "mp3"}
"""The last segment of an upload URL: the switch picks the file format from it."""


@dataclass(frozen=True, slots=True)
class StoredAudio:
    """Where a stored recording or message is, for playback."""

    storage_key: str
    size_bytes: int
    content_type: str
    sha256: str


@dataclass(frozen=True, slots=True)
class UploadTarget:
    """What call control tells the switch: where to upload the closed file."""

    id: uuid.UUID
    upload_url: str
    """`http_put {profile=contactcenter}<upload_url> <local file>`, or `record_session http_cache://<upload_url>`."""


def upload_url(settings: Settings, kind: str, tenant_id: uuid.UUID, item_id: uuid.UUID, audio_format: str) -> str:
    """The URL the switch uploads a closed recording or message to."""
    base = settings.switch_media_base_url.rstrip("/")
    return f"{base}/api/v1/switch/{kind}/{tenant_id}/{item_id}/audio.{audio_format}"


def _content_type(audio_format: str) -> str:
    return "audio/wav" if audio_format == "wav" else "audio/mpeg"


@dataclass(frozen=True, slots=True)
class Received:
    """An uploaded file, checked: spooled locally, recognised, hashed."""

    spooled: Spooled
    audio_format: str
    duration_ms: int


async def _receive(body: AsyncIterator[bytes], limit: int, settings: Settings, file_name: str) -> Received:
    wanted = UPLOAD_NAMES.get(file_name)
    if wanted is None:
        raise NotFound("Uploads go to audio.wav or audio.mp3")
    spooled = await spool(body, limit, settings.media_spool_dir)
    try:
        info = await asyncio.to_thread(sniff_file, spooled.path, spooled.size)
        if info.format != wanted:
            raise InvalidInput.field("body", f"is {info.format} audio, uploaded as {file_name}")
    except BaseException:
        spooled.discard()
        raise
    return Received(spooled, info.format, info.duration_ms)


# --- recordings -------------------------------------------------------------------------------


def recording_out(row: Recording) -> RecordingOut:
    """The API's view of a recording."""
    return RecordingOut(
        id=row.id,
        interaction_id=row.interaction_id,
        call_uuid=row.call_uuid,
        leg_uuid=row.leg_uuid,
        queue_id=row.queue_id,
        agent_id=row.agent_id,
        policy=row.policy,
        status=row.status,
        format=row.format,
        size_bytes=row.size_bytes,
        duration_ms=row.duration_ms,
        paused_intervals=msgspec.convert(row.paused_intervals, list[PausedInterval]),
        started_at=row.started_at,
        ended_at=row.ended_at,
        stored_at=row.stored_at,
    )


async def recording_policy(session: AsyncSession, queue_id: uuid.UUID | None) -> str:
    """The queue's recording policy: always, never or on_demand (never for calls without a queue)."""
    if queue_id is None:
        return "never"
    row = await session.scalar(select(QueueVoiceSettings).where(QueueVoiceSettings.queue_id == queue_id))
    return row.recording_policy if row else "never"


async def begin_recording(
    session: AsyncSession,
    settings: Settings,
    tenant_id: uuid.UUID,
    *,
    queue_id: uuid.UUID | None,
    interaction_id: uuid.UUID | None = None,
    call_uuid: uuid.UUID | None = None,
    leg_uuid: uuid.UUID | None = None,
    agent_id: uuid.UUID | None = None,
    on_demand: bool = False,
    audio_format: Literal["wav", "mp3"] = "wav",
) -> UploadTarget:
    """Call control starts recording a call: allowed by the queue's policy (`on_demand` when an agent asks)."""
    policy = await recording_policy(session, queue_id)
    if policy == "never" or (policy == "always" and on_demand) or (policy == "on_demand" and not on_demand):
        raise Conflict(f"The queue's recording policy is {policy}", kind="recording-not-allowed")
    row = Recording(
        tenant_id=tenant_id,
        interaction_id=interaction_id,
        call_uuid=call_uuid,
        leg_uuid=leg_uuid,
        queue_id=queue_id,
        agent_id=agent_id,
        policy=policy,
        status="recording",
        format=audio_format,
        paused_intervals=[],
        started_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    log.info("recording_begun", tenant_id=str(tenant_id), recording_id=str(row.id), policy=policy)
    return UploadTarget(row.id, upload_url(settings, "recordings", tenant_id, row.id, audio_format))


async def _recording(session: AsyncSession, recording_id: uuid.UUID, *, lock: bool = False) -> Recording:
    statement = select(Recording).where(Recording.id == recording_id)
    row = await session.scalar(statement.with_for_update() if lock else statement)
    if row is None:
        raise NotFound("No such recording")
    return row


async def pause_recording(session: AsyncSession, recording_id: uuid.UUID, at: datetime | None = None) -> RecordingOut:
    """The agent paused the recording (a card number is being read out): the interval is kept."""
    row = await _recording(session, recording_id, lock=True)
    intervals = list(row.paused_intervals)
    if not intervals or intervals[-1].get("resumed_at") is not None:
        intervals.append({"paused_at": (at or utcnow()).isoformat(), "resumed_at": None})
        row.paused_intervals = intervals
    return recording_out(row)


async def resume_recording(session: AsyncSession, recording_id: uuid.UUID, at: datetime | None = None) -> RecordingOut:
    """The recording goes on after a pause."""
    row = await _recording(session, recording_id, lock=True)
    intervals = [dict(i) for i in row.paused_intervals]
    if intervals and intervals[-1].get("resumed_at") is None:
        intervals[-1]["resumed_at"] = (at or utcnow()).isoformat()
        row.paused_intervals = intervals
    return recording_out(row)


async def end_recording(session: AsyncSession, recording_id: uuid.UUID, at: datetime | None = None) -> RecordingOut:
    """The recording stopped (hang-up or the agent stopped it); the upload follows."""
    row = await _recording(session, recording_id, lock=True)
    moment = at or utcnow()
    row.ended_at = row.ended_at or moment
    intervals = [dict(i) for i in row.paused_intervals]
    if intervals and intervals[-1].get("resumed_at") is None:
        intervals[-1]["resumed_at"] = moment.isoformat()
        row.paused_intervals = intervals
    return recording_out(row)


async def receive_recording(
    session: AsyncSession,
    storage: ObjectStorage,
    settings: Settings,
    tenant_id: uuid.UUID,
    recording_id: uuid.UUID,
    file_name: str,
    body: AsyncIterator[bytes],
) -> RecordingOut:
    """The switch uploads a closed recording: stored once, whatever number of times it is sent."""
    await _recording(session, recording_id)  # 404 before reading a byte of an unknown recording
    received = await _receive(body, settings.recording_max_bytes, settings, file_name)
    try:
        row = await _recording(session, recording_id, lock=True)
        if row.status == "stored":
            if row.sha256 == received.spooled.sha256:
                return recording_out(row)
            raise Conflict("This recording is stored already, with other content", kind="recording-stored")
        key = f"tenants/{tenant_id}/recordings/{row.started_at:%Y/%m}/{row.id}.{received.audio_format}"
        await storage.put(key, received.spooled.path, _content_type(received.audio_format))
    finally:
        received.spooled.discard()
    row.storage_key = key
    row.format = received.audio_format
    row.size_bytes = received.spooled.size
    row.sha256 = received.spooled.sha256
    row.duration_ms = received.duration_ms
    row.status = "stored"
    row.stored_at = utcnow()
    row.ended_at = row.ended_at or row.stored_at
    await session.flush()
    log.info("recording_stored", tenant_id=str(tenant_id), recording_id=str(row.id), size=row.size_bytes)
    return recording_out(row)


async def list_recordings(
    session: AsyncSession,
    page: PageRequest,
    *,
    interaction_id: uuid.UUID | None = None,
    queue_id: uuid.UUID | None = None,
    agent_id: uuid.UUID | None = None,
) -> tuple[list[RecordingOut], str | None]:
    """Recordings, newest first; filter by interaction, queue or agent."""
    statement = select(Recording)
    if interaction_id is not None:
        statement = statement.where(Recording.interaction_id == interaction_id)
    if queue_id is not None:
        statement = statement.where(Recording.queue_id == queue_id)
    if agent_id is not None:
        statement = statement.where(Recording.agent_id == agent_id)
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"started_at": Recording.started_at},
        default_sort="-started_at",
        id_column=Recording.id,
    )
    return [recording_out(r) for r in rows], cursor


async def get_recording(session: AsyncSession, recording_id: uuid.UUID) -> RecordingOut:
    """One recording."""
    return recording_out(await _recording(session, recording_id))


async def recording_audio(
    session: AsyncSession, principal: Principal, recording_id: uuid.UUID, *, new_listen: bool
) -> StoredAudio:
    """A stored recording to play back; a new listen (not a seek) is written to the audit log."""
    row = await _recording(session, recording_id)
    if row.status != "stored" or row.storage_key is None or row.size_bytes is None or row.sha256 is None:
        raise Conflict(f"The recording is not available ({row.status})", kind="recording-not-stored")
    if new_listen:
        await _audit_listen(session, principal, "recording.play", "recording", row.id, row.interaction_id)
    return StoredAudio(row.storage_key, row.size_bytes, _content_type(row.format), row.sha256)


async def _audit_listen(
    session: AsyncSession,
    principal: Principal,
    action: str,
    target_type: str,
    target_id: uuid.UUID,
    interaction_id: uuid.UUID | None,
) -> None:
    assert principal.tenant_id is not None
    await audit.record_by(
        session,
        principal,
        action=action,
        target_type=target_type,
        target_id=target_id,
        after={"interaction_id": str(interaction_id) if interaction_id else None},
    )


# --- voicemail --------------------------------------------------------------------------------


def voicemail_out(row: Voicemail) -> VoicemailOut:
    """The API's view of a voicemail message."""
    return VoicemailOut(
        id=row.id,
        box=row.box,
        queue_id=row.queue_id,
        agent_id=row.agent_id,
        interaction_id=row.interaction_id,
        caller_number=row.caller_number,
        status=row.status,
        format=row.format,
        size_bytes=row.size_bytes,
        duration_ms=row.duration_ms,
        ticket_id=row.ticket_id,
        created_at=row.created_at,
        stored_at=row.stored_at,
    )


@dataclass(frozen=True, slots=True)
class VoicemailTicketRequest:
    """What the ticket desk needs to open a ticket for a voicemail."""

    tenant_id: uuid.UUID
    voicemail: VoicemailOut
    interaction: InteractionOut


class VoicemailTickets(Protocol):
    """Turns a voicemail into a ticket when its queue says so (the customer store's tickets implement it)."""

    async def open_ticket(self, request: VoicemailTicketRequest) -> str | None:
        """Open a ticket; returns its id (kept on the voicemail), or None if none was opened."""
        ...


class CustomerStoreTickets:
    """Voicemail tickets in the customer store's ticket desk."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker

    async def open_ticket(self, request: VoicemailTicketRequest) -> str | None:
        """Open the ticket in the tenant's desk; its id is kept on the voicemail."""
        async with tenant_transaction(self.sessionmaker, request.tenant_id) as session:
            ticket = await tickets_service.open_voicemail_ticket(
                session,
                request.tenant_id,
                interaction_id=request.interaction.id,
                caller_number=request.voicemail.caller_number,
                duration_ms=request.voicemail.duration_ms,
                voicemail_id=request.voicemail.id,
            )
        return str(ticket.id)


class NoVoicemailTickets:
    """Until tickets exist: no ticket is opened (the queue setting is kept and honoured once wired)."""

    async def open_ticket(self, request: VoicemailTicketRequest) -> str | None:
        """Nothing."""
        return None


class VoicemailDesk:
    """Voicemail boxes: messages begun by call control, uploaded by the switch, turned into interactions."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        storage: ObjectStorage,
        settings: Settings,
        routing_engine: RoutingEngine,
        tickets: VoicemailTickets | None = None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.storage = storage
        self.settings = settings
        self.routing = routing_engine
        self.tickets: VoicemailTickets = tickets or NoVoicemailTickets()

    async def begin(
        self,
        tenant_id: uuid.UUID,
        *,
        queue_id: uuid.UUID | None = None,
        agent_id: uuid.UUID | None = None,
        caller_number: str = "",
        call_uuid: uuid.UUID | None = None,
        interaction_id: uuid.UUID | None = None,
        audio_format: Literal["wav", "mp3"] = "wav",
    ) -> UploadTarget:
        """Call control is about to record a message into a queue's or an agent's box."""
        if (queue_id is None) == (agent_id is None):
            raise InvalidInput.field("queue_id", "exactly one of queue_id and agent_id names the box")
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            if queue_id is not None:
                await routing.get_queue(session, queue_id)
            if agent_id is not None:
                await tenants.get_user(session, agent_id)
            row = Voicemail(
                tenant_id=tenant_id,
                box="queue" if queue_id is not None else "agent",
                queue_id=queue_id,
                agent_id=agent_id,
                interaction_id=interaction_id,
                call_uuid=call_uuid,
                caller_number=caller_number[:64],
                status="recording",
                format=audio_format,
            )
            session.add(row)
            await session.flush()
            voicemail_id = row.id
        return UploadTarget(
            voicemail_id, upload_url(self.settings, "voicemails", tenant_id, voicemail_id, audio_format)
        )

    async def receive(
        self, tenant_id: uuid.UUID, voicemail_id: uuid.UUID, file_name: str, body: AsyncIterator[bytes]
    ) -> VoicemailOut:
        """The switch uploads the message: stored (idempotently), then an interaction, then maybe a ticket."""
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            await self._row(session, voicemail_id)
        received = await _receive(body, self.settings.voicemail_max_bytes, self.settings, file_name)
        try:
            async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                row = await self._row(session, voicemail_id, lock=True)
                if row.status == "stored" and row.sha256 != received.spooled.sha256:
                    raise Conflict("This voicemail is stored already, with other content", kind="voicemail-stored")
                if row.status != "stored":
                    key = f"tenants/{tenant_id}/voicemail/{row.created_at:%Y/%m}/{row.id}.{received.audio_format}"
                    await self.storage.put(key, received.spooled.path, _content_type(received.audio_format))
                    row.storage_key = key
                    row.format = received.audio_format
                    row.size_bytes = received.spooled.size
                    row.sha256 = received.spooled.sha256
                    row.duration_ms = received.duration_ms
                    row.status = "stored"
                    row.stored_at = utcnow()
                stored = voicemail_out(row)
                needs_interaction = row.announced_at is None
        finally:
            received.spooled.discard()
        if not needs_interaction:
            return stored
        return await self._announce(tenant_id, stored)

    async def _announce(self, tenant_id: uuid.UUID, stored: VoicemailOut) -> VoicemailOut:
        """Make the stored message an interaction (once), then a ticket if its queue says so."""
        interaction = await self.routing.record_voicemail(
            tenant_id,
            voicemail_id=stored.id,
            queue_id=stored.queue_id,
            agent_id=stored.agent_id,
            caller_number=stored.caller_number,
            duration_ms=stored.duration_ms,
            interaction_id=stored.interaction_id,
        )
        ticket: str | None = None
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            wants_ticket = False
            if stored.queue_id is not None:
                wants_ticket = bool(
                    await session.scalar(
                        select(QueueVoiceSettings.voicemail_creates_ticket).where(
                            QueueVoiceSettings.queue_id == stored.queue_id
                        )
                    )
                )
        if wants_ticket:
            try:
                ticket = await self.tickets.open_ticket(VoicemailTicketRequest(tenant_id, stored, interaction))
            except Exception:
                log.exception("voicemail_ticket_failed", tenant_id=str(tenant_id), voicemail_id=str(stored.id))
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            row = await self._row(session, stored.id, lock=True)
            row.interaction_id = interaction.id
            row.announced_at = utcnow()
            if ticket is not None:
                row.ticket_id = ticket[:80]
            out = voicemail_out(row)
        log.info(
            "voicemail_stored",
            tenant_id=str(tenant_id),
            voicemail_id=str(stored.id),
            interaction_id=str(interaction.id),
            ticket=ticket,
        )
        return out

    @staticmethod
    async def _row(session: AsyncSession, voicemail_id: uuid.UUID, *, lock: bool = False) -> Voicemail:
        statement = select(Voicemail).where(Voicemail.id == voicemail_id)
        row = await session.scalar(statement.with_for_update() if lock else statement)
        if row is None:
            raise NotFound("No such voicemail")
        return row


def _may_hear_every_box(principal: Principal) -> bool:
    return principal.can("voicemail:read")


async def list_voicemails(
    session: AsyncSession,
    principal: Principal,
    page: PageRequest,
    *,
    queue_id: uuid.UUID | None = None,
    agent_id: uuid.UUID | None = None,
) -> tuple[list[VoicemailOut], str | None]:
    """Stored messages, newest first; agents without `voicemail:read` see their own box only."""
    statement = select(Voicemail).where(Voicemail.status == "stored")
    if not _may_hear_every_box(principal):
        statement = statement.where(Voicemail.box == "agent", Voicemail.agent_id == principal.user_id)
    if queue_id is not None:
        statement = statement.where(Voicemail.queue_id == queue_id)
    if agent_id is not None:
        statement = statement.where(Voicemail.agent_id == agent_id)
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"created_at": Voicemail.created_at},
        default_sort="-created_at",
        id_column=Voicemail.id,
    )
    return [voicemail_out(r) for r in rows], cursor


async def _visible_voicemail(session: AsyncSession, principal: Principal, voicemail_id: uuid.UUID) -> Voicemail:
    row = await VoicemailDesk._row(session, voicemail_id)
    if not _may_hear_every_box(principal) and not (row.box == "agent" and row.agent_id == principal.user_id):
        raise Forbidden("This message is in another box", extra={"permission": "voicemail:read"})
    return row


async def get_voicemail(session: AsyncSession, principal: Principal, voicemail_id: uuid.UUID) -> VoicemailOut:
    """One message (the caller's own box, or any with `voicemail:read`)."""
    return voicemail_out(await _visible_voicemail(session, principal, voicemail_id))


async def voicemail_audio(
    session: AsyncSession, principal: Principal, voicemail_id: uuid.UUID, *, new_listen: bool
) -> StoredAudio:
    """A stored message to play back; a new listen is audited."""
    row = await _visible_voicemail(session, principal, voicemail_id)
    if row.status != "stored" or row.storage_key is None or row.size_bytes is None or row.sha256 is None:
        raise Conflict(f"The message is not available ({row.status})", kind="voicemail-not-stored")
    if new_listen:
        await _audit_listen(session, principal, "voicemail.play", "voicemail", row.id, row.interaction_id)
    return StoredAudio(row.storage_key, row.size_bytes, _content_type(row.format), row.sha256)


async def media_stored(session: AsyncSession, kind: Literal["recording", "voicemail"], item_id: uuid.UUID) -> bool:
    """Whether a recording's or message's upload has arrived (call control checks after the call)."""
    model: type[Recording] | type[Voicemail] = Recording if kind == "recording" else Voicemail
    status = await session.scalar(select(model.status).where(model.id == item_id))
    return status == "stored"


def plain(value: Any) -> Any:
    """msgspec structs as JSON-able builtins."""
    return msgspec.to_builtins(value)


async def sweep_missing_uploads(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings, now: datetime | None = None
) -> int:
    """Mark recordings and messages whose upload never came as failed (each logged); returns how many.

    A recording is late `CC_MEDIA_UPLOAD_DEADLINE` seconds after it ended; a message, that long after
    the longest message could have ended. One tenant at a time, in its own context.
    """
    moment = now or utcnow()
    deadline = timedelta(seconds=settings.media_upload_deadline_seconds)
    longest = timedelta(seconds=settings.voicemail_max_seconds)
    async with sessionmaker() as session:
        tenant_ids = await tenants.active_tenant_ids(session)
    failed = 0
    for tenant_id in tenant_ids:
        async with tenant_transaction(sessionmaker, tenant_id) as session:
            late_recordings = (
                await session.scalars(
                    select(Recording)
                    .where(Recording.status == "recording", Recording.ended_at < moment - deadline)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            late_messages = (
                await session.scalars(
                    select(Voicemail)
                    .where(Voicemail.status == "recording", Voicemail.created_at < moment - deadline - longest)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            late: list[Recording | Voicemail] = [*late_recordings, *late_messages]
            for row in late:
                row.status = "failed"
                log.warning(
                    "upload_never_came",
                    tenant_id=str(tenant_id),
                    kind="recording" if isinstance(row, Recording) else "voicemail",
                    id=str(row.id),
                    call_uuid=str(row.call_uuid) if row.call_uuid else None,
                )
            failed += len(late_recordings) + len(late_messages)
    return failed

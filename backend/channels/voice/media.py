"""Prompts and music on hold: uploads checked and stored per tenant, served to the switch, played by call control.

Tenants upload WAV or MP3 (streamed to a temporary file, refused past
`CC_PROMPT_MAX_BYTES`, recognised from its header). The object is stored
under `tenants/<tenant>/prompts/<prompt>/<sha256>.<ext>`, so its URL names its
content: FreeSWITCH's mod_http_cache caches by URL for `max-age` and never
revalidates, and a new file is a new URL.

Call control turns what the interpreter asks to play into FreeSWITCH file
strings with `PromptPlayer`: `http_cache://http://api/.../<sha>.wav` for a
file, `tts://<engine>|<voice>|<text>` for speech (mod_dptools' tts format,
usable by `playback` and `play_and_get_digits` alike).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import structlog
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.principal import Principal
from backend.channels.voice.audio import AudioInfo, sniff_file
from backend.channels.voice.models import Prompt, QueueVoiceSettings
from backend.channels.voice.schemas import PromptOut, QueueVoiceSettingsIn, QueueVoiceSettingsOut
from backend.channels.voice.xml_documents import switch_text
from backend.config import Settings
from backend.db.base import utcnow
from backend.db.session import after_commit
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import Conflict, InvalidInput, NotFound
from backend.lib.storage import ObjectStorage, spool
from backend.lib.validation import clean_text
from backend.routing import ivr_service
from backend.routing import service as routing
from backend.routing.ivr import FilePrompt, TtsPrompt
from backend.routing.ivr_interpreter import Speech
from backend.tenants import audit

log = structlog.get_logger("voice.media")


def prompt_out(prompt: Prompt) -> PromptOut:
    """The API's view of a prompt."""
    return PromptOut(
        id=prompt.id,
        name=prompt.name,
        kind=prompt.kind,
        format=prompt.format,
        size_bytes=prompt.size_bytes,
        duration_ms=prompt.duration_ms,
        sample_rate=prompt.sample_rate,
        channels=prompt.channels,
        sha256=prompt.sha256,
        created_at=prompt.created_at,
        updated_at=prompt.updated_at,
    )


def prompt_key(tenant_id: uuid.UUID, prompt_id: uuid.UUID, sha256: str, audio_format: str) -> str:
    """Where a prompt's audio is stored (the content hash in the key: a new file is a new object)."""
    return f"tenants/{tenant_id}/prompts/{prompt_id}/{sha256}.{audio_format}"


async def _prompt(session: AsyncSession, prompt_id: uuid.UUID, *, lock: bool = False) -> Prompt:
    statement = select(Prompt).where(Prompt.id == prompt_id)
    prompt = await session.scalar(statement.with_for_update() if lock else statement)
    if prompt is None:
        raise NotFound("No such prompt")
    return prompt


async def upload_prompt(
    session: AsyncSession,
    storage: ObjectStorage,
    settings: Settings,
    principal: Principal,
    *,
    name: str,
    kind: Literal["prompt", "music"],
    body: AsyncIterator[bytes],
) -> PromptOut:
    """Store an uploaded prompt: streamed, size-limited, recognised as WAV or MP3 from its header."""
    assert principal.tenant_id is not None
    name = clean_text("name", name, max_length=120)
    if await session.scalar(select(Prompt.id).where(Prompt.name == name)) is not None:
        raise Conflict("A prompt with that name exists", errors=[{"field": "name", "message": "already used"}])
    spooled = await spool(body, settings.prompt_max_bytes, settings.media_spool_dir)
    try:
        info: AudioInfo = await asyncio.to_thread(sniff_file, spooled.path, spooled.size)
        prompt_id = uuid.uuid4()
        key = prompt_key(principal.tenant_id, prompt_id, spooled.sha256, info.format)
        await storage.put(key, spooled.path, info.content_type)
    finally:
        spooled.discard()
    now = utcnow()
    prompt = Prompt(
        tenant_id=principal.tenant_id,
        id=prompt_id,
        name=name,
        kind=kind,
        format=info.format,
        storage_key=key,
        size_bytes=spooled.size,
        sha256=spooled.sha256,
        duration_ms=info.duration_ms,
        sample_rate=info.sample_rate,
        channels=info.channels,
        created_by=principal.user_id,
        created_at=now,
        updated_at=now,
    )
    session.add(prompt)
    try:
        await session.flush()
    except Exception:
        await storage.delete(key)  # the row is not there: neither is its object
        raise
    await audit.record_by(
        session,
        principal,
        action="prompt.upload",
        target_type="prompt",
        target_id=prompt.id,
        after={"name": name, "kind": kind, "format": info.format, "size_bytes": spooled.size, "sha256": spooled.sha256},
    )
    log.info("prompt_uploaded", tenant_id=str(principal.tenant_id), prompt_id=str(prompt.id), size=spooled.size)
    return prompt_out(prompt)


async def list_prompts(
    session: AsyncSession, page: PageRequest, *, kind: str | None = None
) -> tuple[list[PromptOut], str | None]:
    """The tenant's prompts by name, optionally one kind."""
    statement = select(Prompt)
    if kind is not None:
        statement = statement.where(Prompt.kind == kind)
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"name": Prompt.name, "created_at": Prompt.created_at},
        default_sort="name",
        id_column=Prompt.id,
    )
    return [prompt_out(p) for p in rows], cursor


async def get_prompt(session: AsyncSession, prompt_id: uuid.UUID) -> PromptOut:
    """One prompt."""
    return prompt_out(await _prompt(session, prompt_id))


async def rename_prompt(session: AsyncSession, principal: Principal, prompt_id: uuid.UUID, name: str) -> PromptOut:
    """Rename a prompt (its audio never changes: upload a new one)."""
    prompt = await _prompt(session, prompt_id, lock=True)
    name = clean_text("name", name, max_length=120)
    if name != prompt.name and await session.scalar(select(Prompt.id).where(Prompt.name == name)) is not None:
        raise Conflict("A prompt with that name exists", errors=[{"field": "name", "message": "already used"}])
    before = {"name": prompt.name}
    prompt.name = name
    prompt.updated_at = utcnow()
    await audit.record_by(
        session,
        principal,
        action="prompt.rename",
        target_type="prompt",
        target_id=prompt.id,
        before=before,
        after={"name": name},
    )
    return prompt_out(prompt)


async def delete_prompt(
    session: AsyncSession, storage: ObjectStorage, principal: Principal, prompt_id: uuid.UUID
) -> None:
    """Delete a prompt no flow or queue uses; its audio goes once the deletion is committed."""
    prompt = await _prompt(session, prompt_id, lock=True)
    flows = await ivr_service.flows_using(session, prompt_id=prompt_id)
    if flows:
        raise Conflict(f"IVR flows play this prompt ({', '.join(flows[:5])}); change them first")
    used = await session.scalar(
        select(QueueVoiceSettings.queue_id)
        .where(
            or_(
                QueueVoiceSettings.music_on_hold_id == prompt_id,
                QueueVoiceSettings.announcement_id == prompt_id,
                QueueVoiceSettings.voicemail_greeting_id == prompt_id,
            )
        )
        .limit(1)
    )
    if used is not None:
        raise Conflict("A queue plays this prompt; change its voice settings first")
    await session.delete(prompt)
    await session.flush()
    await audit.record_by(
        session,
        principal,
        action="prompt.delete",
        target_type="prompt",
        target_id=prompt_id,
        before={"name": prompt.name, "sha256": prompt.sha256},
    )
    key = prompt.storage_key
    after_commit(session, lambda: storage.delete(key))


class PromptLibrary:
    """The IVR service's `PromptCatalogue`: which prompt ids exist in the session's tenant."""

    async def existing(self, session: AsyncSession, prompt_ids: set[uuid.UUID]) -> set[uuid.UUID]:
        """The ids among these that are prompts of the tenant (row-level security scopes the query)."""
        if not prompt_ids:
            return set()
        return set((await session.scalars(select(Prompt.id).where(Prompt.id.in_(prompt_ids)))).all())


# --- what the switch fetches ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PromptFile:
    """A prompt's stored audio, as the switch route serves it."""

    storage_key: str
    content_type: str
    size_bytes: int
    sha256: str


async def prompt_for_switch(session: AsyncSession, prompt_id: uuid.UUID, file_name: str) -> PromptFile:
    """The prompt a switch URL names (`<sha256>.<ext>`); a stale hash is "not found", never another file."""
    prompt = await session.scalar(select(Prompt).where(Prompt.id == prompt_id))
    if prompt is None or file_name != f"{prompt.sha256}.{prompt.format}":
        raise NotFound("No such prompt file")
    content_type = "audio/wav" if prompt.format == "wav" else "audio/mpeg"
    return PromptFile(prompt.storage_key, content_type, prompt.size_bytes, prompt.sha256)


# --- queues' voice settings -------------------------------------------------------------------


def _settings_out(queue_id: uuid.UUID, row: QueueVoiceSettings | None) -> QueueVoiceSettingsOut:
    if row is None:
        return QueueVoiceSettingsOut(queue_id, None, None, "never", False, None, 120, False)
    return QueueVoiceSettingsOut(
        queue_id=queue_id,
        music_on_hold_id=row.music_on_hold_id,
        announcement_id=row.announcement_id,
        recording_policy=row.recording_policy,
        voicemail_enabled=row.voicemail_enabled,
        voicemail_greeting_id=row.voicemail_greeting_id,
        voicemail_max_seconds=row.voicemail_max_seconds,
        voicemail_creates_ticket=row.voicemail_creates_ticket,
    )


async def queue_voice_settings(session: AsyncSession, queue_id: uuid.UUID) -> QueueVoiceSettingsOut:
    """A queue's voice settings (defaults: the switch's music, no recording, no voicemail)."""
    await routing.get_queue(session, queue_id)  # 404 for another tenant's queue
    row = await session.scalar(select(QueueVoiceSettings).where(QueueVoiceSettings.queue_id == queue_id))
    return _settings_out(queue_id, row)


async def put_queue_voice_settings(
    session: AsyncSession, settings: Settings, principal: Principal, queue_id: uuid.UUID, data: QueueVoiceSettingsIn
) -> QueueVoiceSettingsOut:
    """Set what a queue's callers hear and keep; prompts must be the tenant's (music on hold a `music` one)."""
    assert principal.tenant_id is not None
    await routing.get_queue(session, queue_id)
    errors: list[dict[str, str]] = []
    for field, prompt_id in (
        ("music_on_hold_id", data.music_on_hold_id),
        ("announcement_id", data.announcement_id),
        ("voicemail_greeting_id", data.voicemail_greeting_id),
    ):
        if prompt_id is None:
            continue
        prompt = await session.scalar(select(Prompt).where(Prompt.id == prompt_id))
        if prompt is None:
            errors.append({"field": field, "message": "is not a prompt of this tenant"})
        elif field == "music_on_hold_id" and prompt.kind != "music":
            errors.append({"field": field, "message": "is a prompt, not music: upload it with kind=music"})
    if data.voicemail_max_seconds > settings.voicemail_max_seconds:
        errors.append({"field": "voicemail_max_seconds", "message": f"at most {settings.voicemail_max_seconds}"})
    if errors:
        raise InvalidInput("The queue's voice settings are not valid", errors=errors)
    row = await session.scalar(
        select(QueueVoiceSettings).where(QueueVoiceSettings.queue_id == queue_id).with_for_update()
    )
    before = None if row is None else _plain(_settings_out(queue_id, row))
    if row is None:
        row = QueueVoiceSettings(tenant_id=principal.tenant_id, queue_id=queue_id)
        session.add(row)
    row.music_on_hold_id = data.music_on_hold_id
    row.announcement_id = data.announcement_id
    row.recording_policy = data.recording_policy
    row.voicemail_enabled = data.voicemail_enabled
    row.voicemail_greeting_id = data.voicemail_greeting_id
    row.voicemail_max_seconds = data.voicemail_max_seconds
    row.voicemail_creates_ticket = data.voicemail_creates_ticket
    row.updated_at = utcnow()
    await session.flush()
    out = _settings_out(queue_id, row)
    await audit.record_by(
        session,
        principal,
        action="queue.voice_settings",
        target_type="queue",
        target_id=queue_id,
        before=before,
        after=_plain(out),
    )
    return out


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


# --- what call control plays ------------------------------------------------------------------


def tts_file_string(settings: Settings, text: str, voice: str | None) -> str:
    """`tts://<engine>|<voice>|<text>`: speech as a file string (`|`, `$`, braces and quotes removed)."""
    spoken = switch_text(text, 1000)
    return f"tts://{settings.tts_engine}|{switch_text(voice or settings.tts_default_voice, 40)}|{spoken}"


def speak_arguments(settings: Settings, text: str, voice: str | None) -> str:
    """The `speak` application's argument (`<engine>|<voice>|<text>`), for playing speech on its own."""
    return tts_file_string(settings, text, voice).removeprefix("tts://")


def quoted_argument(file_string: str) -> str:
    """A file string as one argument of a space-separated application (`play_and_get_digits`).

    FreeSWITCH's `switch_separate_string` keeps spaces inside single quotes; file strings made here
    contain no quote or backslash (`switch_text` removes them), so quoting is enough.
    """
    if "'" in file_string or "\\" in file_string:
        raise ValueError("a file string to quote must not contain quotes or backslashes")
    return f"'{file_string}'"


def prompt_url(settings: Settings, tenant_id: uuid.UUID, prompt_id: uuid.UUID, sha256: str, audio_format: str) -> str:
    """The http_cache URL of a stored prompt (the switch authenticates through its http_cache profile)."""
    base = settings.switch_media_base_url.rstrip("/")
    return f"http_cache://{base}/api/v1/switch/prompts/{tenant_id}/{prompt_id}/{sha256}.{audio_format}"


class PromptPlayer:
    """Turns what the interpreter asks to play into FreeSWITCH file strings, for one tenant."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def file_strings(
        self, session: AsyncSession | None, tenant_id: uuid.UUID, speech: Sequence[Speech]
    ) -> list[str]:
        """One file string per prompt, in order; a prompt deleted since the flow was published is skipped.

        Speech alone needs no database (`session` may then be None)."""
        wanted = {s.prompt.prompt_id for s in speech if isinstance(s.prompt, FilePrompt)}
        found: dict[uuid.UUID, Prompt] = {}
        if wanted:
            if session is None:
                raise ValueError("uploaded prompts are read from the database: a session is needed")
            rows = (await session.scalars(select(Prompt).where(Prompt.id.in_(wanted)))).all()
            found = {p.id: p for p in rows}
        played: list[str] = []
        for item in speech:
            if isinstance(item.prompt, TtsPrompt):
                played.append(tts_file_string(self.settings, item.prompt.text, item.voice))
                continue
            prompt = found.get(item.prompt.prompt_id)
            if prompt is None:
                log.warning("prompt_missing", tenant_id=str(tenant_id), prompt_id=str(item.prompt.prompt_id))
                continue
            played.append(prompt_url(self.settings, tenant_id, prompt.id, prompt.sha256, prompt.format))
        return played

    async def queue_audio(self, session: AsyncSession, tenant_id: uuid.UUID, queue_id: uuid.UUID) -> QueueAudio:
        """What a queue plays while callers wait: music on hold and the periodic announcement (URLs or None)."""
        row = await session.scalar(select(QueueVoiceSettings).where(QueueVoiceSettings.queue_id == queue_id))
        urls: dict[str, str | None] = {"music": None, "announcement": None, "greeting": None}
        if row is not None:
            for name, prompt_id in (
                ("music", row.music_on_hold_id),
                ("announcement", row.announcement_id),
                ("greeting", row.voicemail_greeting_id),
            ):
                if prompt_id is not None:
                    prompt = await session.scalar(select(Prompt).where(Prompt.id == prompt_id))
                    if prompt is not None:
                        urls[name] = prompt_url(self.settings, tenant_id, prompt.id, prompt.sha256, prompt.format)
        return QueueAudio(
            music_on_hold=urls["music"],
            announcement=urls["announcement"],
            voicemail_greeting=urls["greeting"],
            recording_policy=row.recording_policy if row else "never",
            voicemail_enabled=row.voicemail_enabled if row else False,
            voicemail_max_seconds=row.voicemail_max_seconds if row else 120,
        )


@dataclass(frozen=True, slots=True)
class QueueAudio:
    """A queue's voice settings resolved to file strings, for call control."""

    music_on_hold: str | None
    announcement: str | None
    voicemail_greeting: str | None
    recording_policy: str
    voicemail_enabled: bool
    voicemail_max_seconds: int

"""Routes for voice media and safety: prompts, queues' voice settings, recordings, voicemail, outbound, supervision.

Switch-facing routes (prompt files, recording and voicemail uploads) take the
tenant from the URL: a switch node is trusted for every tenant, and once the
tenant is set every read is under row-level security, so a URL naming one
tenant's id and another tenant's object finds nothing.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.params import Parameter
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK, HTTP_304_NOT_MODIFIED
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.principal import Principal
from backend.channels.voice import media, outbound, recordings, supervision
from backend.channels.voice.legs import as_uuid
from backend.channels.voice.outbound import OutboundGuard
from backend.channels.voice.recordings import StoredAudio, VoicemailDesk
from backend.channels.voice.schemas import (
    GatewayIn,
    GatewayOut,
    OutboundCheckIn,
    OutboundCheckOut,
    OutboundPolicyIn,
    OutboundPolicyOut,
    OutboundRouteIn,
    OutboundRouteOut,
    PromptOut,
    PromptPatch,
    QueueVoiceSettingsIn,
    QueueVoiceSettingsOut,
    RecordingOut,
    SupervisionSessionOut,
    VoicemailOut,
)
from backend.config import Settings
from backend.db.tenancy import set_tenant
from backend.lib.pagination import Page, PageRequest
from backend.lib.problems import NotFound
from backend.lib.ranges import byte_range
from backend.lib.storage import ObjectStorage

PRIVATE_AUDIO = "private, no-store"


def _storage(request: Request[Any, Any, Any]) -> ObjectStorage:
    storage: ObjectStorage = request.app.state.storage
    return storage


def _uuid(value: str, what: str) -> uuid.UUID:
    found = as_uuid(value)
    if found is None:
        raise NotFound(f"No such {what}")
    return found


def audio_response(
    request: Request[Any, Any, Any], storage: ObjectStorage, audio: StoredAudio, cache_control: str
) -> Response[Any]:
    """Stream stored audio: ETag and If-None-Match, one byte range (206) for seeking, 416 past the end."""
    etag = f'"{audio.sha256}"'
    headers = {"ETag": etag, "Cache-Control": cache_control, "Accept-Ranges": "bytes"}
    if etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
        return Response(b"", status_code=HTTP_304_NOT_MODIFIED, headers=headers)
    wanted = byte_range(request.headers.get("range"), audio.size_bytes)
    start, end, status = (0, audio.size_bytes - 1, HTTP_200_OK) if wanted is None else (*wanted, 206)
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{audio.size_bytes}"
    headers["Content-Length"] = str(end - start + 1)
    return Stream(
        storage.read(audio.storage_key, start, end), status_code=status, media_type=audio.content_type, headers=headers
    )


def _new_listen(request: Request[Any, Any, Any]) -> bool:
    """A request from the start of the file is a new listen; a later range is a seek within one."""
    wanted = request.headers.get("range", "").replace(" ", "")
    return not wanted or wanted.startswith("bytes=0-")


# --- the switch ---------------------------------------------------------------------------------


class SwitchMediaController(Controller):
    """What FreeSWITCH fetches and uploads over HTTP (mod_http_cache), with the switch secret as a header.

    mod_http_cache sends it through a `default` profile (`<header name="x-switch-secret">`) applied to
    the API's host; see README "Pointing FreeSWITCH at the backend".
    """

    path = "/api/v1/switch"
    tags = ["switch"]
    opt = {"access": "switch"}

    @get("/prompts/{tenant_id:str}/{prompt_id:str}/{file_name:str}", operation_id="switch_prompt_file")
    async def prompt_file(
        self, request: Request[Any, Any, Any], db_session: AsyncSession, tenant_id: str, prompt_id: str, file_name: str
    ) -> Response[Any]:
        """A prompt's audio for `http_cache://` (immutable URL: the content hash is in it)."""
        tenant = _uuid(tenant_id, "prompt")
        await set_tenant(db_session, tenant)
        found = await media.prompt_for_switch(db_session, _uuid(prompt_id, "prompt"), file_name)
        settings: Settings = request.app.state.settings
        audio = StoredAudio(found.storage_key, found.size_bytes, found.content_type, found.sha256)
        return audio_response(
            request, _storage(request), audio, f"public, max-age={settings.switch_media_max_age_seconds}, immutable"
        )

    @put(
        "/recordings/{tenant_id:str}/{recording_id:str}/{file_name:str}",
        operation_id="switch_upload_recording",
        request_max_body_size=None,
        status_code=HTTP_200_OK,
    )
    async def upload_recording(
        self,
        request: Request[Any, Any, Any],
        db_session: AsyncSession,
        tenant_id: str,
        recording_id: str,
        file_name: str,
    ) -> RecordingOut:
        """A closed recording (`audio.wav` or `audio.mp3`), streamed; idempotent by recording id."""
        tenant = _uuid(tenant_id, "recording")
        await set_tenant(db_session, tenant)
        return await recordings.receive_recording(
            db_session,
            _storage(request),
            request.app.state.settings,
            tenant,
            _uuid(recording_id, "recording"),
            file_name,
            request.stream(),
        )

    @put(
        "/voicemails/{tenant_id:str}/{voicemail_id:str}/{file_name:str}",
        operation_id="switch_upload_voicemail",
        request_max_body_size=None,
        status_code=HTTP_200_OK,
    )
    async def upload_voicemail(
        self, request: Request[Any, Any, Any], tenant_id: str, voicemail_id: str, file_name: str
    ) -> VoicemailOut:
        """A voicemail message; stored once, then shown as an interaction (and a ticket if the queue asks)."""
        desk: VoicemailDesk = request.app.state.voicemail
        return await desk.receive(
            _uuid(tenant_id, "voicemail"), _uuid(voicemail_id, "voicemail"), file_name, request.stream()
        )


# --- the tenant's prompts and queues ------------------------------------------------------------


class PromptController(Controller):
    """Prompts and music on hold (WAV or MP3), for IVR flows and queues."""

    path = "/api/v1/voice/prompts"
    tags = ["voice"]
    opt = {"access": "tenant"}

    @get("/", permission="queues:read", operation_id="list_prompts")
    async def list_prompts(
        self, db_session: AsyncSession, page: PageRequest, kind: Literal["prompt", "music"] | None = None
    ) -> Page[PromptOut]:
        """Prompts by name; `kind=music` for music on hold."""
        items, cursor = await media.list_prompts(db_session, page, kind=kind)
        return Page(items, cursor)

    @post(
        "/",
        permission="queues:write",
        operation_id="upload_prompt",
        request_max_body_size=None,
        opt={"raw_body": "audio"},
    )
    async def upload(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        settings: Settings,
        name: str = Parameter(query="name", min_length=1, max_length=120),
        kind: Literal["prompt", "music"] = Parameter(query="kind", default="prompt"),
    ) -> PromptOut:
        """Upload a WAV or MP3 file as the raw request body (at most `CC_PROMPT_MAX_BYTES`)."""
        return await media.upload_prompt(
            db_session, _storage(request), settings, request.user, name=name, kind=kind, body=request.stream()
        )

    @get("/{prompt_id:uuid}", permission="queues:read", operation_id="get_prompt")
    async def get_prompt(self, db_session: AsyncSession, prompt_id: uuid.UUID) -> PromptOut:
        """One prompt."""
        return await media.get_prompt(db_session, prompt_id)

    @get("/{prompt_id:uuid}/audio", permission="queues:read", operation_id="play_prompt")
    async def play(
        self, request: Request[Any, Any, Any], db_session: AsyncSession, prompt_id: uuid.UUID
    ) -> Response[Any]:
        """The prompt's audio (byte ranges for seeking)."""
        found = await media.get_prompt(db_session, prompt_id)
        file = await media.prompt_for_switch(db_session, prompt_id, f"{found.sha256}.{found.format}")
        audio = StoredAudio(file.storage_key, file.size_bytes, file.content_type, file.sha256)
        return audio_response(request, _storage(request), audio, PRIVATE_AUDIO)

    @patch("/{prompt_id:uuid}", permission="queues:write", operation_id="rename_prompt")
    async def rename(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, prompt_id: uuid.UUID, data: PromptPatch
    ) -> PromptOut:
        """Rename a prompt."""
        return await media.rename_prompt(db_session, request.user, prompt_id, data.name)

    @delete("/{prompt_id:uuid}", permission="queues:write", operation_id="delete_prompt")
    async def delete_prompt(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, prompt_id: uuid.UUID
    ) -> None:
        """Delete a prompt no flow or queue plays."""
        await media.delete_prompt(db_session, _storage(request), request.user, prompt_id)


class QueueVoiceController(Controller):
    """A queue's voice settings: music on hold, announcement, recording policy, voicemail."""

    path = "/api/v1/voice/queues"
    tags = ["voice"]
    opt = {"access": "tenant"}

    @get("/{queue_id:uuid}/settings", permission="queues:read", operation_id="get_queue_voice_settings")
    async def get_settings(self, db_session: AsyncSession, queue_id: uuid.UUID) -> QueueVoiceSettingsOut:
        """The queue's voice settings."""
        return await media.queue_voice_settings(db_session, queue_id)

    @put("/{queue_id:uuid}/settings", permission="queues:write", operation_id="put_queue_voice_settings")
    async def put_settings(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        settings: Settings,
        queue_id: uuid.UUID,
        data: QueueVoiceSettingsIn,
    ) -> QueueVoiceSettingsOut:
        """Set the queue's voice settings as a whole."""
        return await media.put_queue_voice_settings(db_session, settings, request.user, queue_id, data)


# --- recordings and voicemail -------------------------------------------------------------------


class RecordingController(Controller):
    """Call recordings: listed, and played back through this authenticated URL (every new listen is audited)."""

    path = "/api/v1/voice/recordings"
    tags = ["voice"]
    opt = {"access": "tenant"}

    @get("/", permission="recordings:read", operation_id="list_recordings")
    async def list_recordings(
        self,
        db_session: AsyncSession,
        page: PageRequest,
        interaction_id: uuid.UUID | None = None,
        queue_id: uuid.UUID | None = None,
        agent_id: uuid.UUID | None = None,
    ) -> Page[RecordingOut]:
        """Recordings, newest first."""
        items, cursor = await recordings.list_recordings(
            db_session, page, interaction_id=interaction_id, queue_id=queue_id, agent_id=agent_id
        )
        return Page(items, cursor)

    @get("/{recording_id:uuid}", permission="recordings:read", operation_id="get_recording")
    async def get_recording(self, db_session: AsyncSession, recording_id: uuid.UUID) -> RecordingOut:
        """One recording, with its paused intervals."""
        return await recordings.get_recording(db_session, recording_id)

    @get("/{recording_id:uuid}/audio", permission="recordings:read", operation_id="play_recording")
    async def play(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, recording_id: uuid.UUID
    ) -> Response[Any]:
        """The audio, with `Range` for seeking; who listened is in the audit log (`recording.play`)."""
        audio = await recordings.recording_audio(
            db_session, request.user, recording_id, new_listen=_new_listen(request)
        )
        return audio_response(request, _storage(request), audio, PRIVATE_AUDIO)


class VoicemailController(Controller):
    """Voicemail: agents hear their own box; `voicemail:read` hears every box."""

    path = "/api/v1/voice/voicemails"
    tags = ["voice"]
    opt = {"access": "tenant"}

    @get("/", permission="agent:workspace", operation_id="list_voicemails")
    async def list_voicemails(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        page: PageRequest,
        queue_id: uuid.UUID | None = None,
        agent_id: uuid.UUID | None = None,
    ) -> Page[VoicemailOut]:
        """Stored messages, newest first."""
        items, cursor = await recordings.list_voicemails(
            db_session, request.user, page, queue_id=queue_id, agent_id=agent_id
        )
        return Page(items, cursor)

    @get("/{voicemail_id:uuid}", permission="agent:workspace", operation_id="get_voicemail")
    async def get_voicemail(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, voicemail_id: uuid.UUID
    ) -> VoicemailOut:
        """One message."""
        return await recordings.get_voicemail(db_session, request.user, voicemail_id)

    @get("/{voicemail_id:uuid}/audio", permission="agent:workspace", operation_id="play_voicemail")
    async def play(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, voicemail_id: uuid.UUID
    ) -> Response[Any]:
        """The message's audio, with `Range`; every new listen is audited (`voicemail.play`)."""
        audio = await recordings.voicemail_audio(
            db_session, request.user, voicemail_id, new_listen=_new_listen(request)
        )
        return audio_response(request, _storage(request), audio, PRIVATE_AUDIO)


# --- outbound safety and supervision ------------------------------------------------------------


class OutboundController(Controller):
    """The tenant's outbound policy, and the check the agent's workspace makes before dialling."""

    path = "/api/v1/voice/outbound"
    tags = ["voice"]
    opt = {"access": "tenant"}

    @get("/policy", permission="tenant:read", operation_id="get_outbound_policy")
    async def policy(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, settings: Settings
    ) -> OutboundPolicyOut:
        """Where this workspace's calls may go, and how many at once (set by the provider)."""
        assert request.user.tenant_id is not None
        return await outbound.get_policy(db_session, settings, request.user.tenant_id)

    @post("/check", permission="calls:outbound", operation_id="check_outbound_call", status_code=HTTP_200_OK)
    async def check(self, request: Request[Principal, Any, Any], data: OutboundCheckIn) -> OutboundCheckOut:
        """May I call this number (with this caller id)? 403 problem+json with a `reason` if not; audited."""
        guard: OutboundGuard = request.app.state.outbound
        decision = await guard.check_for_agent(request.user, data.destination, data.caller_id)
        return OutboundCheckOut(
            True, decision.destination, decision.caller_id, decision.gateway, decision.number_type, decision.region
        )


class SupervisionController(Controller):
    """The record of supervision: who listened, whispered or barged into whose call."""

    path = "/api/v1/voice/supervision-sessions"
    tags = ["voice"]
    opt = {"access": "tenant"}

    @get("/", permission="audit:read", operation_id="list_supervision_sessions")
    async def list_sessions(
        self,
        db_session: AsyncSession,
        page: PageRequest,
        agent_id: uuid.UUID | None = None,
        supervisor_id: uuid.UUID | None = None,
    ) -> Page[SupervisionSessionOut]:
        """Sessions, newest first."""
        items, cursor = await supervision.list_sessions(
            db_session, page, agent_id=agent_id, supervisor_id=supervisor_id
        )
        return Page(items, cursor)


class CarrierController(Controller):
    """Provider operations: carrier gateways, outbound routes, and each tenant's outbound policy."""

    path = "/api/v1/ops"
    tags = ["provider operations"]
    opt = {"access": "provider"}

    @get("/carrier-gateways", operation_id="ops_list_gateways")
    async def list_gateways(self, db_session: AsyncSession) -> list[GatewayOut]:
        """Every gateway."""
        return await outbound.list_gateways(db_session)

    @post("/carrier-gateways", operation_id="ops_create_gateway")
    async def create_gateway(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: GatewayIn
    ) -> GatewayOut:
        """Register a gateway (a sofia gateway of that name on every node)."""
        return await outbound.create_gateway(db_session, request.user, data)

    @put("/carrier-gateways/{gateway_id:uuid}", operation_id="ops_update_gateway")
    async def update_gateway(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, gateway_id: uuid.UUID, data: GatewayIn
    ) -> GatewayOut:
        """Change or disable a gateway."""
        return await outbound.update_gateway(db_session, request.user, gateway_id, data)

    @get("/outbound-routes", operation_id="ops_list_outbound_routes")
    async def list_routes(self, db_session: AsyncSession) -> list[OutboundRouteOut]:
        """Every route (longest prefix wins, then the lowest priority)."""
        return await outbound.list_routes(db_session)

    @post("/outbound-routes", operation_id="ops_create_outbound_route")
    async def create_route(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: OutboundRouteIn
    ) -> OutboundRouteOut:
        """Send a prefix through a gateway."""
        return await outbound.create_route(db_session, request.user, data)

    @delete("/outbound-routes/{route_id:uuid}", operation_id="ops_delete_outbound_route")
    async def delete_route(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, route_id: uuid.UUID
    ) -> None:
        """Remove a route."""
        await outbound.delete_route(db_session, request.user, route_id)

    @get("/tenants/{tenant_id:uuid}/outbound-policy", operation_id="ops_get_outbound_policy")
    async def get_policy(self, db_session: AsyncSession, settings: Settings, tenant_id: uuid.UUID) -> OutboundPolicyOut:
        """A tenant's outbound policy as it applies."""
        await set_tenant(db_session, tenant_id)
        return await outbound.get_policy(db_session, settings, tenant_id)

    @put("/tenants/{tenant_id:uuid}/outbound-policy", operation_id="ops_put_outbound_policy")
    async def put_policy(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        settings: Settings,
        tenant_id: uuid.UUID,
        data: OutboundPolicyIn,
    ) -> OutboundPolicyOut:
        """Set a tenant's outbound policy: home regions, international, premium rate, concurrent cap."""
        return await outbound.put_policy(db_session, settings, request.user, tenant_id, data)

"""Prompts, storage (a folder and a real S3 peer), the switch's media routes, recordings and voicemail."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from backend.channels.voice import recordings
from backend.channels.voice.audio import sniff
from backend.channels.voice.recordings import VoicemailDesk, VoicemailTicketRequest
from backend.db.engine import tenant_transaction
from backend.lib.problems import InvalidInput
from backend.lib.ranges import RangeNotSatisfiable, byte_range
from backend.lib.storage import LocalStorage, ObjectMissing, PayloadTooLarge, S3Storage, spool
from backend.tenants.models import AuditEntry
from tests.factories import Factory, MediaFactory, mp3_bytes, wav_bytes

pytestmark = pytest.mark.integration


# --- recognising audio (pure) ----------------------------------------------------------------


@pytest.mark.unit
def test_wav_and_mp3_are_recognised_from_their_headers():
    wav = wav_bytes(seconds=1.0, rate=16000, channels=2)
    info = sniff(wav, len(wav))
    assert (info.format, info.sample_rate, info.channels, info.duration_ms) == ("wav", 16000, 2, 1000)
    mp3 = mp3_bytes(frames=100)
    info = sniff(mp3, len(mp3))
    assert (info.format, info.sample_rate, info.channels) == ("mp3", 44100, 2)
    assert 2500 <= info.duration_ms <= 2700  # 100 frames of 1152 samples at 44.1 kHz: 2.6 s


@pytest.mark.unit
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"<html>not audio</html>" * 10, "is not WAV or MP3 audio"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "is a RIFF file but not WAVE audio"),
        (b"\xff\xfb\x90\x64" + bytes(413) + b"garbage!" * 10, "second frame"),
        (b"\xff\xfb\x90\x64" + bytes(100), "truncated"),
        (
            b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00"
            + bytes([0x55, 0, 1, 0])
            + bytes(12)
            + b"data\x04\x00\x00\x00abcd",
            "codec 85",
        ),
    ],
)
def test_other_files_are_refused_whatever_they_are_called(content: bytes, message: str):
    with pytest.raises(InvalidInput) as caught:
        sniff(content, len(content))
    assert caught.value.errors[0]["field"] == "body"
    assert message in caught.value.errors[0]["message"]


@pytest.mark.unit
def test_byte_ranges():
    assert byte_range(None, 100) is None
    assert byte_range("bytes=0-", 100) == (0, 99)
    assert byte_range("bytes=10-19", 100) == (10, 19)
    assert byte_range("bytes=90-500", 100) == (90, 99)
    assert byte_range("bytes=-10", 100) == (90, 99)
    assert byte_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole content
    with pytest.raises(RangeNotSatisfiable) as caught:
        byte_range("bytes=100-", 100)
    assert caught.value.headers["Content-Range"] == "bytes */100"


# --- storage: one interface, two backends ----------------------------------------------------


async def _chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.fixture(scope="module")
def s3_peer():
    """moto's S3 server on 127.0.0.1: the real S3 HTTP API (SigV4, ranges, 404s), nothing leaves the machine."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(params=["local", "s3"])
async def storage(request, tmp_path: Path):
    if request.param == "local":
        yield LocalStorage(str(tmp_path / "media"))
        return
    endpoint = request.getfixturevalue("s3_peer")
    s3 = S3Storage(bucket="media-test", region="us-east-1", endpoint_url=endpoint, access_key="test", secret_key="test")
    client = await s3._s3()
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        await client.create_bucket(Bucket="media-test")
    yield s3
    await s3.close()


async def test_storage_puts_reads_ranges_and_deletes(storage, tmp_path: Path):
    data = bytes(range(256)) * 400
    spooled = await spool(_chunks(data), limit=len(data), directory=str(tmp_path))
    assert spooled.sha256 == hashlib.sha256(data).hexdigest()
    key = f"tenants/{uuid.uuid4()}/prompts/x/{spooled.sha256}.wav"
    await storage.put(key, spooled.path, "audio/wav")
    spooled.discard()
    assert await storage.size(key) == len(data)
    assert b"".join([c async for c in storage.read(key)]) == data
    assert b"".join([c async for c in storage.read(key, 1000, 1099)]) == data[1000:1100]
    assert b"".join([c async for c in storage.read(key, len(data) - 5)]) == data[-5:]
    await storage.delete(key)
    assert await storage.size(key) is None
    with pytest.raises(ObjectMissing):
        async for _ in storage.read(key):
            pass
    with pytest.raises(ValueError, match="storage key"):
        await storage.size("../etc/passwd")


async def test_spool_refuses_past_the_limit_and_leaves_nothing(tmp_path: Path):
    with pytest.raises(PayloadTooLarge) as caught:
        await spool(_chunks(bytes(5000)), limit=4999, directory=str(tmp_path))
    assert caught.value.status == 413
    assert os.listdir(tmp_path) == []


# --- prompts over the API, and the switch fetching them ---------------------------------------


async def test_prompt_upload_checks_the_content_not_the_name_or_type(factory: Factory):
    a = await factory.tenant()
    response = await factory.client.post(
        "/api/v1/voice/prompts",
        params={"name": "greeting.wav", "kind": "prompt"},
        content=b"MZ\x90\x00 this is an executable" * 20,
        headers={**a.headers, "content-type": "audio/wav"},
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body"
    mp3 = await MediaFactory(factory).prompt(a, kind="music", content=mp3_bytes())
    assert (mp3["format"], mp3["kind"]) == ("mp3", "music")
    duplicate = await factory.client.post(
        "/api/v1/voice/prompts",
        params={"name": mp3["name"]},
        content=wav_bytes(),
        headers=a.headers,
    )
    assert duplicate.status_code == 409


async def test_prompt_size_limit_is_the_setting(factory: Factory, app, sessionmaker, settings_obj):
    from backend.channels.voice import media

    a = await factory.tenant()
    small = dataclasses.replace(settings_obj, prompt_max_bytes=1000)
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        with pytest.raises(PayloadTooLarge):
            await media.upload_prompt(
                session, app.state.storage, small, a.system(), name="big", kind="prompt", body=_chunks(wav_bytes())
            )


async def test_the_switch_fetches_prompts_with_caching_headers(factory: Factory, settings_obj):
    a = await factory.tenant()
    media = MediaFactory(factory)
    content = wav_bytes(seconds=0.5)
    prompt = await media.prompt(a, content=content)
    switch = await media.switch_headers()
    url = f"/api/v1/switch/prompts/{a.tenant_id}/{prompt['id']}/{prompt['sha256']}.wav"
    response = await factory.client.get(url, headers=switch)
    assert response.status_code == 200
    assert response.content == content
    assert response.headers["content-type"].startswith("audio/wav")
    assert response.headers["etag"] == f'"{prompt["sha256"]}"'
    assert f"max-age={settings_obj.switch_media_max_age_seconds}" in response.headers["cache-control"]
    again = await factory.client.get(url, headers={**switch, "if-none-match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    # A stale hash, another tenant's id, no secret: never the file.
    b = await factory.tenant()
    for wrong in (
        f"/api/v1/switch/prompts/{a.tenant_id}/{prompt['id']}/{'0' * 64}.wav",
        f"/api/v1/switch/prompts/{b.tenant_id}/{prompt['id']}/{prompt['sha256']}.wav",
        f"/api/v1/switch/prompts/not-a-uuid/{prompt['id']}/{prompt['sha256']}.wav",
    ):
        assert (await factory.client.get(wrong, headers=switch)).status_code == 404
    assert (await factory.client.get(url)).status_code == 401


async def test_queue_voice_settings_take_the_tenants_prompts_only(factory: Factory):
    a = await factory.tenant()
    b = await factory.tenant()
    media = MediaFactory(factory)
    queue = await factory.queue(a)
    prompt = await media.prompt(a)
    music = await media.prompt(a, kind="music")
    foreign = await media.prompt(b, kind="music")
    url = f"/api/v1/voice/queues/{queue}/settings"
    response = await factory.client.put(
        url,
        json={"music_on_hold_id": prompt["id"], "announcement_id": foreign["id"], "voicemail_max_seconds": 3600},
        headers=a.headers,
    )
    assert response.status_code == 422
    assert {e["field"] for e in response.json()["errors"]} == {
        "music_on_hold_id",
        "announcement_id",
        "voicemail_max_seconds",
    }
    response = await factory.client.put(
        url,
        json={"music_on_hold_id": music["id"], "announcement_id": prompt["id"], "recording_policy": "always"},
        headers=a.headers,
    )
    assert response.status_code == 200, response.text
    assert (await factory.client.get(url, headers=a.headers)).json()["recording_policy"] == "always"
    in_use = await factory.client.delete(f"/api/v1/voice/prompts/{music['id']}", headers=a.headers)
    assert in_use.status_code == 409


# --- recordings ------------------------------------------------------------------------------


async def test_recording_upload_is_idempotent_and_plays_back_with_ranges_and_audit(factory: Factory, sessionmaker):
    a = await factory.tenant()
    media = MediaFactory(factory)
    content = wav_bytes(seconds=1.0)
    recording_id = await media.recording(a, content=content)
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        row = await recordings.get_recording(session, recording_id)
    assert (row.status, row.size_bytes, row.duration_ms, row.format) == ("stored", len(content), 1000, "wav")
    switch = await media.switch_headers()
    upload = f"/api/v1/switch/recordings/{a.tenant_id}/{recording_id}/audio.wav"
    assert (await factory.client.put(upload, content=content, headers=switch)).status_code == 200
    other = await factory.client.put(upload, content=wav_bytes(seconds=0.5), headers=switch)
    assert other.status_code == 409
    unknown = f"/api/v1/switch/recordings/{a.tenant_id}/{uuid.uuid4()}/audio.wav"
    assert (await factory.client.put(unknown, content=content, headers=switch)).status_code == 404
    mislabelled = await factory.client.put(upload.replace(".wav", ".mp3"), content=content, headers=switch)
    assert mislabelled.status_code in (409, 422)

    audio = f"/api/v1/voice/recordings/{recording_id}/audio"
    whole = await factory.client.get(audio, headers=a.headers)
    assert whole.status_code == 200 and whole.content == content
    assert whole.headers["accept-ranges"] == "bytes"
    part = await factory.client.get(audio, headers={**a.headers, "range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(content)}"
    past = await factory.client.get(audio, headers={**a.headers, "range": f"bytes={len(content)}-"})
    assert past.status_code == 416
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        plays = (await session.scalars(select(AuditEntry).where(AuditEntry.action == "recording.play"))).all()
    assert [p.target_id for p in plays] == [str(recording_id)]  # the listen, not the seek

    agent = await factory.user(a, role="agent", login=True)
    assert (await factory.client.get(audio, headers=agent["headers"])).status_code == 403


async def test_recording_policy_and_paused_intervals(factory: Factory, sessionmaker, settings_obj):
    from backend.lib.problems import Conflict

    a = await factory.tenant()
    queue = await factory.queue(a)
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        with pytest.raises(Conflict):
            await recordings.begin_recording(session, settings_obj, a.tenant_id, queue_id=queue)
    await factory.client.put(
        f"/api/v1/voice/queues/{queue}/settings", json={"recording_policy": "on_demand"}, headers=a.headers
    )
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        with pytest.raises(Conflict):
            await recordings.begin_recording(session, settings_obj, a.tenant_id, queue_id=queue)
        target = await recordings.begin_recording(session, settings_obj, a.tenant_id, queue_id=queue, on_demand=True)
        await recordings.pause_recording(session, target.id)
        await recordings.pause_recording(session, target.id)  # twice: one interval
        await recordings.resume_recording(session, target.id)
        await recordings.pause_recording(session, target.id)
        ended = await recordings.end_recording(session, target.id)
    assert target.upload_url.endswith(f"/api/v1/switch/recordings/{a.tenant_id}/{target.id}/audio.wav")
    assert len(ended.paused_intervals) == 2
    assert all(i.resumed_at is not None for i in ended.paused_intervals)
    assert ended.policy == "on_demand"


# --- voicemail -------------------------------------------------------------------------------


class RecordingTickets:
    def __init__(self) -> None:
        self.requests: list[VoicemailTicketRequest] = []

    async def open_ticket(self, request: VoicemailTicketRequest) -> str | None:
        self.requests.append(request)
        return f"T-{len(self.requests)}"


async def test_voicemail_becomes_an_interaction_and_a_ticket_when_the_queue_says_so(factory: Factory, app):
    a = await factory.tenant()
    queue = await factory.queue(a)
    await factory.client.put(
        f"/api/v1/voice/queues/{queue}/settings",
        json={"voicemail_enabled": True, "voicemail_creates_ticket": True},
        headers=a.headers,
    )
    tickets = RecordingTickets()
    desk = VoicemailDesk(app.state.sessionmaker, app.state.storage, app.state.settings, app.state.routing, tickets)
    target = await desk.begin(a.tenant_id, queue_id=queue, caller_number="+33612345678")
    content = wav_bytes(seconds=0.5)
    stored = await desk.receive(a.tenant_id, target.id, "audio.wav", _chunks(content))
    again = await desk.receive(a.tenant_id, target.id, "audio.wav", _chunks(content))
    assert len(tickets.requests) == 1  # the second upload changed nothing
    assert stored.ticket_id == "T-1" and again.ticket_id == "T-1"
    assert stored.interaction_id is not None and stored.interaction_id == again.interaction_id
    interaction = await factory.client.get(f"/api/v1/interactions/{stored.interaction_id}", headers=a.headers)
    body = interaction.json()
    assert (body["channel"], body["outcome"], body["state"], body["queue_id"]) == (
        "voice",
        "voicemail",
        "ended",
        str(queue),
    )
    assert body["attributes"]["voicemail_id"] == str(target.id)
    assert [e["name"] for e in body["timeline"]] == ["created", "ended"]
    listed = await factory.client.get("/api/v1/voice/voicemails", headers=a.headers)
    assert [v["id"] for v in listed.json()["items"]] == [str(target.id)]
    played = await factory.client.get(f"/api/v1/voice/voicemails/{target.id}/audio", headers=a.headers)
    assert played.content == content


async def test_the_app_opens_a_real_ticket_in_the_customer_store_for_a_voicemail(factory: Factory, app):
    a = await factory.tenant()
    queue = await factory.queue(a)
    await factory.client.put(
        f"/api/v1/voice/queues/{queue}/settings",
        json={"voicemail_enabled": True, "voicemail_creates_ticket": True},
        headers=a.headers,
    )
    desk = app.state.voicemail  # as the application wires it: tickets in the customer store
    target = await desk.begin(a.tenant_id, queue_id=queue, caller_number="+33612345678")
    stored = await desk.receive(a.tenant_id, target.id, "audio.wav", _chunks(wav_bytes(seconds=0.5)))
    assert stored.ticket_id is not None
    ticket = await factory.client.get(f"/api/v1/tickets/{stored.ticket_id}", headers=a.headers)
    assert ticket.status_code == 200, ticket.text
    body = ticket.json()
    assert body["subject"] == "Voicemail from +33612345678"
    assert body["interaction_id"] == str(stored.interaction_id)
    assert body["status"] == "new"


async def test_agents_hear_their_own_box_only(factory: Factory):
    a = await factory.tenant()
    agent = await factory.user(a, role="agent", login=True)
    other = await factory.user(a, role="agent")
    media = MediaFactory(factory)
    mine = await media.voicemail(a, agent_id=agent["id"])
    theirs = await media.voicemail(a, agent_id=other["id"])
    queue_box = await media.voicemail(a)
    listed = await factory.client.get("/api/v1/voice/voicemails", headers=agent["headers"])
    assert [v["id"] for v in listed.json()["items"]] == [str(mine)]
    assert (
        await factory.client.get(f"/api/v1/voice/voicemails/{mine}/audio", headers=agent["headers"])
    ).status_code == 200
    for forbidden in (theirs, queue_box):
        response = await factory.client.get(f"/api/v1/voice/voicemails/{forbidden}/audio", headers=agent["headers"])
        assert response.status_code == 403
    supervisor = await factory.user(a, role="supervisor", login=True)
    everything = await factory.client.get("/api/v1/voice/voicemails", headers=supervisor["headers"])
    assert len(everything.json()["items"]) == 3


async def test_uploads_that_never_come_are_marked_failed(factory: Factory, app, sessionmaker, settings_obj):
    from datetime import timedelta

    from backend.db.base import utcnow

    a = await factory.tenant()
    queue = await factory.queue(a)
    await factory.client.put(
        f"/api/v1/voice/queues/{queue}/settings", json={"recording_policy": "always"}, headers=a.headers
    )
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        late = await recordings.begin_recording(session, settings_obj, a.tenant_id, queue_id=queue)
        await recordings.end_recording(session, late.id, at=utcnow() - timedelta(hours=2))
        ongoing = await recordings.begin_recording(session, settings_obj, a.tenant_id, queue_id=queue)
    message = await app.state.voicemail.begin(a.tenant_id, queue_id=queue)
    later = utcnow() + timedelta(
        seconds=settings_obj.voicemail_max_seconds + settings_obj.media_upload_deadline_seconds + 5
    )
    assert await recordings.sweep_missing_uploads(sessionmaker, settings_obj, now=utcnow()) >= 1
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        assert (await recordings.get_recording(session, late.id)).status == "failed"
        assert (await recordings.get_recording(session, ongoing.id)).status == "recording"
    await recordings.sweep_missing_uploads(sessionmaker, settings_obj, now=later)
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        row = await session.scalar(select(recordings.Voicemail).where(recordings.Voicemail.id == message.id))
        assert row is not None and row.status == "failed"
    # A late upload for a failed recording still lands.
    switch = await MediaFactory(factory).switch_headers()
    stored = await factory.client.put(
        f"/api/v1/switch/recordings/{a.tenant_id}/{late.id}/audio.wav", content=wav_bytes(), headers=switch
    )
    assert stored.status_code == 200 and stored.json()["status"] == "stored"


@pytest.mark.unit
def test_file_strings_are_quoted_for_space_separated_applications(settings_obj):
    from backend.channels.voice.media import quoted_argument, speak_arguments, tts_file_string

    spoken = tts_file_string(settings_obj, "Press 1 for 'sales' ${x}", None)
    assert spoken == f"tts://{settings_obj.tts_engine}|{settings_obj.tts_default_voice}|Press 1 for sales x"
    assert quoted_argument(spoken) == f"'{spoken}'"
    assert speak_arguments(settings_obj, "Hi", "kal") == f"{settings_obj.tts_engine}|kal|Hi"
    with pytest.raises(ValueError, match="quotes"):
        quoted_argument("it's")


async def test_unreachable_storage_is_a_503_problem_not_a_crash(tmp_path: Path):
    from backend.lib.storage import StorageError

    down = S3Storage(
        bucket="media-test", region="us-east-1", endpoint_url="http://127.0.0.1:9", access_key="k", secret_key="s"
    )
    source = tmp_path / "a.wav"
    source.write_bytes(wav_bytes())
    try:
        with pytest.raises(StorageError) as caught:
            await down.put("tenants/x/a.wav", source, "audio/wav")
        assert caught.value.status == 503
        with pytest.raises(StorageError):
            await down.size("tenants/x/a.wav")
    finally:
        await down.close()

"""What an uploaded audio file really is: WAV or MP3, read from its own header, never from its name or type.

FreeSWITCH plays WAV through mod_sndfile (PCM, A-law, mu-law, float) and MP3
through mod_shout (MPEG layer III). Anything else is refused before it is
stored, with a message that says what was found.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from backend.lib.problems import InvalidInput

WAV_CODECS = {1: "pcm", 3: "float", 6: "alaw", 7: "ulaw", 0xFFFE: "extensible"}
SAMPLE_RATES = range(8000, 48001)
HEAD_BYTES = 128 * 1024
"""How much of a file is read to recognise it (an ID3 tag with cover art can be long; longer ones are refused)."""

_MPEG_BITRATES = {
    # (version is MPEG-1, layer III) and (MPEG-2/2.5, layer III), kbit/s by index 1..14
    True: (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    False: (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """A recognised audio file."""

    format: str
    """`wav` or `mp3`."""
    content_type: str
    sample_rate: int
    channels: int
    duration_ms: int
    codec: str


def _refuse(message: str) -> InvalidInput:
    return InvalidInput.field("body", message)


def _wav(head: bytes, size: int) -> AudioInfo:
    if len(head) < 12 or head[8:12] != b"WAVE":
        raise _refuse("is a RIFF file but not WAVE audio")
    offset = 12
    fmt: tuple[int, int, int, int, int, int] | None = None
    while offset + 8 <= len(head):
        chunk_id, chunk_size = head[offset : offset + 4], struct.unpack_from("<I", head, offset + 4)[0]
        body = offset + 8
        if chunk_id == b"fmt ":
            if chunk_size < 16 or body + 16 > len(head):
                raise _refuse("has a truncated WAVE fmt chunk")
            fmt = struct.unpack_from("<HHIIHH", head, body)
        elif chunk_id == b"data":
            if fmt is None:
                raise _refuse("has WAVE data before its fmt chunk")
            codec, channels, rate, byte_rate, _, bits = fmt
            if codec not in WAV_CODECS:
                raise _refuse(f"is WAVE with codec {codec}, which the switch cannot play (use PCM, A-law or mu-law)")
            if channels not in (1, 2) or rate not in SAMPLE_RATES or byte_rate == 0 or bits == 0:
                raise _refuse(f"is WAVE with {channels} channels at {rate} Hz: use mono or stereo, 8 to 48 kHz")
            available = max(0, size - body)
            data = available if chunk_size in (0, 0xFFFFFFFF) else min(chunk_size, available)
            if data == 0:
                raise _refuse("is WAVE without any audio")
            return AudioInfo("wav", "audio/wav", rate, channels, data * 1000 // byte_rate, WAV_CODECS[codec])
        offset = body + chunk_size + (chunk_size & 1)
    raise _refuse("is WAVE without a data chunk in its first part")


def _id3_length(head: bytes) -> int:
    if head[:3] != b"ID3" or len(head) < 10:
        return 0
    size = head[6:10]
    if any(b & 0x80 for b in size):
        raise _refuse("has a malformed ID3 tag")
    length = (size[0] << 21) | (size[1] << 14) | (size[2] << 7) | size[3]
    return 10 + length + (10 if head[5] & 0x10 else 0)


@dataclass(frozen=True, slots=True)
class _Frame:
    length: int
    bitrate: int
    rate: int
    channels: int
    samples: int
    mpeg1: bool


def _frame(head: bytes, offset: int) -> _Frame | None:
    if offset + 4 > len(head):
        return None
    b1, b2, b3, b4 = head[offset : offset + 4]
    if b1 != 0xFF or (b2 & 0xE0) != 0xE0:
        return None
    version, layer = (b2 >> 3) & 3, (b2 >> 1) & 3
    bitrate_index, rate_index, padding = (b3 >> 4) & 15, (b3 >> 2) & 3, (b3 >> 1) & 1
    if version == 1 or layer != 1 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    mpeg1 = version == 3
    bitrate = _MPEG_BITRATES[mpeg1][bitrate_index - 1] * 1000
    rate = _MPEG_RATES[version][rate_index]
    samples = 1152 if mpeg1 else 576
    length = samples // 8 * bitrate // rate + padding
    channels = 1 if (b4 >> 6) == 3 else 2
    return _Frame(length, bitrate, rate, channels, samples, mpeg1)


def _mp3(head: bytes, size: int) -> AudioInfo:
    start = _id3_length(head)
    if start + 4 > len(head):
        raise _refuse("has an ID3 tag longer than we read; strip the cover art")
    while start < len(head) and head[start] == 0:  # some encoders pad the tag with zeros
        start += 1
    first = _frame(head, start)
    if first is None:
        raise _refuse("is not WAV or MP3 audio (no RIFF/WAVE header, no MPEG layer III frame)")
    if start + first.length > size:
        raise _refuse("is a truncated MP3 (shorter than its first frame)")
    second = _frame(head, start + first.length)
    if second is None and start + first.length < min(size, len(head)):
        raise _refuse("looks like MP3 but its second frame is not where the first says (not MPEG audio)")
    frames: int | None = None
    side = (17 if first.channels == 1 else 32) if first.mpeg1 else (9 if first.channels == 1 else 17)
    tag_at = start + 4 + side
    if head[tag_at : tag_at + 4] in (b"Xing", b"Info") and tag_at + 12 <= len(head):
        flags = struct.unpack_from(">I", head, tag_at + 4)[0]
        if flags & 1:
            frames = struct.unpack_from(">I", head, tag_at + 8)[0]
    # A VBR file names its frame count (Xing/Info); otherwise the first frame's bitrate holds throughout.
    by_frames = frames * first.samples * 1000 // first.rate if frames else None
    duration = by_frames if by_frames is not None else (size - start) * 8 * 1000 // first.bitrate
    return AudioInfo("mp3", "audio/mpeg", first.rate, first.channels, duration, "mp3")


def sniff(head: bytes, size: int) -> AudioInfo:
    """Recognise WAV or MP3 from the first bytes of a file of `size` bytes (422 naming `body` otherwise)."""
    if size == 0:
        raise _refuse("is empty")
    if head[:4] == b"RIFF":
        return _wav(head, size)
    return _mp3(head, size)


def sniff_file(path: Path, size: int) -> AudioInfo:
    """Recognise a spooled upload (reads its head only)."""
    with path.open("rb") as reader:
        head = reader.read(HEAD_BYTES)
    return sniff(head, size)

"""Object storage for audio (prompts, recordings, voicemail): one interface, a local folder or S3 behind it.

Services never touch files or S3 themselves: they spool an upload (`spool`),
check it, then `put` it under a key, and read it back in byte ranges. Keys are
relative paths such as `tenants/<tenant>/prompts/<id>/<sha256>.wav`; the
tenant always leads, so a bucket policy or a retention rule can work per
tenant. Which backend is used is the `CC_MEDIA_STORAGE` setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from backend.config import Settings
from backend.lib.problems import Problem

log = structlog.get_logger("storage")

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

CHUNK = 64 * 1024
_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]*(?:/[a-z0-9][a-z0-9._-]*)*$")


class StorageError(Problem):
    """The storage backend failed (unreachable, refused, full): 503, the client may retry later.

    The detail the client sees is generic; what went wrong is logged with the key.
    """

    status = 503
    kind = "storage-unavailable"
    title = "Storage unavailable"

    def __init__(self, key: str, cause: BaseException | None = None) -> None:
        super().__init__("Media storage is unavailable; try again in a moment", headers={"Retry-After": "5"})
        log.error("storage_failed", key=key, error=repr(cause) if cause else None)


class ObjectMissing(Problem):
    """No object under that key (a row whose audio is gone)."""

    status = 404
    kind = "not-found"
    title = "Not found"

    def __init__(self, key: str) -> None:
        super().__init__("The audio is missing from storage")
        log.error("storage_object_missing", key=key)


class PayloadTooLarge(Problem):
    """An upload is larger than its route allows."""

    status = 413
    kind = "payload-too-large"
    title = "Upload too large"


def check_key(key: str) -> str:
    """A storage key: lower-case path segments, no `..`, no leading slash (it is also a file path)."""
    if not _KEY.fullmatch(key) or ".." in key or len(key) > 300:
        raise ValueError(f"not a storage key: {key!r}")
    return key


@dataclass(frozen=True, slots=True)
class Spooled:
    """An upload written to a local temporary file while it was measured and hashed."""

    path: Path
    size: int
    sha256: str

    def discard(self) -> None:
        """Remove the temporary file."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def spool(chunks: AsyncIterator[bytes], limit: int, directory: str = "") -> Spooled:
    """Write a streamed body to a temporary file, refusing it (413) as soon as it passes `limit` bytes."""
    folder = directory or None
    if folder:
        await asyncio.to_thread(os.makedirs, folder, exist_ok=True)
    handle = await asyncio.to_thread(
        tempfile.NamedTemporaryFile, mode="wb", dir=folder, prefix="upload-", suffix=".part", delete=False
    )
    path = Path(handle.name)
    digest = hashlib.sha256()
    size = 0
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"The upload is larger than the {limit} bytes allowed",
                    errors=[{"field": "body", "message": f"at most {limit} bytes"}],
                )
            digest.update(chunk)
            await asyncio.to_thread(handle.write, chunk)
        await asyncio.to_thread(handle.close)
    except BaseException:
        handle.close()
        Spooled(path, size, "").discard()
        raise
    return Spooled(path, size, digest.hexdigest())


class ObjectStorage(Protocol):
    """Where audio objects live."""

    async def put(self, key: str, source: Path, content_type: str) -> None:
        """Store the file under `key`, replacing what was there; the object appears whole or not at all."""
        ...

    async def size(self, key: str) -> int | None:
        """The object's size in bytes, or None if there is none."""
        ...

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The object's bytes from `start` to `end` inclusive (None: to the end). `ObjectMissing` if absent."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object if it exists."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class LocalStorage:
    """Objects as files under a root folder (one API node, or a shared file system)."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, source: Path, content_type: str) -> None:
        """Copy to a temporary name beside the target, then rename: readers never see half a file."""
        target = self._path(key)

        def copy() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
            try:
                with source.open("rb") as reader, partial.open("wb") as writer:
                    while block := reader.read(1024 * 1024):
                        writer.write(block)
                    writer.flush()
                    os.fsync(writer.fileno())
                partial.replace(target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()

        try:
            await asyncio.to_thread(copy)
        except OSError as exc:
            raise StorageError(key, exc) from exc

    async def size(self, key: str) -> int | None:
        """The file's size."""
        try:
            return (await asyncio.to_thread(self._path(key).stat)).st_size
        except FileNotFoundError:
            return None

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The file's bytes in a range."""
        path = self._path(key)
        try:
            reader = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError as exc:
            raise ObjectMissing(key) from exc
        try:
            await asyncio.to_thread(reader.seek, start)
            remaining = None if end is None else end - start + 1
            while remaining is None or remaining > 0:
                block = await asyncio.to_thread(reader.read, CHUNK if remaining is None else min(CHUNK, remaining))
                if not block:
                    break
                if remaining is not None:
                    remaining -= len(block)
                yield block
        finally:
            await asyncio.to_thread(reader.close)

    async def delete(self, key: str) -> None:
        """Remove the file."""
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self._path(key).unlink)

    async def close(self) -> None:
        """Nothing to release."""


class S3Storage:
    """Objects in an S3-compatible bucket, through aiobotocore (SigV4, path-style addressing)."""

    def __init__(
        self,
        *,
        bucket: str,
        region: str,
        endpoint_url: str | None,
        access_key: str,
        secret_key: str,
    ) -> None:
        self.bucket = bucket
        self._options: dict[str, Any] = {
            "region_name": region,
            "endpoint_url": endpoint_url or None,
            "aws_access_key_id": access_key or None,
            "aws_secret_access_key": secret_key or None,
            "config": AioConfig(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
                # Checksums only where S3 requires them: S3-compatible stores vary in what they accept.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        }
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: S3Client | None = None
        self._lock = asyncio.Lock()

    async def _s3(self) -> S3Client:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    stack = contextlib.AsyncExitStack()
                    self._client = await stack.enter_async_context(get_session().create_client("s3", **self._options))
                    self._stack = stack
        return self._client

    async def put(self, key: str, source: Path, content_type: str) -> None:
        """One PUT with the file's length (S3 makes the object visible only once it is complete)."""
        client = await self._s3()
        size = (await asyncio.to_thread(source.stat)).st_size
        reader = await asyncio.to_thread(source.open, "rb")
        try:
            await client.put_object(
                Bucket=self.bucket, Key=check_key(key), Body=reader, ContentLength=size, ContentType=content_type
            )
        except (ClientError, BotoCoreError, OSError) as exc:
            raise StorageError(key, exc) from exc
        finally:
            await asyncio.to_thread(reader.close)

    async def size(self, key: str) -> int | None:
        """HEAD the object."""
        client = await self._s3()
        try:
            head = await client.head_object(Bucket=self.bucket, Key=check_key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(key, exc) from exc
        except BotoCoreError as exc:
            raise StorageError(key, exc) from exc
        return int(head["ContentLength"])

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """A ranged GET, streamed."""
        client = await self._s3()
        wanted = f"bytes={start}-{'' if end is None else end}"
        try:
            response = await client.get_object(Bucket=self.bucket, Key=check_key(key), Range=wanted)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise ObjectMissing(key) from exc
            raise StorageError(key, exc) from exc
        except BotoCoreError as exc:
            raise StorageError(key, exc) from exc
        body = response["Body"]
        try:
            async for block in body.iter_chunks(CHUNK):
                yield block
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        """DELETE the object (S3 answers the same whether it existed or not)."""
        client = await self._s3()
        try:
            await client.delete_object(Bucket=self.bucket, Key=check_key(key))
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(key, exc) from exc

    async def close(self) -> None:
        """Close the client's connections."""
        if self._stack is not None:
            await self._stack.aclose()
        self._stack = None
        self._client = None


def make_storage(settings: Settings) -> ObjectStorage:
    """The backend the settings name."""
    if settings.media_storage == "local":
        return LocalStorage(settings.media_local_root)
    if settings.media_storage == "s3":
        return S3Storage(
            bucket=settings.media_s3_bucket,
            region=settings.media_s3_region,
            endpoint_url=settings.media_s3_endpoint or None,
            access_key=settings.media_s3_access_key,
            secret_key=settings.media_s3_secret_key,
        )
    raise RuntimeError(f"CC_MEDIA_STORAGE must be local or s3, not {settings.media_storage!r}")

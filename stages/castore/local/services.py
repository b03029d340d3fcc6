"""The local store as async castore services, and its ``local://`` address."""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, TypeVarTuple

from stages.castore.addresses import Backend
from stages.castore.errors import CastoreError, CorruptionError, NotFoundError, StoreError
from stages.castore.local.packs import hasher
from stages.castore.local.store import LocalStore, open_local_store
from stages.castore.nodes import Directory
from stages.castore.services import (
    READ_CHUNK,
    BlobReader,
    BlobService,
    BlobWriter,
    DirectoryPutter,
    DirectoryService,
    StoredFile,
    ValidatingPutter,
)

if TYPE_CHECKING:
    import asyncio

__all__ = ["BACKEND", "LocalBlobService", "LocalDirectoryService"]

# Reads up to this size run inline in the event loop; larger ones in a thread.
INLINE_READ = 64 << 10
# An async blob writer collects up to this many bytes while a batch is
# being written in its thread.
WRITE_BEHIND = 8 << 20


_R = TypeVar("_R")
_Ts = TypeVarTuple("_Ts")


async def _in_thread(fn: Callable[[*_Ts], _R], /, *args: *_Ts) -> _R:
    """``asyncio.to_thread``. asyncio is imported at the first call: the FUSE
    mount server reads stores through this package and never needs it."""
    import asyncio

    return await asyncio.to_thread(fn, *args)


# --- async facades -----------------------------------------------------------

class _LocalReader(BlobReader):
    def __init__(self, store: LocalStore, digest: bytes, size: int) -> None:
        self._store = store
        self.digest = digest
        self.size = size
        self._pos = 0
        self._hasher = hasher(size)
        self._checked = False

    def _read_sync(self, n: int) -> bytes:
        data = self._store.read_blob_at(self.digest, self._pos, n)
        self._hasher.update(data)
        self._pos += len(data)
        return data

    async def read(self, n: int = READ_CHUNK) -> bytes:
        n = max(0, min(n, self.size - self._pos))
        if n == 0:
            data = b""
        elif n <= INLINE_READ:
            data = self._read_sync(n)
        else:
            data = await _in_thread(self._read_sync, n)
        if self._pos == self.size and not self._checked:
            if self._hasher.digest() != self.digest:
                raise CorruptionError("blob", self.digest, self._store.where(self.digest))
            self._checked = True
        return data

    async def pread(self, offset: int, n: int) -> bytes:
        if n <= INLINE_READ:
            return self._store.read_blob_at(self.digest, offset, n)
        return await _in_thread(self._store.read_blob_at, self.digest, offset, n)

    async def verify(self) -> None:
        await _in_thread(self._store.verify_blob, self.digest)


class _LocalWriter(BlobWriter):
    """Write-behind: big writes are hashed as they come and go to a thread
    in batches (pwrite) while the caller fetches the next chunks. While a
    batch is being written, further writes are only collected (and hashed),
    up to :data:`WRITE_BEHIND` bytes;
    then the caller waits. So a slow disk or a busy machine means fewer,
    larger thread hops, and memory stays bounded. A failed batch raises at
    the next write, close or abort. The bytes of a collected write must
    not change: bytes, and views of bytes, are kept as they are; anything
    else (a bytearray the caller may reuse) is copied first."""

    def __init__(self, store: LocalStore) -> None:
        self._writer = store.open_writer()
        # Serializes the sync writer: an abort from a cancelled caller waits
        # for a batch still being written in its thread.
        self._lock = threading.Lock()
        self._pending: asyncio.Future | None = None
        self._batch: list[bytes | memoryview] = []
        self._batched = 0
        self.closed = False

    def _write_batch(self, batch: list[bytes | memoryview], then_close: bool = False
                     ) -> bytes | None:
        with self._lock:
            for data in batch:
                self._writer.append(data)
            return self._writer.close() if then_close else None

    async def _settle(self) -> None:
        """Wait for the batch in flight; raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending

    def _take_batch(self) -> list[bytes | memoryview]:
        batch, self._batch, self._batched = self._batch, [], 0
        return batch

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise ValueError("write to a closed blob writer")
        if not data:
            return
        if self._pending is None and not self._batch and len(data) <= INLINE_READ \
                and self._writer.only_buffers(len(data)):
            self._writer.write(data)  # only buffers and hashes: cheap
            return
        if not (isinstance(data, bytes)
                or (isinstance(data, memoryview) and isinstance(data.obj, bytes))):
            data = bytes(data)
        # Hashed here, stored in the thread: the hash runs while the thread
        # writes the previous batch (each half alone is ~0.35-0.5 CPU s/GiB).
        self._writer.hash(data)
        self._batch.append(data)
        self._batched += len(data)
        if self._pending is not None and not self._pending.done() \
                and self._batched < WRITE_BEHIND:
            return
        await self._settle()
        import asyncio

        self._pending = asyncio.ensure_future(
            asyncio.to_thread(self._write_batch, self._take_batch()))

    async def close(self) -> bytes:
        try:
            await self._settle()
        except BaseException:
            await self.abort()
            raise
        digest = await _in_thread(self._write_batch, self._take_batch(), True)
        assert digest is not None  # then_close: the writer's digest
        self.closed = True
        return digest

    async def abort(self) -> None:
        self.closed = True
        self._take_batch()
        pending, self._pending = self._pending, None
        if pending is not None:
            # Its error, if any, is superseded by the abort; the thread it
            # runs in holds the lock, so the abort below waits for it.
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())

        def abort() -> None:
            with self._lock:
                self._writer.abort()

        await _in_thread(abort)


class LocalBlobService(BlobService):
    """Async blob service over a shared :class:`LocalStore`."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    async def stat(self, digest: bytes) -> int | None:
        return self.store.blob_size(digest)

    async def open_read(self, digest: bytes) -> BlobReader:
        size = self.store.blob_size(digest)
        if size is None:
            raise NotFoundError("blob", digest)
        return _LocalReader(self.store, digest, size)

    def open_write(self) -> BlobWriter:
        return _LocalWriter(self.store)

    async def put_files(self, paths: Sequence[bytes]) -> list[StoredFile]:
        return await _in_thread(self.store.put_files, paths)


class _LocalPutter(ValidatingPutter):
    def __init__(self, store: LocalStore) -> None:
        super().__init__()
        self._local = store

    async def _store(self, directories: list[Directory]) -> None:
        await _in_thread(self._local.put_directories, directories)


class LocalDirectoryService(DirectoryService):
    """Async directory service over a shared :class:`LocalStore`."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    async def get(self, digest: bytes) -> Directory | None:
        return self.store.get_directory(digest)

    def put_multiple_start(self) -> DirectoryPutter:
        return _LocalPutter(self.store)


# --- addresses ---------------------------------------------------------------

def _store_from_url(url: urllib.parse.SplitResult, address: str) -> LocalStore:
    _check(address)
    path = urllib.parse.unquote(url.path)
    try:
        return open_local_store(Path(path))
    except StoreError:
        raise
    except (OSError, CastoreError) as exc:
        raise StoreError(address, str(exc)) from exc


def _reader(blob_address: str | None, directory_address: str | None) -> LocalStore:
    # One store serves both sides; open_reader gives one address at a time
    # when they differ.
    address = blob_address or directory_address
    assert address is not None
    return _store_from_url(urllib.parse.urlsplit(address), address)


def _check(address: str) -> None:
    url = urllib.parse.urlsplit(address)
    path = urllib.parse.unquote(url.path)
    if url.netloc or not path.startswith("/") or url.query or url.fragment:
        raise StoreError(address, "a local store address is local:///absolute/dir")


BACKEND = Backend(
    blobs=lambda url, addr: LocalBlobService(_store_from_url(url, addr)),
    directories=lambda url, addr: LocalDirectoryService(_store_from_url(url, addr)),
    reader=_reader, check=_check)

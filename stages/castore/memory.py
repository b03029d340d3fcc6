"""In-memory castore backends (``memory://``): for tests and throwaway work.

Nothing is persisted; the store dies with the process.
"""

from __future__ import annotations

import blake3

from stages.castore.addresses import Backend
from stages.castore.errors import CorruptionError, NotFoundError
from stages.castore.nodes import Directory, validate_digest
from stages.castore.services import (
    READ_CHUNK,
    BlobReader,
    BlobService,
    BlobWriter,
    DirectoryPutter,
    DirectoryService,
    ValidatingPutter,
)

__all__ = ["MemoryBlobService", "MemoryDirectoryService"]


class _MemoryReader(BlobReader):
    def __init__(self, digest: bytes, data: bytes) -> None:
        self.digest = digest
        self.size = len(data)
        self._data = data
        self._pos = 0
        self._hasher = blake3.blake3()

    async def read(self, n: int = READ_CHUNK) -> bytes:
        chunk = self._data[self._pos:self._pos + n]
        self._pos += len(chunk)
        self._hasher.update(chunk)
        if self._pos == self.size and self._hasher.digest() != self.digest:
            raise CorruptionError("blob", self.digest, "memory://")
        return chunk

    async def pread(self, offset: int, n: int) -> bytes:
        return self._data[offset:offset + n]

    async def verify(self) -> None:
        if blake3.blake3(self._data).digest() != self.digest:
            raise CorruptionError("blob", self.digest, "memory://")


class _MemoryWriter(BlobWriter):
    def __init__(self, store: dict[bytes, bytes]) -> None:
        self._store = store
        self._parts: list[bytes] = []
        self._hasher = blake3.blake3()
        self.closed = False

    async def write(self, data: bytes) -> None:
        self._hasher.update(data)
        # Bytes, and views of bytes, cannot change: kept as they are (a view
        # of a received gRPC message is not copied twice); anything else (a
        # bytearray the caller may reuse) is copied now.
        if not (isinstance(data, bytes)
                or (isinstance(data, memoryview) and isinstance(data.obj, bytes))):
            data = bytes(data)
        self._parts.append(data)

    async def close(self) -> bytes:
        digest = self._hasher.digest()
        if digest not in self._store:  # a blob it has costs no join
            self._store[digest] = b"".join(self._parts)
        self._parts = []
        self.closed = True
        return digest

    async def abort(self) -> None:
        self._parts = []
        self.closed = True


class MemoryBlobService(BlobService):
    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}

    async def stat(self, digest: bytes) -> int | None:
        validate_digest(digest)
        data = self.blobs.get(digest)
        return None if data is None else len(data)

    async def open_read(self, digest: bytes) -> BlobReader:
        validate_digest(digest)
        data = self.blobs.get(digest)
        if data is None:
            raise NotFoundError("blob", digest)
        return _MemoryReader(digest, data)

    def open_write(self) -> BlobWriter:
        return _MemoryWriter(self.blobs)


class _MemoryPutter(ValidatingPutter):
    def __init__(self, store: dict[bytes, Directory]) -> None:
        super().__init__()
        self._directories = store

    async def _store(self, directories: list[Directory]) -> None:
        for d in directories:
            self._directories[d.digest] = d


class MemoryDirectoryService(DirectoryService):
    def __init__(self) -> None:
        self.directories: dict[bytes, Directory] = {}

    async def get(self, digest: bytes) -> Directory | None:
        validate_digest(digest)
        return self.directories.get(digest)

    def put_multiple_start(self) -> DirectoryPutter:
        return _MemoryPutter(self.directories)


BACKEND = Backend(
    blobs=lambda url, addr: MemoryBlobService(),
    directories=lambda url, addr: MemoryDirectoryService(),
    not_servable="a memory:// store lives inside one process and cannot be served by "
                 "the FUSE mount server")

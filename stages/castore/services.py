"""The castore service interfaces: blobs by digest, directories by digest.

Both are async. Backends (memory, the local on-disk store, gRPC clients)
implement these classes; everything else in ocibuild talks to the interfaces
only, and picks a backend by address (see :mod:`stages.castore.addresses`).

Blobs are written as streams through a :class:`BlobWriter` (bounded memory;
the digest is known only at the end) and read through a :class:`BlobReader`
that verifies the digest: a reader that reaches the end of a blob whose bytes
no longer hash to its digest raises :class:`CorruptionError` instead of
returning the last chunk.

Directories are uploaded with a :class:`DirectoryPutter`, leaves to root: each
directory may only reference directories sent before it in the same upload,
the last one sent is the root, and every directory sent must be reachable from
it. :class:`ClosureValidator` holds those rules so every backend checks them
the same way.
"""

from __future__ import annotations

import abc
import collections
import os
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol, runtime_checkable

import attrs
import blake3

from stages.castore.errors import CorruptionError, IngestError, NotFoundError, ValidationError
from stages.castore.nodes import Directory, validate_digest

__all__ = [
    "BlobReader",
    "BlobService",
    "BlobWriter",
    "ClosureValidator",
    "DirectoryPutter",
    "DirectoryService",
    "READ_CHUNK",
    "ValidatingPutter",
    "open_regular_file",
    "StoreReader",
    "StoredFile",
]

# Chunk size for streaming blob bytes around (reads, gRPC messages, copies).
READ_CHUNK = 1 << 20


class BlobReader(abc.ABC):
    """Reads one blob. Sequential reads verify the digest at the end."""

    digest: bytes
    size: int

    @abc.abstractmethod
    async def read(self, n: int = READ_CHUNK) -> bytes:
        """Up to ``n`` bytes from the current position; b"" at the end."""

    @abc.abstractmethod
    async def pread(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset``, unverified unless verify() ran."""

    @abc.abstractmethod
    async def verify(self) -> None:
        """Hash the whole blob once; raise CorruptionError on mismatch."""

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> BlobReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class BlobWriter(abc.ABC):
    """Writes one blob. Nothing is visible in the store before close()."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def close(self) -> bytes:
        """Make the blob visible; return its digest."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Drop what was written; nothing becomes visible."""

    async def __aenter__(self) -> BlobWriter:
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        # close() is explicit (it returns the digest); leaving the block
        # without it, or with an exception, drops the partial blob.
        if exc_type is not None or not getattr(self, "closed", False):
            await self.abort()


@attrs.frozen(kw_only=True)
class StoredFile:
    """A regular file stored as a blob by :meth:`BlobService.put_files`."""

    digest: bytes
    size: int
    mode: int  # st_mode of the file as opened (fstat), for the exec bit


class BlobService(abc.ABC):
    """Blobs addressed by the BLAKE3 digest of their bytes."""

    @abc.abstractmethod
    async def stat(self, digest: bytes) -> int | None:
        """The blob's size, or None when it is not in the store."""

    async def has(self, digest: bytes) -> bool:
        return await self.stat(digest) is not None

    @abc.abstractmethod
    async def open_read(self, digest: bytes) -> BlobReader:
        """A reader for the blob; NotFoundError when it is missing."""

    @abc.abstractmethod
    def open_write(self) -> BlobWriter:
        """A writer for a new blob."""

    async def put(self, data: bytes) -> bytes:
        writer = self.open_write()
        async with writer:
            await writer.write(data)
            return await writer.close()

    async def put_files(self, paths: Sequence[bytes]) -> list[StoredFile]:
        """Store each regular file at ``paths`` as a blob, in order.

        Symlinks are not followed; anything but a regular file raises
        IngestError naming it. This default streams one file at a time
        through open_write(); backends with a bulk path override it.
        """
        results = []
        for path in paths:
            fd, st = open_regular_file(path)
            try:
                size = 0
                writer = self.open_write()
                async with writer:
                    while chunk := await _read_in_thread(fd):
                        size += len(chunk)
                        await writer.write(chunk)
                    digest = await writer.close()
            except OSError as exc:
                raise IngestError(os.fsdecode(path), f"cannot read: {exc.strerror}") from exc
            finally:
                os.close(fd)
            results.append(StoredFile(digest=digest, size=size, mode=st.st_mode))
        return results

    async def get(self, digest: bytes) -> bytes:
        """The whole blob, verified (for small blobs; stream big ones)."""
        parts = []
        async with await self.open_read(digest) as reader:
            while chunk := await reader.read():
                parts.append(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        pass


def open_regular_file(path: bytes) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading if it is a regular file; never follow a symlink.

    O_NONBLOCK keeps a FIFO swapped in after a walk from blocking the open;
    fstat of the opened fd decides. The caller closes the fd. Anything else
    raises IngestError naming the path.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise IngestError(os.fsdecode(path), f"cannot open: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise IngestError(os.fsdecode(path), f"cannot stat: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise IngestError(os.fsdecode(path), "not a regular file")
    return fd, st


class DirectoryPutter(abc.ABC):
    """One leaves-to-root upload of a directory tree."""

    @abc.abstractmethod
    async def put(self, directory: Directory) -> None: ...

    @abc.abstractmethod
    async def close(self) -> bytes:
        """Check the upload is one connected tree; store it; return the root digest."""


class ValidatingPutter(DirectoryPutter):
    """A putter that checks the upload rules (ClosureValidator) before
    storing anything; backends implement :meth:`_store`."""

    def __init__(self) -> None:
        self._closure = ClosureValidator()

    async def put(self, directory: Directory) -> None:
        self._closure.add(directory)

    async def close(self) -> bytes:
        directories, root = self._closure.finalize()
        await self._store(directories)
        return root

    @abc.abstractmethod
    async def _store(self, directories: list[Directory]) -> None:
        """Store a validated upload, leaves first, all or nothing."""


class DirectoryService(abc.ABC):
    """Directories addressed by the digest of their canonical encoding."""

    @abc.abstractmethod
    async def get(self, digest: bytes) -> Directory | None:
        """One directory, or None when it is not in the store."""

    async def get_recursive(self, digest: bytes) -> AsyncIterator[Directory]:
        """The tree rooted at ``digest``, breadth first, each directory once.

        A missing root raises NotFoundError; a missing directory below it
        raises NotFoundError too (the store is then incomplete).
        """
        validate_digest(digest)
        seen = {digest}
        queue = collections.deque([digest])
        while queue:
            current = queue.popleft()
            directory = await self.get(current)
            if directory is None:
                raise NotFoundError("directory", current)
            yield directory
            for child in directory.directories:
                if child.digest not in seen:
                    seen.add(child.digest)
                    queue.append(child.digest)

    @abc.abstractmethod
    def put_multiple_start(self) -> DirectoryPutter: ...

    async def put_tree(self, directories: list[Directory]) -> bytes:
        """Upload directories given leaves to root; return the root digest."""
        putter = self.put_multiple_start()
        for d in directories:
            await putter.put(d)
        return await putter.close()

    async def aclose(self) -> None:
        pass


class ClosureValidator:
    """The rules of a leaves-to-root directory upload, for every backend.

    Feed each directory to :meth:`add` in the order received, then call
    :meth:`finalize` for the directories in an order safe to store (leaves
    first) and the root's digest.
    """

    def __init__(self) -> None:
        self._received: dict[bytes, Directory] = {}
        self._order: list[bytes] = []

    def add(self, directory: Directory) -> bytes:
        for child in directory.directories:
            known = self._received.get(child.digest)
            if known is None:
                raise ValidationError(
                    "put-order",
                    "directory references a directory not sent before it in this upload",
                    name=child.name, digest=child.digest)
            if known.size != child.size:
                raise ValidationError(
                    "directory-size",
                    f"DirectoryNode says size {child.size}, the directory has {known.size}",
                    name=child.name, digest=child.digest)
        digest = directory.digest
        if digest not in self._received:
            self._received[digest] = directory
            self._order.append(digest)
        return digest

    def finalize(self) -> tuple[list[Directory], bytes]:
        if not self._order:
            raise ValidationError("put-empty", "an upload must contain at least the root")
        root = self._order[-1]
        # The last one sent is the root; everything sent must hang below it.
        reachable = {root}
        stack = [root]
        while stack:
            for child in self._received[stack.pop()].directories:
                if child.digest not in reachable:
                    reachable.add(child.digest)
                    stack.append(child.digest)
        for digest in self._order:
            if digest not in reachable:
                raise ValidationError("put-disconnected",
                                      "directory is not reachable from the root "
                                      "(the last directory sent)", digest=digest)
        return [self._received[d] for d in self._order], root


def verify_bytes(kind: str, digest: bytes, data: bytes, where: str = "") -> None:
    if blake3.blake3(data).digest() != digest:
        raise CorruptionError(kind, digest, where)


async def _read_in_thread(fd: int) -> bytes:
    import asyncio  # here: the FUSE mount server imports this module, not asyncio

    return await asyncio.to_thread(os.read, fd, READ_CHUNK)


@runtime_checkable
class StoreReader(Protocol):
    """What the FUSE server needs from a store: sizes, ranges, checks, dirs.

    A reader may also offer ``map_blob(digest)``, a zero-copy mapping of a
    blob's bytes (the local store's :class:`~stages.castore.local.BlobMap`);
    the FUSE layer uses it where it exists.
    """

    def blob_size(self, digest: bytes) -> int | None: ...

    def read_blob_at(self, digest: bytes, offset: int, n: int) -> bytes: ...

    def verify_blob(self, digest: bytes,
                    on_chunk: Callable[[int, memoryview], None] | None = None) -> None: ...

    def get_directory(self, digest: bytes) -> Directory | None: ...

"""The local store's pack files: append-only blob bytes, one writer per pack.

A writer claims a pack by holding ``flock(LOCK_EX)`` on it for as long as it
appends; :class:`PackPool` hands packs out (an idle one of this process, an
unlocked one with room, or a new one) and takes them back. :func:`commit` is
the crash-safety order: fdatasync every pack, then one index transaction.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import blake3

from stages.castore.errors import StoreError
from stages.castore.local.index import BlobRow, Index

__all__ = [
    "PACK_LIMIT",
    "SMALL_BLOB",
    "STREAM_CHUNK",
    "Pack",
    "PackPool",
    "commit",
    "hasher",
    "start_writeback",
]

# A writer starts a new pack once its pack has grown past this.
PACK_LIMIT = 1 << 30
# Blobs up to this size are buffered whole; larger ones stream.
SMALL_BLOB = 1 << 20
# Stream chunk for big files and for verification.
STREAM_CHUNK = 4 << 20
# Above this size, hashing uses blake3's own threads.
THREADED_HASH = 16 << 20
# A streamed blob asks the kernel to start writing its bytes to disk every
# this many bytes, so the disk works while the rest arrives and the fdatasync
# at the commit has little left to do.
WRITEBACK_STEP = 16 << 20


def hasher(size: int) -> blake3.blake3:
    """A BLAKE3 hasher for a blob of ``size`` bytes (threaded when big)."""
    if size >= THREADED_HASH:
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        # The C library this process runs on (find_library would run ldconfig).
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of a file to disk, without waiting for it.

    A hint for speed only: durability still comes from the fdatasync before
    the commit. Without it the kernel writes dirty pages only at that
    fdatasync (or once gigabytes are dirty), so a big blob's upload and its
    disk write would run one after the other. A no-op where the C library
    has no ``sync_file_range``; its errors are ignored (fdatasync reports
    real ones).
    """
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class Pack:
    """One pack file claimed for appending (its flock held) by one user at a time."""

    def __init__(self, pool: PackPool, pack_id: int, fd: int, end: int) -> None:
        self.pool = pool
        self.id = pack_id
        self.fd = fd
        self.pos = end          # where the next append goes
        self.committed = end    # what the index knows
        self.size = end         # the file's length: past pos, dropped bytes
        self.staged: list[BlobRow] = []

    @property
    def path(self) -> Path:
        return self.pool.path(self.id)

    def append(self, buffers: Sequence[bytes | memoryview]) -> int:
        """Write buffers back to back at the end; return where the first starts."""
        start = self.pos
        pending = [memoryview(b) for b in buffers if len(b)]
        try:
            while pending:
                written = os.pwritev(self.fd, pending[:1024], self.pos)
                self.pos += written
                while pending and written >= len(pending[0]):
                    written -= len(pending[0])
                    pending.pop(0)
                if written:
                    pending[0] = pending[0][written:]
        except OSError as exc:
            raise StoreError(self.pool.address, f"cannot write {self.path}: {exc}") from exc
        finally:
            self.size = max(self.size, self.pos)
        return start

    def cut(self, pos: int) -> None:
        """Forget everything appended from ``pos`` on (only uncommitted bytes)."""
        assert pos >= self.committed
        self.staged = [s for s in self.staged if s[1] < pos]
        self.pos = pos
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, pos)
            self.size = pos

    def drop(self, pos: int) -> None:
        """Forget everything appended from ``pos`` on, as :meth:`cut`, but
        keep the file's length: the next append overwrites the dropped bytes'
        page cache pages instead of the kernel freeing them now and
        allocating new ones (half the CPU of a write, measured). Nothing
        points at them; :meth:`trim` cuts them off before a commit and when
        the pack is closed, and after a crash the next claim truncates them."""
        assert pos >= self.committed
        self.staged = [s for s in self.staged if s[1] < pos]
        self.pos = pos

    def trim(self) -> None:
        """Cut off bytes dropped past ``pos`` (see :meth:`drop`)."""
        if self.size > self.pos:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.pos)
                self.size = self.pos

    def stage(self, digest: bytes, offset: int, length: int) -> None:
        self.staged.append((digest, offset, length, self.id))

    def take_staged(self) -> tuple[int, list[BlobRow]]:
        """Hand over what is staged, for a commit of everything up to ``pos``."""
        staged, self.staged = self.staged, []
        return self.pos, staged

    def commit(self) -> None:
        """Make the staged blobs durable and visible: fdatasync, then the index."""
        if not self.staged and self.pos == self.committed:
            return
        self.trim()  # or the fdatasync would write dropped bytes too
        pos, rows = self.take_staged()
        commit(self.pool, {self: pos}, rows)

    def rollback(self) -> None:
        self.cut(self.committed)

    def close(self) -> None:
        self.trim()
        with contextlib.suppress(OSError):
            os.close(self.fd)  # also drops the flock


def commit(pool: PackPool, ends: dict[Pack, int], rows: list[BlobRow]) -> None:
    """One fdatasync per pack, then one index transaction: the crash-safety order."""
    for pack in ends:
        try:
            os.fdatasync(pack.fd)
        except OSError as exc:
            raise StoreError(pool.address, f"cannot sync {pack.path}: {exc}") from exc
    pool.index.commit_blobs(rows, [(end, pack.id) for pack, end in ends.items()])
    for pack, end in ends.items():
        pack.committed = max(pack.committed, end)


class PackPool:
    """The packs of one store directory that this process appends to."""

    def __init__(self, directory: Path, address: str, index: Index) -> None:
        self.directory = directory
        self.address = address
        self.index = index
        self.idle: list[Pack] = []
        self._lock = threading.Lock()
        self._closed = False

    def path(self, pack_id: int) -> Path:
        return self.directory / f"{pack_id:08d}.pack"

    def acquire(self) -> Pack:
        """A pack for this caller alone until :meth:`release`."""
        with self._lock:
            if self._closed:
                raise StoreError(self.address, "the store is closed")
            if self.idle:
                return self.idle.pop()
        return self._claim()

    def release(self, pack: Pack) -> None:
        """Give a pack back; whatever was not committed is dropped."""
        if pack.staged or pack.pos != pack.committed:
            pack.rollback()
        with self._lock:
            if pack.pos < PACK_LIMIT and not self._closed:
                self.idle.append(pack)
                return
        pack.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            packs, self.idle = self.idle, []
        for pack in packs:
            pack.close()

    def _claim(self) -> Pack:
        """A pack nobody appends to: an unlocked one with room, else a new one."""
        for pack_id in self.index.packs_below(PACK_LIMIT):
            try:
                fd = os.open(self.path(pack_id), os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            # Holding the lock, ``end`` is authoritative: only holders commit.
            end = self.index.pack_end(pack_id)
            try:
                if os.fstat(fd).st_size > end:
                    os.ftruncate(fd, end)  # a dead writer's uncommitted tail
            except OSError as exc:
                os.close(fd)
                raise StoreError(self.address, f"cannot reclaim {self.path(pack_id)}: "
                                               f"{exc}") from exc
            return Pack(self, pack_id, fd, end)
        with self.index.new_pack() as pack_id:
            path = self.path(pack_id)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise StoreError(self.address, f"cannot create pack {path}: {exc}") from exc
        return Pack(self, pack_id, fd, 0)

"""The persistent local castore (``local:///abs/dir``): pack files plus an index.

Why this shape: the disk here punishes per-file metadata (one file per blob,
written through a temp file and a rename, took 9-14 s over a copy of Python's
stdlib where ``nix-store --add`` took 2.9 s). So blobs are appended to a few
large pack files and found through one SQLite index.

On-disk layout under the store directory::

    index.sqlite (+ -wal, -shm)   SQLite in WAL mode:
        meta(key, value)            format version
        packs(id, end)              one row per pack; ``end`` = committed length
        blobs(digest, pack, offset, length)
        directories(digest, data)   canonical protobuf bytes of each Directory
    packs/00000001.pack ...       append-only blob bytes, back to back

Writers. A writer claims a pack by holding ``flock(LOCK_EX)`` on it for as
long as it appends; one pack has at most one writer, across threads and
processes, so several processes can write into one store at once (each into
its own pack; their index commits serialize in SQLite, which is short). A
writer appends bytes, then commits a batch: ``fdatasync`` of the pack, then one
SQLite transaction inserting the batch's blob rows and the pack's new
``end``. Blobs are deduplicated by digest (``INSERT OR IGNORE``; a blob
streamed through a writer that turns out to exist already is dropped: the
pack's ``pos`` goes back and the next append overwrites those bytes, which
are truncated off before the next commit, when the pack is closed, or by
the next claim after a crash; bulk import cuts such a blob off at once).
A streamed blob starts the disk writing its bytes every
:data:`WRITEBACK_STEP` bytes (``sync_file_range``, no wait), so its
commit's fdatasync has little left to write.

Crash safety. A blob is visible only through its index row, and the row is
committed only after the bytes it points to are on disk (fdatasync first).
So a crash (SIGKILL, power loss) at any point leaves either the committed
row with durable bytes, or no row: never a partial blob. What a dead writer
leaves behind is garbage at its pack's tail, past ``packs.end``; nothing points
at it. The next writer that claims that pack (the flock is free once its
holder is dead) truncates it to ``end`` before appending, so the garbage is
reclaimed. Bytes of a duplicate lost in an ``INSERT OR IGNORE`` race between
processes stay as dead bytes inside a pack (harmless; a future compaction
could reclaim them; none exists yet).

Reads. ``read_blob_at`` is positional and unverified (FUSE serves ranges;
``map_blob`` hands out a zero-copy view of the mapped pack for the kernel to
copy from);
sequential readers (:class:`LocalBlobService` readers) hash as they go and
raise :class:`CorruptionError` naming the blob instead of returning the last
chunk when the bytes no longer match; ``verify_blob`` hashes a blob whole;
``get_directory`` verifies every directory it returns.

Caveats:

- One :class:`LocalStore` per process per directory (use
  :func:`open_local_store`); it is thread-safe. It is not fork-safe: open it
  again in the child.
- A corrupt index is detected when it cannot be read as SQLite or lacks our
  tables (StoreError naming the path); there is no full integrity check on open.
- Packs never shrink except for uncommitted tails, so deleted data is not a
  thing yet (there is no delete or GC).
- A dropped duplicate's bytes stay in the pack file (never pointed at) while
  the pack is idle in this process, so their page cache pages can be reused:
  up to one blob's size per idle pack, and the early writeback may already
  have sent them to disk (wasted I/O, not wasted space).

Measured here (2 cores shared with other work, so noisy; rerun with
``python -m bench castore_ingest castore_memory``):

- Ingest of a fresh copy of pyenv's lib/python3.11 (50,725 files, 941 MB,
  751 MB after dedup) into a fresh store, 3 runs back to back with
  ``nix-store --add`` of the same copy: 5.7 / 14.4 / 9.7 s against
  12.4 / 59.9 / 24.4 s, ratios 0.46 / 0.24 / 0.40x (median 0.40x); b3sum over
  the same files 1.6-4.3 s. In one 10.9 s ingest on the busy machine the
  process used 6.1 s of CPU (user 3.6, sys 2.5); the rest waited, mostly on
  the disk: fdatasync'ed sequential writes run at about 300 MB/s here, so
  ~2.5 s of any durable ingest of those 751 MB is the disk. Phases (warm
  cache): walk 0.3 s, put_files 3.2 s without syncs / 3.7-4.5 s with,
  building the Directory values 0.7-1.1 s, storing them 0.2 s.
- Peak memory above the idle process (31 MiB) with a 1 GiB file: ingest
  +8.5 MiB, streamed write +3.2 MiB, verified sequential read +2.2 MiB,
  verify_blob +12.1 MiB (blake3's threads).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import queue
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from stages.castore.addresses import Backend
from stages.castore.errors import (
    CastoreError,
    CorruptionError,
    IngestError,
    NotFoundError,
    StoreError,
)
from stages.castore.nodes import Directory, directory_from_proto, validate_digest
from stages.castore.services import (
    READ_CHUNK,
    BlobReader,
    BlobService,
    BlobWriter,
    DirectoryPutter,
    DirectoryService,
    StoredFile,
    ValidatingPutter,
    open_regular_file,
)
from stages.proto import castore_pb2

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "LocalBlobService",
    "LocalBlobWriter",
    "LocalDirectoryService",
    "LocalStore",
    "open_local_store",
]

FORMAT_VERSION = "1"
# A writer starts a new pack once its pack has grown past this.
PACK_LIMIT = 1 << 30
# Blobs up to this size are buffered whole; larger ones stream.
SMALL_BLOB = 1 << 20
# Stream chunk for big files and for verification.
STREAM_CHUNK = 4 << 20
# Above this size, hashing uses blake3's own threads.
THREADED_HASH = 16 << 20
# A bulk import commits (one fdatasync + one transaction) per this many bytes
# or blobs, whichever comes first.
BATCH_BYTES = 32 << 20
BATCH_BLOBS = 4096
# Reads up to this size run inline in the event loop; larger ones in a thread.
INLINE_READ = 64 << 10
# An async blob writer collects up to this many bytes while a batch is
# being written in its thread.
WRITE_BEHIND = 8 << 20
# A streamed blob asks the kernel to start writing its bytes to disk every
# this many bytes, so the disk works while the rest arrives and the fdatasync
# at the commit has little left to do.
WRITEBACK_STEP = 16 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs (id INTEGER PRIMARY KEY, end INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    digest BLOB PRIMARY KEY, pack INTEGER NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS directories (
    digest BLOB PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
"""


async def _in_thread(fn: Callable, /, *args: object) -> object:
    """``asyncio.to_thread``. asyncio is imported at the first call: the FUSE
    mount server reads stores through this module and never needs it."""
    import asyncio

    return await asyncio.to_thread(fn, *args)


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


def _start_writeback(fd: int, offset: int, length: int) -> None:
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


def _hasher(size: int) -> blake3.blake3:
    if size >= THREADED_HASH:
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()


class _Pack:
    """One pack file claimed for appending (its flock held) by one user at a time."""

    def __init__(self, store: LocalStore, pack_id: int, fd: int, end: int) -> None:
        self.store = store
        self.id = pack_id
        self.fd = fd
        self.pos = end          # where the next append goes
        self.committed = end    # what the index knows
        self.size = end         # the file's length: past pos, dropped bytes
        self.staged: list[tuple[bytes, int, int, int]] = []

    @property
    def path(self) -> Path:
        return self.store._pack_path(self.id)

    def append(self, buffers: Sequence[bytes]) -> int:
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
            raise StoreError(str(self.store.root), f"cannot write {self.path}: {exc}") from exc
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

    def take_staged(self) -> tuple[int, list[tuple[bytes, int, int, int]]]:
        """Hand over what is staged, for a commit of everything up to ``pos``."""
        staged, self.staged = self.staged, []
        return self.pos, staged

    def commit(self) -> None:
        """Make the staged blobs durable and visible: fdatasync, then the index."""
        if not self.staged and self.pos == self.committed:
            return
        self.trim()  # or the fdatasync would write dropped bytes too
        pos, rows = self.take_staged()
        _commit(self.store, {self: pos}, rows)

    def rollback(self) -> None:
        self.cut(self.committed)

    def close(self) -> None:
        self.trim()
        with contextlib.suppress(OSError):
            os.close(self.fd)  # also drops the flock


def _commit(store: LocalStore, ends: dict[_Pack, int], rows: list[tuple[bytes, int, int, int]]
            ) -> None:
    """One fdatasync per pack, then one index transaction: the crash-safety order."""
    for pack in ends:
        try:
            os.fdatasync(pack.fd)
        except OSError as exc:
            raise StoreError(str(store.root), f"cannot sync {pack.path}: {exc}") from exc
    with store._write_txn() as conn:
        conn.executemany(
            "INSERT OR IGNORE INTO blobs (digest, offset, length, pack) VALUES (?, ?, ?, ?)",
            rows)
        conn.executemany("UPDATE packs SET end = ? WHERE id = ?",
                         [(end, pack.id) for pack, end in ends.items()])
    for pack, end in ends.items():
        pack.committed = max(pack.committed, end)


class _Committer:
    """Commits batches handed over by import threads, so they never wait on
    fdatasync; batches queued meanwhile are merged into one commit."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.queue: queue.SimpleQueue[tuple[_Pack, int, list] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="castore-commit", daemon=True)
        self.thread.start()

    def submit(self, pack: _Pack) -> None:
        if self.error is not None:
            raise self.error
        pos, rows = pack.take_staged()
        self.queue.put((pack, pos, rows))

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self.store._drop_thread_conn()

    def _loop(self) -> None:
        done = False
        while not done:
            items = [self.queue.get()]
            while True:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            ends: dict[_Pack, int] = {}
            rows: list[tuple[bytes, int, int, int]] = []
            for item in items:
                if item is None:
                    done = True
                    continue
                pack, pos, staged = item
                ends[pack] = max(pos, ends.get(pack, 0))
                rows.extend(staged)
            if ends and self.error is None:
                try:
                    _commit(self.store, ends, rows)
                except BaseException as exc:  # noqa: BLE001 - finish() re-raises it
                    self.error = exc

    def finish(self) -> None:
        """Wait until everything submitted is committed; re-raise its error."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class _InlineCommitter:
    """A committer that commits at once, in the calling thread.

    For a call importing one file, where there is nothing to overlap the
    fdatasync with: it saves starting a thread (and its SQLite connection)
    per call, which is most of the cost of importing a small file.
    """

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.error: BaseException | None = None

    def submit(self, pack: _Pack) -> None:
        pos, rows = pack.take_staged()
        _commit(self.store, {pack: pos}, rows)

    def finish(self) -> None:
        pass


class BlobMap:
    """A committed blob's bytes in a read-only shared mapping of its pack.

    Zero-copy and NOT verified. Meant to be handed to the kernel (a FUSE
    reply, a write): the kernel copies straight from the pack's page cache,
    and a pack truncated under the mapping then makes that syscall fail with
    EFAULT. Touching ``view``'s bytes from Python instead would raise SIGBUS
    in that case, so don't. Pages the kernel touched through the mapping
    count in the process's RSS (shared file pages) until :meth:`forget`.
    """

    __slots__ = ("_map", "_start", "size", "view")

    def __init__(self, mapping: mmap.mmap, start: int, size: int) -> None:
        self._map = mapping
        self._start = start
        self.size = size
        self.view = memoryview(mapping)[start:start + size]

    def intact(self) -> bool:
        """Whether the pack still holds all of the blob (one fstat)."""
        return self.size == 0 or self._map.size() >= self._start + self.size

    def forget(self, lo: int, hi: int) -> None:
        """Unmap the blob's pages in [lo, hi) from this process (MADV_DONTNEED;
        the page cache keeps them): keeps RSS flat while serving big files."""
        page = mmap.PAGESIZE
        first = (self._start + max(lo, 0)) // page * page
        last = self._start + min(hi, self.size)
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


class LocalStore:
    """The synchronous core of the local store. Thread-safe.

    Writers: :meth:`open_writer` (streaming), :meth:`put_blob` (bytes),
    :meth:`put_files` (bulk import of files, parallel, batched),
    :meth:`put_directories`.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._address = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(self._address, "exists and is not a directory")
        try:
            (self.root / "packs").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(self._address, f"cannot create the store layout: {exc}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(self._address, "is not writable")
        self._db_path = self.root / "index.sqlite"
        if self._db_path.exists() and not self._db_path.is_file():
            raise StoreError(self._address, f"{self._db_path} is not a regular file")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._idle_packs: list[_Pack] = []
        self._read_fds: dict[int, int] = {}
        self._maps: dict[int, mmap.mmap] = {}
        self._locations: dict[bytes, tuple[int, int, int]] = {}
        self._closed = False
        try:
            conn = self._conn()
            conn.executescript(_SCHEMA)
            with self._write_txn() as c:
                c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('format', ?)",
                          (FORMAT_VERSION,))
            version = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(self._address,
                             f"index {self._db_path} is unusable ({exc}); it is corrupt or "
                             f"not an ocibuild store") from exc
        if version != FORMAT_VERSION:
            raise StoreError(self._address, f"store format {version!r}, this ocibuild reads "
                                            f"{FORMAT_VERSION!r}")

    def __repr__(self) -> str:
        return f"LocalStore({self._address!r})"

    # --- plumbing ----------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self._db_path, timeout=60, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode = WAL")
                # With the pack fdatasync'ed before each commit, NORMAL can at worst
                # lose the last commits on power loss, which leaves tail garbage only.
                conn.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error as exc:
                raise StoreError(self._address,
                                 f"cannot open index {self._db_path}: {exc}") from exc
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _drop_thread_conn(self) -> None:
        """Close this thread's connection: for threads that end (bulk-import
        workers, the committer), whose connections would otherwise stay
        open until the store closes."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
        conn.close()

    @contextlib.contextmanager
    def _write_txn(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(self._address, f"index {self._db_path}: {exc}") from exc

    def _pack_path(self, pack_id: int) -> Path:
        return self.root / "packs" / f"{pack_id:08d}.pack"

    def _claim_pack(self) -> _Pack:
        """A pack nobody appends to: an unlocked one with room, else a new one."""
        conn = self._conn()
        candidates = conn.execute("SELECT id FROM packs WHERE end < ? ORDER BY id",
                                  (PACK_LIMIT,)).fetchall()
        for (pack_id,) in candidates:
            try:
                fd = os.open(self._pack_path(pack_id), os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            # Holding the lock, ``end`` is authoritative: only holders commit.
            (end,) = conn.execute("SELECT end FROM packs WHERE id = ?", (pack_id,)).fetchone()
            try:
                if os.fstat(fd).st_size > end:
                    os.ftruncate(fd, end)  # a dead writer's uncommitted tail
            except OSError as exc:
                os.close(fd)
                raise StoreError(self._address, f"cannot reclaim {self._pack_path(pack_id)}: "
                                                f"{exc}") from exc
            return _Pack(self, pack_id, fd, end)
        # A new pack: row and file are made inside one transaction, so nobody
        # sees the row before the file exists and is locked.
        with self._write_txn() as c:
            pack_id = c.execute("INSERT INTO packs (end) VALUES (0)").lastrowid
            path = self._pack_path(pack_id)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise StoreError(self._address, f"cannot create pack {path}: {exc}") from exc
        return _Pack(self, pack_id, fd, 0)

    def _acquire_pack(self) -> _Pack:
        with self._lock:
            if self._closed:
                raise StoreError(self._address, "the store is closed")
            if self._idle_packs:
                return self._idle_packs.pop()
        return self._claim_pack()

    def _release_pack(self, pack: _Pack) -> None:
        """Give a pack back; whatever was not committed is dropped."""
        if pack.staged or pack.pos != pack.committed:
            pack.rollback()
        with self._lock:
            if pack.pos < PACK_LIMIT and not self._closed:
                self._idle_packs.append(pack)
                return
        pack.close()

    def _read_fd(self, pack_id: int) -> int:
        fd = self._read_fds.get(pack_id)
        if fd is None:
            path = self._pack_path(pack_id)
            try:
                new = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise StoreError(self._address, f"cannot open pack {path}: {exc}") from exc
            with self._lock:
                fd = self._read_fds.setdefault(pack_id, new)
            if fd != new:
                os.close(new)
        return fd

    def _locate(self, digest: bytes) -> tuple[int, int, int] | None:
        loc = self._locations.get(digest)
        if loc is None:
            validate_digest(digest)
            row = self._conn().execute(
                "SELECT pack, offset, length FROM blobs WHERE digest = ?", (digest,)).fetchone()
            if row is None:
                return None
            loc = (row[0], row[1], row[2])
            if len(self._locations) > 20_000:  # bounded: ~4 MB
                self._locations.clear()
            self._locations[digest] = loc
        return loc

    def _existing(self, digests: Sequence[bytes]) -> set[bytes]:
        """Which of ``digests`` the index already has (one query per 500)."""
        found: set[bytes] = set()
        conn = self._conn()
        for i in range(0, len(digests), 500):
            part = digests[i:i + 500]
            found.update(r[0] for r in conn.execute(
                f"SELECT digest FROM blobs WHERE digest IN ({','.join('?' * len(part))})",
                part))
        return found

    # --- blobs: reading ----------------------------------------------------

    def has_blob(self, digest: bytes) -> bool:
        return self._locate(digest) is not None

    def blob_size(self, digest: bytes) -> int | None:
        loc = self._locate(digest)
        return None if loc is None else loc[2]

    def read_blob_at(self, digest: bytes, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes of the blob at ``offset``; NOT verified."""
        loc = self._locate(digest)
        if loc is None:
            raise NotFoundError("blob", digest)
        pack_id, start, length = loc
        if offset < 0 or n < 0:
            raise ValueError(f"negative offset {offset} or length {n}")
        n = max(0, min(n, length - offset))
        if n == 0:
            return b""
        data = os.pread(self._read_fd(pack_id), n, start + offset)
        if len(data) != n:
            raise CorruptionError("blob", digest, f"{self._pack_path(pack_id)} (pack is "
                                                  f"shorter than the index says)")
        return data

    def map_blob(self, digest: bytes) -> BlobMap:
        """The blob as a zero-copy :class:`BlobMap` of its pack; NOT verified.

        One mapping per pack is shared by all blobs in it (mapped again,
        larger, when a blob lies past its end). A pack shorter than the index
        says is CorruptionError here, before anything is mapped.
        """
        loc = self._locate(digest)
        if loc is None:
            raise NotFoundError("blob", digest)
        pack_id, start, length = loc
        end = start + length
        with self._lock:
            mapping = self._maps.get(pack_id)
        if mapping is None or len(mapping) < end:
            fd = self._read_fd(pack_id)
            have = os.fstat(fd).st_size
            if have < end:
                raise CorruptionError("blob", digest, f"{self._pack_path(pack_id)} (pack is "
                                                      f"shorter than the index says)")
            if have == 0:  # an empty blob in an empty pack: nothing to map
                return BlobMap(mmap.mmap(-1, 1), 0, 0)
            try:
                mapping = mmap.mmap(fd, have, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            except OSError as exc:
                raise StoreError(self._address, f"cannot map pack "
                                                f"{self._pack_path(pack_id)}: {exc}") from exc
            with self._lock:
                # Older mappings stay alive as long as views of them do.
                current = self._maps.get(pack_id)
                if current is None or len(current) < len(mapping):
                    self._maps[pack_id] = mapping
        return BlobMap(mapping, start, length)

    def iter_blob(self, digest: bytes, chunk: int = STREAM_CHUNK) -> Iterator[bytes]:
        """The blob's bytes in chunks, verified: the last chunk is only yielded
        after the whole blob hashed right (else CorruptionError)."""
        loc = self._locate(digest)
        if loc is None:
            raise NotFoundError("blob", digest)
        hasher = _hasher(loc[2])
        offset = 0
        previous: bytes | None = None
        while offset < loc[2]:
            data = self.read_blob_at(digest, offset, chunk)
            hasher.update(data)
            offset += len(data)
            if previous is not None:
                yield previous
            previous = data
        if hasher.digest() != digest:
            raise CorruptionError("blob", digest, str(self._pack_path(loc[0])))
        if previous is not None:
            yield previous

    def verify_blob(self, digest: bytes,
                    on_chunk: Callable[[int, memoryview], None] | None = None) -> None:
        """Hash the stored bytes; CorruptionError naming the blob on mismatch.

        ``on_chunk(offset, data)``, when given, sees the chunks as they are
        hashed, all but the last BEFORE the verdict (the last only when the
        blob is intact).
        """
        offset = 0
        for chunk in self.iter_blob(digest):
            if on_chunk is not None:
                on_chunk(offset, memoryview(chunk))
            offset += len(chunk)

    def where(self, digest: bytes) -> str:
        loc = self._locate(digest)
        return "" if loc is None else f"{self._pack_path(loc[0])}@{loc[1]}"

    # --- blobs: writing ----------------------------------------------------

    def open_writer(self) -> LocalBlobWriter:
        return LocalBlobWriter(self)

    def put_blob(self, data: bytes) -> bytes:
        writer = self.open_writer()
        try:
            writer.write(data)
            return writer.close()
        finally:
            writer.abort()

    def put_files(self, paths: Sequence[bytes | str | os.PathLike],
                  threads: int | None = None) -> list[StoredFile]:
        """Store each regular file in ``paths`` as a blob, in parallel, batched.

        Symlinks are never followed (O_NOFOLLOW); anything but a regular file
        is refused with IngestError naming it. Everything is committed when
        this returns; on an error nothing of this call's uncommitted work stays.
        """
        paths = [os.fsencode(p) for p in paths]
        results: list[StoredFile | None] = [None] * len(paths)
        if not paths:
            return []
        workers = max(1, min(threads or os.cpu_count() or 1, len(paths) // 64 + 1))
        claimed: set[bytes] = set()
        stop = threading.Event()
        committer = _Committer(self) if len(paths) > 1 else _InlineCommitter(self)
        importers: list[_BulkImporter] = []

        def work(index: int) -> None:
            importer = _BulkImporter(self, committer, claimed, stop)
            importers.append(importer)
            try:
                importer.run(paths, results, range(index, len(paths), workers))
            except BaseException:
                stop.set()
                raise
            finally:
                if workers > 1:  # a pool thread of this call only
                    self._drop_thread_conn()

        errors: list[BaseException | None] = []
        try:
            if workers == 1:
                try:
                    work(0)
                except BaseException as exc:  # noqa: BLE001 - raised below, after cleanup
                    errors.append(exc)
            else:
                with ThreadPoolExecutor(workers, thread_name_prefix="castore-import") as pool:
                    futures = [pool.submit(work, i) for i in range(workers)]
                    errors = [f.exception() for f in futures]
        finally:
            try:
                committer.finish()
            except BaseException as exc:  # noqa: BLE001 - raised below, after cleanup
                errors.append(exc)
            # Packs go back only now: whatever the committer did not commit
            # (after an error) is cut off again.
            for importer in importers:
                for pack in importer.packs:
                    self._release_pack(pack)
        for error in errors:
            if error is not None:
                raise error
        return results  # type: ignore[return-value]

    # --- directories -------------------------------------------------------

    def get_directory(self, digest: bytes) -> Directory | None:
        """The directory, verified against its digest; None when missing."""
        validate_digest(digest)
        row = self._conn().execute("SELECT data FROM directories WHERE digest = ?",
                                   (digest,)).fetchone()
        if row is None:
            return None
        data = row[0]
        where = f"{self._db_path} (directories)"
        if blake3.blake3(data).digest() != digest:
            raise CorruptionError("directory", digest, where)
        try:
            return directory_from_proto(castore_pb2.Directory.FromString(data))
        except Exception as exc:  # hashes right but does not decode: not ours
            raise CorruptionError("directory", digest, where) from exc

    def has_directory(self, digest: bytes) -> bool:
        validate_digest(digest)
        return self._conn().execute("SELECT 1 FROM directories WHERE digest = ?",
                                    (digest,)).fetchone() is not None

    def put_directories(self, directories: Sequence[Directory]) -> None:
        """Store already-validated directories in one transaction."""
        rows = [(d.digest, d.canonical_bytes) for d in directories]
        with self._write_txn() as conn:
            conn.executemany("INSERT OR IGNORE INTO directories (digest, data) VALUES (?, ?)",
                             rows)

    # --- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Release packs, connections and file descriptors; the cache of
        :func:`open_local_store` forgets this store. Only for the last user."""
        with self._lock:
            self._closed = True
            packs, self._idle_packs = self._idle_packs, []
            fds, self._read_fds = self._read_fds, {}
            maps, self._maps = self._maps, {}
            conns, self._conns = self._conns, []
        self._local = threading.local()
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        for pack in packs:
            pack.close()
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        for mapping in maps.values():
            # A BlobMap still in use keeps its mapping; it goes with the last view.
            with contextlib.suppress(BufferError):
                mapping.close()
        with _STORES_LOCK:
            for key, store in list(_STORES.items()):
                if store is self:
                    del _STORES[key]


class LocalBlobWriter:
    """A streaming blob write into a LocalStore (synchronous).

    Up to SMALL_BLOB bytes are buffered; past that the bytes stream into a
    claimed pack. Nothing is visible before :meth:`close` commits.
    """

    def __init__(self, store: LocalStore) -> None:
        self._store = store
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._length = 0
        # One thread: blake3's own threads cost more CPU than they saved
        # here (in-process 4 MiB writes: 2.3-3.1 -> 1.2-1.6 CPU s/GiB).
        self._hasher = blake3.blake3()
        self._pack: _Pack | None = None
        self._start = 0
        self._unflushed = 0  # where bytes not yet handed to writeback start
        self.digest: bytes | None = None
        self.closed = False

    def write(self, data: bytes) -> None:
        self.hash(data)
        self.append(data)

    def hash(self, data: bytes) -> None:
        """The first half of :meth:`write`. Callers may hash on one thread
        and :meth:`append` on another, if every piece goes through both in
        the same order, and :meth:`close` comes after the last of each."""
        if self.closed:
            raise ValueError("write to a closed blob writer")
        self._hasher.update(data)

    def append(self, data: bytes) -> None:
        """The second half of :meth:`write`: store a piece already hashed."""
        if self.closed:
            raise ValueError("write to a closed blob writer")
        if not data:
            return
        self._length += len(data)
        if self._pack is None and self._buffered + len(data) <= SMALL_BLOB:
            self._buffer.append(bytes(data))
            self._buffered += len(data)
            return
        pack = self._pack
        if pack is None:
            pack = self._pack = self._store._acquire_pack()
            self._start = self._unflushed = pack.append(self._buffer)
            self._buffer, self._buffered = [], 0
        pack.append([data])
        if pack.pos - self._unflushed >= WRITEBACK_STEP:
            _start_writeback(pack.fd, self._unflushed, pack.pos - self._unflushed)
            self._unflushed = pack.pos

    def close(self) -> bytes:
        """Commit the blob (fdatasync + index) and return its digest."""
        if self.closed:
            if self.digest is None:
                raise ValueError("the blob writer was aborted")
            return self.digest
        digest = self._hasher.digest()
        store = self._store
        try:
            if store.has_blob(digest):
                if self._pack is not None:
                    self._pack.drop(self._start)
            else:
                if self._pack is None:
                    self._pack = store._acquire_pack()
                    self._start = self._pack.append(self._buffer)
                self._pack.stage(digest, self._start, self._length)
                self._pack.commit()
        finally:
            self._finish()
        self.digest = digest
        return digest

    def abort(self) -> None:
        if self._pack is not None:
            self._pack.cut(self._start)
        self._finish()

    def _finish(self) -> None:
        self.closed = True
        self._buffer, self._buffered = [], 0
        if self._pack is not None:
            pack, self._pack = self._pack, None
            self._store._release_pack(pack)


class _BulkImporter:
    """One thread's share of :meth:`LocalStore.put_files`."""

    def __init__(self, store: LocalStore, committer: _Committer | _InlineCommitter,
                 claimed: set[bytes], stop: threading.Event) -> None:
        self.store = store
        self.committer = committer
        self.claimed = claimed
        self.stop = stop
        self.pack = store._acquire_pack()
        self.pack.trim()  # its commits come from another thread: no dropped bytes
        self.packs = [self.pack]
        self.submitted = self.pack.pos
        self.batch: dict[bytes, bytes] = {}
        self.batch_bytes = 0

    def run(self, paths: list[bytes], results: list[StoredFile | None],
            indexes: range) -> None:
        for i in indexes:
            if self.stop.is_set():
                return
            results[i] = self.one(paths[i])
        self.flush()

    def one(self, path: bytes) -> StoredFile:
        fd, st = open_regular_file(path)
        try:
            if st.st_size <= SMALL_BLOB:
                data = _read_all(fd, st.st_size)
                if len(data) <= SMALL_BLOB:
                    digest = blake3.blake3(data).digest()
                    self.add_small(digest, data)
                    return StoredFile(digest=digest, size=len(data), mode=st.st_mode)
                return self.stream(fd, st, data)
            return self.stream(fd, st, b"")
        except OSError as exc:
            raise IngestError(os.fsdecode(path), f"cannot read: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def add_small(self, digest: bytes, data: bytes) -> None:
        if digest in self.claimed or digest in self.batch:
            return
        self.claimed.add(digest)
        self.batch[digest] = data
        self.batch_bytes += len(data)
        if self.batch_bytes >= BATCH_BYTES or len(self.batch) >= BATCH_BLOBS:
            self.flush()

    def stream(self, fd: int, st: os.stat_result, head: bytes) -> StoredFile:
        """A big file: hash and append as it is read, cut it off if it was known."""
        pack = self.pack
        start = pack.pos
        hasher = _hasher(st.st_size)
        length = 0
        chunk = head
        while True:
            if chunk:
                hasher.update(chunk)
                pack.append([chunk])
                length += len(chunk)
            chunk = os.read(fd, STREAM_CHUNK)
            if not chunk:
                break
        digest = hasher.digest()
        if digest in self.claimed or self.store.has_blob(digest):
            pack.cut(start)
        else:
            self.claimed.add(digest)
            pack.stage(digest, start, length)
            if pack.pos - self.submitted >= BATCH_BYTES:
                self.flush()
        return StoredFile(digest=digest, size=length, mode=st.st_mode)

    def flush(self) -> None:
        """Append the batch (what the index lacks) and hand it to the committer."""
        if self.batch:
            digests = list(self.batch)
            known = self.store._existing(digests)
            fresh = [d for d in digests if d not in known]
            buffers = [self.batch[d] for d in fresh]
            offset = self.pack.append(buffers)
            for d, data in zip(fresh, buffers):
                self.pack.stage(d, offset, len(data))
                offset += len(data)
            self.batch.clear()
            self.batch_bytes = 0
        self.committer.submit(self.pack)
        self.submitted = self.pack.pos
        if self.pack.pos >= PACK_LIMIT:
            self.pack = self.store._acquire_pack()
            self.pack.trim()
            self.packs.append(self.pack)
            self.submitted = self.pack.pos


def _read_all(fd: int, size: int) -> bytes:
    data = os.read(fd, size + 1) if size else os.read(fd, 1 << 16)
    if len(data) <= size:
        return data
    # The file grew while we read it: take what is there now.
    parts = [data]
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


_STORES: dict[Path, LocalStore] = {}
_STORES_LOCK = threading.Lock()


def open_local_store(root: Path | str) -> LocalStore:
    """The process's one LocalStore for ``root`` (by resolved path)."""
    key = Path(root).resolve()
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = LocalStore(key)
            _STORES[key] = store
        return store


# --- async facades -----------------------------------------------------------

class _LocalReader(BlobReader):
    def __init__(self, store: LocalStore, digest: bytes, size: int) -> None:
        self._store = store
        self.digest = digest
        self.size = size
        self._pos = 0
        self._hasher = _hasher(size)
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
                and self._writer._pack is None \
                and self._writer._buffered + len(data) <= SMALL_BLOB:
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

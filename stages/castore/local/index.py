"""The local store's index: one SQLite database in WAL mode.

Tables (see the package docstring for how they are used)::

    meta(key, value)                 format version
    packs(id, end)                   one row per pack; ``end`` = committed length
    blobs(digest, pack, offset, length)
    directories(digest, data)        canonical protobuf bytes of each Directory

Every thread gets its own connection (SQLite connections are not shared
between threads here); a thread that ends early drops its own with
:meth:`Index.drop_thread_conn`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

from stages.castore.errors import StoreError
from stages.castore.nodes import validate_digest

__all__ = ["FORMAT_VERSION", "Index", "Location"]

FORMAT_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs (id INTEGER PRIMARY KEY, end INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    digest BLOB PRIMARY KEY, pack INTEGER NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS directories (
    digest BLOB PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
"""

# Blob locations remembered in memory, at most (about 4 MB).
_LOCATION_CACHE = 20_000

T = TypeVar("T")

BlobRow = tuple[bytes, int, int, int]
"""A blob's index row as the writers stage it: (digest, offset, length, pack)."""


def _when_unlocked(fn: Callable[[], T], wait: float = 30.0) -> T:
    """``fn()``, again while SQLite says "database is locked".

    Two processes opening a new store at once (a service and its FUSE mount
    server) both switch it to WAL and create its tables; SQLite answers one
    of them SQLITE_BUSY at once, without its busy timeout, where waiting
    could deadlock. The other finishes in milliseconds: try again.
    """
    deadline = time.monotonic() + wait
    delay = 0.001
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class Location(NamedTuple):
    """Where a committed blob's bytes are: pack id, offset in it, length."""

    pack: int
    offset: int
    length: int


class Index:
    """The SQLite index of one store directory. Thread-safe."""

    def __init__(self, path: Path, address: str) -> None:
        self.path = path
        self._address = address
        if path.exists() and not path.is_file():
            raise StoreError(address, f"{path} is not a regular file")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._locations: dict[bytes, Location] = {}
        try:
            version = _when_unlocked(self._create)
        except sqlite3.Error as exc:
            raise StoreError(address, f"index {path} is unusable ({exc}); it is corrupt or "
                                      f"not an ocibuild store") from exc
        if version != FORMAT_VERSION:
            raise StoreError(address, f"store format {version!r}, this ocibuild reads "
                                      f"{FORMAT_VERSION!r}")

    def _create(self) -> str:
        """The tables (if new) and the store's format version."""
        conn = self.conn()
        conn.executescript(_SCHEMA)
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('format', ?)",
                         (FORMAT_VERSION,))
        return str(conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0])

    # --- connections -------------------------------------------------------

    def conn(self) -> sqlite3.Connection:
        """This thread's connection, opened at its first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                                       check_same_thread=False)
                _when_unlocked(lambda: conn.execute("PRAGMA journal_mode = WAL"))
                # With the pack fdatasync'ed before each commit, NORMAL can at worst
                # lose the last commits on power loss, which leaves tail garbage only.
                conn.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error as exc:
                raise StoreError(self._address, f"cannot open index {self.path}: {exc}") from exc
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def drop_thread_conn(self) -> None:
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
    def write_txn(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: writers queue at the start)."""
        conn = self.conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(self._address, f"index {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        self._local = threading.local()
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # --- blobs -------------------------------------------------------------

    def locate(self, digest: bytes) -> Location | None:
        """Where the blob is, or None when the index has no row for it."""
        loc = self._locations.get(digest)
        if loc is None:
            validate_digest(digest)
            row = self.conn().execute(
                "SELECT pack, offset, length FROM blobs WHERE digest = ?", (digest,)).fetchone()
            if row is None:
                return None
            loc = Location(row[0], row[1], row[2])
            if len(self._locations) > _LOCATION_CACHE:
                self._locations.clear()
            self._locations[digest] = loc
        return loc

    def existing(self, digests: Sequence[bytes]) -> set[bytes]:
        """Which of ``digests`` the index already has (one query per 500)."""
        found: set[bytes] = set()
        conn = self.conn()
        for i in range(0, len(digests), 500):
            part = digests[i:i + 500]
            found.update(r[0] for r in conn.execute(
                f"SELECT digest FROM blobs WHERE digest IN ({','.join('?' * len(part))})",
                part))
        return found

    def commit_blobs(self, rows: Sequence[BlobRow], ends: Sequence[tuple[int, int]]) -> None:
        """Insert blob rows (duplicates ignored) and set packs' committed
        ``(end, pack id)``, in one transaction. The caller has synced the
        bytes the rows point at."""
        with self.write_txn() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO blobs (digest, offset, length, pack) VALUES (?, ?, ?, ?)",
                rows)
            conn.executemany("UPDATE packs SET end = ? WHERE id = ?", ends)

    # --- packs -------------------------------------------------------------

    def packs_below(self, limit: int) -> list[int]:
        """Ids of packs whose committed length is under ``limit``, oldest first."""
        return [pack_id for (pack_id,) in self.conn().execute(
            "SELECT id FROM packs WHERE end < ? ORDER BY id", (limit,))]

    def pack_end(self, pack_id: int) -> int:
        (end,) = self.conn().execute("SELECT end FROM packs WHERE id = ?",
                                     (pack_id,)).fetchone()
        return int(end)

    @contextlib.contextmanager
    def new_pack(self) -> Iterator[int]:
        """A new pack row, committed when the block ends without an error:
        the caller creates and locks the pack's file inside the block, so
        nobody sees the row before the file exists and is locked."""
        with self.write_txn() as conn:
            pack_id = conn.execute("INSERT INTO packs (end) VALUES (0)").lastrowid
            assert pack_id is not None
            yield pack_id

    # --- directories -------------------------------------------------------

    def directory_bytes(self, digest: bytes) -> bytes | None:
        """A directory's stored bytes, unverified; None when missing."""
        validate_digest(digest)
        row = self.conn().execute("SELECT data FROM directories WHERE digest = ?",
                                  (digest,)).fetchone()
        return None if row is None else bytes(row[0])

    def has_directory(self, digest: bytes) -> bool:
        validate_digest(digest)
        return self.conn().execute("SELECT 1 FROM directories WHERE digest = ?",
                                   (digest,)).fetchone() is not None

    def put_directories(self, rows: Sequence[tuple[bytes, bytes]]) -> None:
        """Store ``(digest, canonical bytes)`` rows in one transaction."""
        with self.write_txn() as conn:
            conn.executemany("INSERT OR IGNORE INTO directories (digest, data) VALUES (?, ?)",
                             rows)

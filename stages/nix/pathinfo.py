"""The path-info database: what ocibuild knows about Nix store paths it holds.

For every registered store path: its castore node (the root of its tree in
castore), its references (full store paths, sorted; a self-reference is
kept), its NAR hash (sha256) and NAR size, its deriver (the .drv it was
built from, or None for a path imported from Nix's store) and when it was
registered. It is Nix's ``ValidPaths``/``Refs`` in small.

The database is one SQLite file, by default ``nix-pathinfo.sqlite`` in the
local store's directory (next to its ``index.sqlite``); see
:func:`pathinfo_path_for`. It runs in WAL mode.

Atomicity: :meth:`PathInfoDB.register` writes all the paths it is given in
ONE transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``): a crash at any moment
leaves either every one of them registered, with all its references, or
none. A build registers all its outputs in one call, so a multi-output
build is never half registered either.

Closure: every reference of a registered path must be registered too (or be
the path itself, or another path of the same call); register refuses
anything else, so the reference closure of a registered path is always in
the database (:meth:`PathInfoDB.closure`).

Errors (all :class:`~stages.nix.errors.NixError`)::

    PathInfoError              a registration that breaks a rule (path=)
    ├── PathNotRegistered      a path the database does not hold (also LookupError)
    └── PathInfoCorrupt        the file is not a path-info database, or a row is damaged

Caveats:

- A path is registered once: registering it again keeps the first
  registration (store paths are immutable, as in Nix) and reports it as not
  new. Input-addressed builds that are not reproducible therefore keep the
  first result.
- The database does not own the castore data: a node whose blobs or
  directories have been lost from the store is still registered. Callers
  that must be sure (the builder, before skipping a derivation) check the
  node with :func:`node_present`.
- One connection per :class:`PathInfoDB`; it may be used from several
  threads (calls are serialized by a lock).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from stages.castore.hashes import format_sha256
from stages.castore.nodes import DirectoryNode, FileNode, Node, node_from_proto, node_to_proto
from stages.nix.errors import NixError
from stages.nix.storepath import check_store_path

if TYPE_CHECKING:
    from stages.castore.addresses import Castore

__all__ = [
    "PATHINFO_FILE",
    "PathInfo",
    "PathInfoCorrupt",
    "PathInfoDB",
    "PathInfoError",
    "PathNotRegistered",
    "node_present",
    "open_pathinfo",
    "pathinfo_path_for",
]

PATHINFO_FILE = "nix-pathinfo.sqlite"
FORMAT_VERSION = "ocibuild-nix-pathinfo-1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS paths (
    path        TEXT PRIMARY KEY,
    node        BLOB NOT NULL,
    nar_sha256  BLOB NOT NULL,
    nar_size    INTEGER NOT NULL,
    deriver     TEXT,
    registered  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refs (
    referrer   TEXT NOT NULL REFERENCES paths(path),
    reference  TEXT NOT NULL,
    PRIMARY KEY (referrer, reference)
) WITHOUT ROWID;
"""


class PathInfoError(NixError):
    """A registration that breaks a rule of the database; names the path."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class PathNotRegistered(PathInfoError, LookupError):
    """The database holds no such path."""

    def __init__(self, path: str) -> None:
        super().__init__(path, "not registered in the path-info database (build it, or "
                               "import it from /nix/store, first)")

    def __str__(self) -> str:  # LookupError would repr() the message
        return str(self.args[0])


class PathInfoCorrupt(PathInfoError):
    """The database file (or one of its rows) is unreadable."""


@attrs.frozen(kw_only=True)
class PathInfo:
    """One registered store path.

    ``node`` is the root of the path's tree in castore; its name is the
    store path's basename. ``nar_sha256`` is the raw 32-byte digest;
    :attr:`nar_hash` prints it as ``nix-store -q --hash`` does.
    """

    path: str = attrs.field(validator=lambda _i, _a, v: check_store_path(v))
    node: Node
    references: tuple[str, ...] = attrs.field(converter=lambda refs: tuple(sorted(set(refs))))
    nar_sha256: bytes = attrs.field()
    nar_size: int = attrs.field()
    deriver: str | None = None
    registration_time: float = attrs.field(factory=time.time)

    @nar_sha256.validator
    def _check_hash(self, _attr: attrs.Attribute, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != 32:
            raise PathInfoError(self.path, f"a NAR hash is 32 sha256 bytes, not {value!r}")

    @nar_size.validator
    def _check_size(self, _attr: attrs.Attribute, value: int) -> None:
        if not isinstance(value, int) or value <= 0:
            raise PathInfoError(self.path, f"a NAR size is a positive int, not {value!r}")

    @property
    def nar_hash(self) -> str:
        return format_sha256(self.nar_sha256)


def pathinfo_path_for(blob_address: str | None = None) -> Path | None:
    """Where the path-info database of a castore lives; None: in memory.

    A ``local:///dir`` blob store (or the embedded default) keeps it in that
    directory; a ``memory://`` store has an in-memory database (it would
    outlive nothing); any other (remote) store gets one in the embedded
    store's directory, named after the address.
    """
    from stages.castore.addresses import default_address, default_store_dir

    address = blob_address or os.environ.get("BLOB_SERVICE_ADDR") or default_address()
    url = urllib.parse.urlsplit(address)
    if url.scheme == "memory":
        return None
    if url.scheme == "local":
        return Path(url.path) / PATHINFO_FILE
    import hashlib

    tag = hashlib.sha256(address.encode()).hexdigest()[:16]
    return default_store_dir() / f"nix-pathinfo-{tag}.sqlite"


def open_pathinfo(blob_address: str | None = None) -> PathInfoDB:
    """The path-info database that goes with the castore at ``blob_address``."""
    return PathInfoDB(pathinfo_path_for(blob_address))


class PathInfoDB:
    """The database; see the module docstring. Use as a context manager or close()."""

    def __init__(self, path: Path | str | None) -> None:
        self.path = Path(path) if path is not None else None
        where = str(self.path) if self.path is not None else ":memory:"
        self._where = where
        self._lock = threading.Lock()
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(where, timeout=60, isolation_level=None,
                                         check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise PathInfoError(where, f"cannot open the path-info database: {exc}") from exc
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL keeps every commit atomic across a process
            # crash; only a power loss may drop the last commits (whole).
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.executescript(_SCHEMA)
            self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('format', ?)",
                               (FORMAT_VERSION,))
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.Error as exc:
            self._conn.close()
            raise PathInfoCorrupt(where, f"is not a usable path-info database ({exc}); it is "
                                         f"corrupt or another kind of file; move it away to "
                                         f"start an empty one") from exc
        if row is None or row[0] != FORMAT_VERSION:
            self._conn.close()
            raise PathInfoCorrupt(where, f"has format {row and row[0]!r}, this ocibuild reads "
                                         f"{FORMAT_VERSION!r}")

    def __repr__(self) -> str:
        return f"PathInfoDB({self._where!r})"

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> PathInfoDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        try:
            with self._lock:
                return self._conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise PathInfoCorrupt(self._where, f"cannot be read ({exc})") from exc

    def _row_to_info(self, row: tuple, refs: list[str]) -> PathInfo:
        from google.protobuf.message import DecodeError

        from stages.castore.errors import CastoreError
        from stages.proto import castore_pb2

        path, node_bytes, nar_sha256, nar_size, deriver, registered = row
        try:
            msg = castore_pb2.Node()
            msg.ParseFromString(node_bytes)
            node = node_from_proto(msg)
            return PathInfo(path=path, node=node, references=refs, nar_sha256=nar_sha256,
                            nar_size=nar_size, deriver=deriver, registration_time=registered)
        except (CastoreError, NixError, DecodeError, ValueError, TypeError) as exc:
            raise PathInfoCorrupt(path, f"its row in {self._where} is damaged: {exc}") from exc

    def find(self, path: str) -> PathInfo | None:
        """The registration of ``path``, or None."""
        rows = self._query("SELECT path, node, nar_sha256, nar_size, deriver, registered "
                           "FROM paths WHERE path = ?", (path,))
        if not rows:
            return None
        refs = [r for (r,) in self._query(
            "SELECT reference FROM refs WHERE referrer = ? ORDER BY reference", (path,))]
        return self._row_to_info(rows[0], refs)

    def get(self, path: str) -> PathInfo:
        """The registration of ``path``; PathNotRegistered if there is none."""
        info = self.find(path)
        if info is None:
            raise PathNotRegistered(path)
        return info

    def has(self, path: str) -> bool:
        return bool(self._query("SELECT 1 FROM paths WHERE path = ?", (path,)))

    def paths(self) -> list[str]:
        """Every registered path, sorted."""
        return [p for (p,) in self._query("SELECT path FROM paths ORDER BY path")]

    def closure(self, paths: Iterable[str]) -> set[str]:
        """``paths`` and everything they reference, transitively.

        PathNotRegistered names the first path (given or reached) that is not
        registered.
        """
        todo = list(paths)
        seen: set[str] = set()
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            info = self.get(path)
            seen.add(path)
            todo.extend(r for r in info.references if r not in seen)
        return seen

    # --- writing ---------------------------------------------------------------

    def register(self, infos: Iterable[PathInfo]) -> list[str]:
        """Register all of ``infos`` in one transaction; return the paths that were new.

        Every reference must be registered already, be the path itself or be
        another path of this call (PathInfoError otherwise, and nothing is
        written). A path already registered keeps its first registration.
        """
        infos = list(infos)
        batch = {i.path for i in infos}
        if len(batch) != len(infos):
            dup = next(i.path for i in infos if sum(j.path == i.path for j in infos) > 1)
            raise PathInfoError(dup, "given twice in one registration")
        rows = []
        for info in infos:
            node = node_to_proto(info.node.renamed(info.path.rsplit("/", 1)[1].encode()))
            rows.append((info.path, node.SerializeToString(deterministic=True), info.nar_sha256,
                         info.nar_size, info.deriver, info.registration_time))
        new: list[str] = []
        try:
            with self._lock:
                c = self._conn
                c.execute("BEGIN IMMEDIATE")
                try:
                    for info, row in zip(infos, rows):
                        for ref in info.references:
                            if ref in batch:
                                continue
                            if not c.execute("SELECT 1 FROM paths WHERE path = ?",
                                             (ref,)).fetchone():
                                raise PathInfoError(info.path, f"references {ref}, which is "
                                                               f"not registered (register the "
                                                               f"references first)")
                        cur = c.execute("INSERT OR IGNORE INTO paths (path, node, nar_sha256, "
                                        "nar_size, deriver, registered) VALUES (?, ?, ?, ?, ?, ?)",
                                        row)
                        if cur.rowcount == 0:
                            continue  # registered before: keep that registration
                        new.append(info.path)
                        c.executemany("INSERT INTO refs (referrer, reference) VALUES (?, ?)",
                                      [(info.path, ref) for ref in info.references])
                    c.execute("COMMIT")
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
        except sqlite3.DatabaseError as exc:
            raise PathInfoCorrupt(self._where, f"cannot be written ({exc})") from exc
        return new


async def node_present(castore: Castore, node: Node) -> bool:
    """Whether the root of ``node`` is in ``castore`` (its blob, or its root directory)."""
    from stages.castore.errors import NotFoundError

    try:
        if isinstance(node, FileNode):
            return await castore.blobs.has(node.digest)
        if isinstance(node, DirectoryNode):
            return await castore.directories.get(node.digest) is not None
    except NotFoundError:
        return False
    return True

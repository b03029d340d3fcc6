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

Modules: :mod:`.index` (SQLite), :mod:`.packs` (pack files, claims, the
commit order), :mod:`.importer` (bulk import of files), :mod:`.store`
(:class:`LocalStore`, synchronous), :mod:`.services` (the async castore
services and the ``local://`` address). Measured speed: README, "Numbers".
"""

from stages.castore.local.packs import SMALL_BLOB, STREAM_CHUNK
from stages.castore.local.services import (
    BACKEND,
    INLINE_READ,
    WRITE_BEHIND,
    LocalBlobService,
    LocalDirectoryService,
)
from stages.castore.local.store import BlobMap, LocalBlobWriter, LocalStore, open_local_store

__all__ = [
    "BACKEND",
    "INLINE_READ",
    "SMALL_BLOB",
    "STREAM_CHUNK",
    "WRITE_BEHIND",
    "BlobMap",
    "LocalBlobService",
    "LocalBlobWriter",
    "LocalDirectoryService",
    "LocalStore",
    "open_local_store",
]

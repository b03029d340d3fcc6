"""Bulk import of files into the local store: parallel, batched, deduplicated.

Each import thread appends into its own pack. Small files are collected
into batches (what the index already has is left out); big files stream
into the pack and are cut off again when their digest turns out to be known.
A batch is handed to one committer thread, which merges what queued up
meanwhile into one fdatasync per pack and one index transaction, so the
import threads never wait on the disk's sync.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import blake3

from stages.castore.errors import IngestError
from stages.castore.local.index import BlobRow, Index
from stages.castore.local.packs import (
    PACK_LIMIT,
    SMALL_BLOB,
    STREAM_CHUNK,
    Pack,
    PackPool,
    commit,
    hasher,
)
from stages.castore.services import StoredFile, open_regular_file

__all__ = ["import_files"]

# A bulk import commits (one fdatasync + one transaction) per this many bytes
# or blobs, whichever comes first.
BATCH_BYTES = 32 << 20
BATCH_BLOBS = 4096


def import_files(pool: PackPool, paths: Sequence[bytes | str | os.PathLike[str]],
                 threads: int | None = None) -> list[StoredFile]:
    """Store each regular file in ``paths`` as a blob, in parallel, batched.

    Symlinks are never followed (O_NOFOLLOW); anything but a regular file
    is refused with IngestError naming it. Everything is committed when
    this returns; on an error nothing of this call's uncommitted work stays.
    """
    encoded = [os.fsencode(p) for p in paths]
    results: list[StoredFile | None] = [None] * len(encoded)
    if not encoded:
        return []
    workers = max(1, min(threads or os.cpu_count() or 1, len(encoded) // 64 + 1))
    claimed: set[bytes] = set()
    stop = threading.Event()
    committer: _Committer | _InlineCommitter = (
        _Committer(pool) if len(encoded) > 1 else _InlineCommitter(pool))
    importers: list[_Importer] = []

    def work(index: int) -> None:
        importer = _Importer(pool, committer, claimed, stop)
        importers.append(importer)
        try:
            importer.run(encoded, results, range(index, len(encoded), workers))
        except BaseException:
            stop.set()
            raise
        finally:
            if workers > 1:  # a pool thread of this call only
                pool.index.drop_thread_conn()

    errors: list[BaseException | None] = []
    try:
        if workers == 1:
            try:
                work(0)
            except BaseException as exc:  # noqa: BLE001 - raised below, after cleanup
                errors.append(exc)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="castore-import") as executor:
                futures = [executor.submit(work, i) for i in range(workers)]
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
                pool.release(pack)
    for error in errors:
        if error is not None:
            raise error
    done = [r for r in results if r is not None]
    assert len(done) == len(results), "an import thread stopped without an error"
    return done


class _Committer:
    """Commits batches handed over by import threads, so they never wait on
    fdatasync; batches queued meanwhile are merged into one commit."""

    def __init__(self, pool: PackPool) -> None:
        self.pool = pool
        self.queue: queue.SimpleQueue[tuple[Pack, int, list[BlobRow]] | None] = \
            queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="castore-commit", daemon=True)
        self.thread.start()

    def submit(self, pack: Pack) -> None:
        if self.error is not None:
            raise self.error
        pos, rows = pack.take_staged()
        self.queue.put((pack, pos, rows))

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self.pool.index.drop_thread_conn()

    def _loop(self) -> None:
        done = False
        while not done:
            items = [self.queue.get()]
            while True:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            ends: dict[Pack, int] = {}
            rows: list[BlobRow] = []
            for item in items:
                if item is None:
                    done = True
                    continue
                pack, pos, staged = item
                ends[pack] = max(pos, ends.get(pack, 0))
                rows.extend(staged)
            if ends and self.error is None:
                try:
                    commit(self.pool, ends, rows)
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

    def __init__(self, pool: PackPool) -> None:
        self.pool = pool

    def submit(self, pack: Pack) -> None:
        pos, rows = pack.take_staged()
        commit(self.pool, {pack: pos}, rows)

    def finish(self) -> None:
        pass


class _Importer:
    """One thread's share of :func:`import_files`."""

    def __init__(self, pool: PackPool, committer: _Committer | _InlineCommitter,
                 claimed: set[bytes], stop: threading.Event) -> None:
        self.pool = pool
        self.index: Index = pool.index
        self.committer = committer
        self.claimed = claimed
        self.stop = stop
        self.pack = pool.acquire()
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
        hashing = hasher(st.st_size)
        length = 0
        chunk = head
        while True:
            if chunk:
                hashing.update(chunk)
                pack.append([chunk])
                length += len(chunk)
            chunk = os.read(fd, STREAM_CHUNK)
            if not chunk:
                break
        digest = hashing.digest()
        if digest in self.claimed or self.index.locate(digest) is not None:
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
            known = self.index.existing(digests)
            fresh = [d for d in digests if d not in known]
            buffers = [self.batch[d] for d in fresh]
            offset = self.pack.append(buffers)
            for d, data in zip(fresh, buffers, strict=True):
                self.pack.stage(d, offset, len(data))
                offset += len(data)
            self.batch.clear()
            self.batch_bytes = 0
        self.committer.submit(self.pack)
        self.submitted = self.pack.pos
        if self.pack.pos >= PACK_LIMIT:
            self.pack = self.pool.acquire()
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

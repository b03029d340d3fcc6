"""The persistent local store's own promises: persistence, dedup, corruption
detection, tail garbage, unusable stores, several writers.

The contract every backend keeps is tests/unit/test_store_contract.py.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from castore_helpers import b3, pattern
from castore_helpers import tree as _tree

from stages.castore import local
from stages.castore.addresses import open_castore
from stages.castore.errors import (
    CorruptionError,
    IngestError,
    NotFoundError,
    StoreError,
)
from stages.castore.local import LocalStore, open_local_store, packs
from stages.castore.local import store as local_store


def pack_bytes(store: LocalStore) -> int:
    return sum(p.stat().st_size for p in (store.root / "packs").iterdir())


# --- blobs, both backends -----------------------------------------------------


# --- directories, both backends -----------------------------------------------


# --- the local store's own promises ---------------------------------------------

async def test_persists_across_reopen(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = LocalStore(root)
    digest = s.put_blob(b"persistent")
    dirs, top = _tree()
    s.put_directories(dirs)
    s.close()
    again = LocalStore(root)
    try:
        assert again.read_blob_at(digest, 0, 100) == b"persistent"
        assert again.get_directory(top.digest) == top
    finally:
        again.close()


def test_dedup_writes_bytes_once(store: LocalStore, tmp_path: Path) -> None:
    small, big = pattern(1000, 1), pattern(3 << 20, 2)
    store.put_blob(small)
    store.put_blob(big)
    size = pack_bytes(store)
    assert size == len(small) + len(big)
    store.put_blob(small)
    store.put_blob(big)
    (tmp_path / "big").write_bytes(big)
    (tmp_path / "small").write_bytes(small)
    store.put_files([tmp_path / "big", tmp_path / "small"])
    assert pack_bytes(store) == size


def _streamed(store: LocalStore, data: bytes) -> bytes:
    writer = store.open_writer()
    for i in range(0, len(data), 1 << 20):
        writer.write(data[i:i + (1 << 20)])
    return writer.close()


def test_a_dropped_duplicate_keeps_its_pages_for_the_next_write(tmp_path: Path) -> None:
    # A streamed duplicate is dropped without truncating (the next append
    # reuses its page cache pages); nothing points at those bytes, the next
    # commit and the close cut them off, and a crash leaves them to the next
    # claim, which truncates.
    root = tmp_path / "s"
    store = LocalStore(root)
    big, other = pattern(3 << 20, 4), pattern(2 << 20, 5)
    first = _streamed(store, big)
    pack = store.pack_path(store.locate(first)[0])
    assert pack.stat().st_size == len(big)
    assert _streamed(store, big) == first
    assert pack.stat().st_size == 2 * len(big)  # kept, past the committed end
    assert pack_bytes(store) == 2 * len(big)
    second = _streamed(store, other)  # written over them, then trimmed
    assert store.locate(second)[1] == len(big)
    assert pack.stat().st_size == len(big) + len(other)
    store.verify_blob(first)
    store.verify_blob(second)
    assert _streamed(store, big) == first
    assert pack.stat().st_size > len(big) + len(other)
    store.close()
    assert pack.stat().st_size == len(big) + len(other)
    # A dead writer's dropped bytes: the next claim truncates them.
    store = LocalStore(root)
    try:
        assert _streamed(store, big) == first
        store.packs.idle[0].trim = lambda: None  # as if the process died here
        store.close()
        assert pack.stat().st_size == 2 * len(big) + len(other)
        store = LocalStore(root)
        third = store.put_blob(b"after a crash")
        assert store.locate(third)[1] == len(big) + len(other)
        assert pack.stat().st_size == len(big) + len(other) + len(b"after a crash")
        for digest in (first, second, third):
            store.verify_blob(digest)
    finally:
        store.close()


def test_a_streamed_blob_starts_writeback_as_it_grows(store: LocalStore, monkeypatch) -> None:
    calls = []

    def record(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append((offset, length))
        return -1  # a failing hint changes nothing

    monkeypatch.setattr(packs, "_sync_file_range", record)
    monkeypatch.setattr(local_store, "WRITEBACK_STEP", 2 << 20)
    data = pattern(9 << 20, 6)
    digest = _streamed(store, data)
    # Contiguous ranges from the blob's start, each at least a step, the
    # tail left to the fdatasync of the commit.
    assert calls and calls[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))
    assert all(n >= 2 << 20 for _, n in calls)
    assert len(data) - (2 << 20) < sum(n for _, n in calls) <= len(data)
    store.verify_blob(digest)
    assert store.read_blob_at(digest, 0, len(data)) == data


def test_read_blob_at_bounds(store: LocalStore) -> None:
    digest = store.put_blob(b"0123456789")
    assert store.blob_size(digest) == 10
    assert store.read_blob_at(digest, 3, 4) == b"3456"
    assert store.read_blob_at(digest, 8, 100) == b"89"
    assert store.read_blob_at(digest, 10, 5) == b""
    with pytest.raises(NotFoundError):
        store.read_blob_at(b3(b"other"), 0, 1)


def _flip_byte(store: LocalStore, digest: bytes, at: int) -> None:
    pack_id, offset, _ = store.locate(digest)
    with open(store.pack_path(pack_id), "r+b") as f:
        f.seek(offset + at)
        byte = f.read(1)
        f.seek(offset + at)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("size", [100, 3 << 20], ids=["small", "big"])
async def test_corrupt_blob_is_named(store: LocalStore, size: int) -> None:
    data = pattern(size, seed=5)
    digest = store.put_blob(data)
    _flip_byte(store, digest, size // 2)
    with pytest.raises(CorruptionError, match=digest.hex()) as info:
        store.verify_blob(digest)
    assert "pack" in info.value.where
    # positional reads are not verified: they return the stored bytes
    assert store.read_blob_at(digest, 0, size) != data
    blobs = local.LocalBlobService(store)
    with pytest.raises(CorruptionError, match=digest.hex()):
        await blobs.get(digest)
    reader = await blobs.open_read(digest)
    with pytest.raises(CorruptionError, match=digest.hex()):
        await reader.verify()
    with pytest.raises(CorruptionError, match=digest.hex()):
        list(store.iter_blob(digest))


def test_corrupt_directory_is_named(store: LocalStore) -> None:
    dirs, root = _tree()
    store.put_directories(dirs)
    conn = sqlite3.connect(store.root / "index.sqlite")
    data = bytearray(root.canonical_bytes)
    data[-1] ^= 0x01
    conn.execute("UPDATE directories SET data = ? WHERE digest = ?", (bytes(data), root.digest))
    conn.commit()
    conn.close()
    with pytest.raises(CorruptionError, match=root.digest.hex()):
        store.get_directory(root.digest)


def test_tail_garbage_is_reclaimed(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = LocalStore(root)
    first = s.put_blob(b"first blob")
    s.close()
    pack = next((root / "packs").iterdir())
    with open(pack, "ab") as f:
        f.write(b"garbage a dead writer left behind")
    s = LocalStore(root)
    try:
        second = s.put_blob(b"second blob")
        assert s.read_blob_at(first, 0, 100) == b"first blob"
        assert s.read_blob_at(second, 0, 100) == b"second blob"
        assert pack.stat().st_size == len(b"first blob") + len(b"second blob")
        s.verify_blob(first)
        s.verify_blob(second)
    finally:
        s.close()


def test_two_stores_on_one_dir_write_to_different_packs(tmp_path: Path) -> None:
    # Two instances stand in for two processes: each holds its pack's flock.
    a, b = LocalStore(tmp_path / "s"), LocalStore(tmp_path / "s")
    try:
        wa, wb = a.open_writer(), b.open_writer()
        wa.write(pattern(2 << 20, 1))
        wb.write(pattern(2 << 20, 2))
        da, db = wa.close(), wb.close()
        assert a.locate(da)[0] != b.locate(db)[0]
        a.verify_blob(db)
        b.verify_blob(da)
    finally:
        a.close()
        b.close()


def test_put_files_many_threads(store: LocalStore, tmp_path: Path) -> None:
    paths = []
    for i in range(300):
        p = tmp_path / f"f{i}"
        p.write_bytes(pattern(i * 37, seed=i % 250))
        paths.append(p)
    results = store.put_files(paths, threads=3)
    assert [r.digest for r in results] == [b3(p.read_bytes()) for p in paths]
    for r in results:
        store.verify_blob(r.digest)


def test_put_files_error_leaves_nothing_uncommitted(store: LocalStore, tmp_path: Path) -> None:
    (tmp_path / "ok").write_bytes(b"fine")
    with pytest.raises(IngestError, match="missing"):
        store.put_files([tmp_path / "ok", tmp_path / "missing"], threads=1)
    # whatever was committed reads right; packs hold no uncommitted tail
    conn = sqlite3.connect(store.root / "index.sqlite")
    for pack_id, end in conn.execute("SELECT id, end FROM packs"):
        assert store.pack_path(pack_id).stat().st_size == end
    conn.close()


def test_open_local_store_is_cached_per_resolved_path(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    s = open_local_store(tmp_path / "real")
    try:
        assert open_local_store(tmp_path / "alias") is s
        assert open_local_store(str(tmp_path / "real" / ".")) is s
    finally:
        s.close()
    assert open_local_store(tmp_path / "real") is not s
    open_local_store(tmp_path / "real").close()


def test_unusable_store_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a store")
    with pytest.raises(StoreError, match=f"{tmp_path / 'file'}.*not a directory"):
        LocalStore(tmp_path / "file")
    with pytest.raises(StoreError, match="layout"):
        LocalStore(tmp_path / "file" / "below")


def test_unusable_store_corrupt_index(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / "index.sqlite").write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StoreError, match="index.*corrupt") as info:
        LocalStore(root)
    assert str(root) in str(info.value)


def test_unusable_store_foreign_format(tmp_path: Path) -> None:
    LocalStore(tmp_path / "s").close()
    conn = sqlite3.connect(tmp_path / "s" / "index.sqlite")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'format'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="format '99'"):
        LocalStore(tmp_path / "s")


@pytest.mark.parametrize("address", ["local://relative/dir", "local://host/abs", "local:///a?x=1"],
                         ids=["relative", "host", "query"])
def test_bad_local_address(address: str) -> None:
    with pytest.raises(StoreError, match="local:///absolute/dir"):
        open_castore(address, "memory://")


_OPEN_AT_ONCE = """
import sys, time
from stages.castore.local import LocalStore
start = float(sys.argv[2])
while time.time() < start:
    pass
LocalStore(sys.argv[1]).put_blob(b"x")
"""


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    # A service and its FUSE mount server open a fresh store together; SQLite
    # refuses one of two WAL switches at once ("database is locked").
    import subprocess
    import sys
    import time

    for round_ in range(8):
        root = tmp_path / f"store{round_}"
        start = time.time() + 1.0
        procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, str(root), str(start)],
                                  stderr=subprocess.PIPE) for _ in range(4)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()

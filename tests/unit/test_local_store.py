"""Blob and directory services, over memory:// and the persistent local store.

The same contract runs against both backends (parametrized by id); the
local store's own promises (persistence, dedup, corruption detection, tail
garbage, unusable stores, several writers) follow.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import blake3
import pytest

from stages.castore import local
from stages.castore.addresses import Castore, open_castore
from stages.castore.errors import (
    CorruptionError,
    IngestError,
    NotFoundError,
    StoreError,
    ValidationError,
)
from stages.castore.local import LocalStore, open_local_store
from stages.castore.nodes import (
    EMPTY_DIRECTORY_DIGEST,
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
)


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes that are not all alike (so a flipped byte changes the digest)."""
    block = bytes((i * 31 + seed) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


def pack_bytes(store: LocalStore) -> int:
    return sum(p.stat().st_size for p in (store.root / "packs").iterdir())


# --- blobs, both backends -----------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 1000, local.SMALL_BLOB, local.SMALL_BLOB + 1, 3 << 20],
                         ids=lambda s: f"{s}B")
async def test_blob_roundtrip(castore: Castore, size: int) -> None:
    data = pattern(size)
    digest = await castore.blobs.put(data)
    assert digest == b3(data)
    assert await castore.blobs.stat(digest) == size
    assert await castore.blobs.has(digest)
    assert await castore.blobs.get(digest) == data


async def test_streamed_write_in_chunks_and_reads(castore: Castore) -> None:
    data = pattern(5 << 20, seed=7)
    writer = castore.blobs.open_write()
    async with writer:
        for i in range(0, len(data), 300_000):
            await writer.write(data[i:i + 300_000])
        digest = await writer.close()
    assert digest == b3(data)
    async with await castore.blobs.open_read(digest) as reader:
        assert reader.size == len(data)
        assert await reader.pread(1_234_567, 1000) == data[1_234_567:1_235_567]
        assert await reader.pread(len(data) - 10, 100) == data[-10:]
        parts = []
        while chunk := await reader.read(777_777):
            parts.append(chunk)
        assert b"".join(parts) == data
        await reader.verify()


async def test_missing_blob(castore: Castore) -> None:
    digest = b3(b"never stored")
    assert await castore.blobs.stat(digest) is None
    with pytest.raises(NotFoundError, match=digest.hex()):
        await castore.blobs.open_read(digest)


async def test_bad_digest_length_is_refused(castore: Castore) -> None:
    with pytest.raises(ValidationError, match="digest-length"):
        await castore.blobs.stat(b"short")


@pytest.mark.parametrize("size", [10, 2 << 20], ids=["small", "streamed"])
async def test_aborted_write_is_invisible(castore: Castore, size: int) -> None:
    data = pattern(size, seed=3)
    writer = castore.blobs.open_write()
    with pytest.raises(RuntimeError):
        async with writer:
            await writer.write(data)
            raise RuntimeError("upload interrupted")
    assert await castore.blobs.stat(b3(data)) is None
    writer = castore.blobs.open_write()
    async with writer:
        await writer.write(data)
        # leaving without close() drops it too
    assert await castore.blobs.stat(b3(data)) is None


async def test_concurrent_writers_from_tasks(castore: Castore) -> None:
    blobs = [pattern(n, seed=n % 200) for n in (0, 5, 70_000, 1_500_000, 2_500_000, 333)]

    async def put_slowly(data: bytes) -> bytes:
        writer = castore.blobs.open_write()
        async with writer:
            for i in range(0, max(len(data), 1), 65536):
                await writer.write(data[i:i + 65536])
                await asyncio.sleep(0)
            return await writer.close()

    digests = await asyncio.gather(*(put_slowly(d) for d in blobs))
    assert digests == [b3(d) for d in blobs]
    for d, data in zip(digests, blobs):
        assert await castore.blobs.get(d) == data


async def test_put_files(castore: Castore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    contents = {f"f{i}".encode(): pattern(i * 9000, seed=i) for i in range(40)}
    contents[b"big"] = pattern(local.SMALL_BLOB * 2 + 5, seed=99)
    contents[b"dup"] = contents[b"f3"]
    for name, data in contents.items():
        (src / name.decode()).write_bytes(data)
    os.chmod(src / "f1", 0o755)
    paths = [os.fsencode(src / n.decode()) for n in contents]
    results = await castore.blobs.put_files(paths)
    assert [r.digest for r in results] == [b3(d) for d in contents.values()]
    assert [r.size for r in results] == [len(d) for d in contents.values()]
    assert results[1].mode & 0o100 and not results[0].mode & 0o100
    for r, data in zip(results, contents.values()):
        assert await castore.blobs.get(r.digest) == data


async def test_put_files_refuses_non_regular(castore: Castore, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "target").write_bytes(b"x")
    os.symlink("target", tmp_path / "link")
    for name in ("fifo", "link"):
        with pytest.raises(IngestError, match=name):
            await castore.blobs.put_files([os.fsencode(tmp_path / name)])


# --- directories, both backends -----------------------------------------------

def _file(name: bytes, data: bytes, executable: bool = False) -> FileNode:
    return FileNode(name=name, digest=b3(data), size=len(data), executable=executable)


def _tree() -> tuple[list[Directory], Directory]:
    """A small tree with a shared child: leaves first, root last."""
    empty = Directory()
    leaf = Directory(files=[_file(b"x", b"x")], symlinks=[SymlinkNode(name=b"l", target=b"x")])
    mid = Directory(directories=[leaf.as_node(b"leaf"), empty.as_node(b"void")])
    root = Directory(directories=[leaf.as_node(b"a"), mid.as_node(b"b"), empty.as_node(b"c")],
                     files=[_file(b"f", b"hello", True)])
    return [empty, leaf, mid, root], root


async def test_directory_put_and_get(castore: Castore) -> None:
    dirs, root = _tree()
    assert await castore.directories.put_tree(dirs) == root.digest
    for d in dirs:
        assert await castore.directories.get(d.digest) == d
    # f; a = 1 + leaf (x, l); b = 1 + mid (1 + leaf, 1 + void); c = 1 + void
    assert root.size == 1 + (1 + 2) + (1 + (1 + 2) + (1 + 0)) + (1 + 0)


async def test_recursive_get_is_breadth_first_each_once(castore: Castore) -> None:
    dirs, root = _tree()
    empty, leaf, mid, _ = dirs
    await castore.directories.put_tree(dirs)
    got = [d async for d in castore.directories.get_recursive(root.digest)]
    # root; its children in list order (a=leaf, b=mid, c=empty); leaf and
    # empty are not repeated below mid.
    assert got == [root, leaf, mid, empty]


async def test_empty_directory_digest(castore: Castore) -> None:
    assert await castore.directories.put_tree([Directory()]) == EMPTY_DIRECTORY_DIGEST
    assert await castore.directories.get(EMPTY_DIRECTORY_DIGEST) == Directory()


async def test_directory_upload_rules(castore: Castore) -> None:
    leaf = Directory(files=[_file(b"x", b"x")])
    wrong_size = Directory(directories=[DirectoryNode(name=b"d", digest=leaf.digest, size=7)])
    with pytest.raises(ValidationError, match="directory-size"):
        await castore.directories.put_tree([leaf, wrong_size])
    parent = Directory(directories=[leaf.as_node(b"d")])
    with pytest.raises(ValidationError, match="put-order"):
        await castore.directories.put_tree([parent, leaf])
    stray = Directory(files=[_file(b"stray", b"s")])
    with pytest.raises(ValidationError, match="put-disconnected"):
        await castore.directories.put_tree([stray, leaf, parent])
    with pytest.raises(ValidationError, match="put-empty"):
        await castore.directories.put_tree([])
    # nothing of the refused uploads was stored
    for d in (leaf, parent, stray, wrong_size):
        assert await castore.directories.get(d.digest) is None


async def test_missing_directory(castore: Castore) -> None:
    digest = b3(b"no such directory")
    assert await castore.directories.get(digest) is None
    with pytest.raises(NotFoundError, match=digest.hex()):
        async for _ in castore.directories.get_recursive(digest):
            pass


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
    pack = store._pack_path(store._locate(first)[0])
    assert pack.stat().st_size == len(big)
    assert _streamed(store, big) == first
    assert pack.stat().st_size == 2 * len(big)  # kept, past the committed end
    assert pack_bytes(store) == 2 * len(big)
    second = _streamed(store, other)  # written over them, then trimmed
    assert store._locate(second)[1] == len(big)
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
        store._idle_packs[0].trim = lambda: None  # as if the process died here
        store.close()
        assert pack.stat().st_size == 2 * len(big) + len(other)
        store = LocalStore(root)
        third = store.put_blob(b"after a crash")
        assert store._locate(third)[1] == len(big) + len(other)
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

    monkeypatch.setattr(local, "_sync_file_range", record)
    monkeypatch.setattr(local, "WRITEBACK_STEP", 2 << 20)
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
    pack_id, offset, _ = store._locate(digest)
    with open(store._pack_path(pack_id), "r+b") as f:
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
        assert a._locate(da)[0] != b._locate(db)[0]
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
        assert store._pack_path(pack_id).stat().st_size == end
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

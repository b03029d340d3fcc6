"""CastoreFS's read path without a mount: replies sliced from the blob's mapping, and the
page-cache fill done while verifying (the kernel side, pyfuse3.notify_store and
invalidate_inode, is replaced by recorders; the store is a real LocalStore).

The same paths run against the kernel in tests/integration/test_fuse_read_path.py.
"""

from __future__ import annotations

import errno
import logging
import threading

import pyfuse3
import pytest
import trio

from stages.castore import local
from stages.castore.fuse import fs as fsmod
from stages.castore.fuse.fs import CastoreFS
from stages.castore.local import LocalStore
from stages.castore.nodes import FileNode

INODE = 42


def pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 41 + seed) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


class Kernel:
    """Records what the filesystem tells the kernel; can be told to refuse."""

    def __init__(self) -> None:
        self.stored: list[tuple[int, int, bytes]] = []
        self.invalidated: list[int] = []
        self.refuse: int | None = None
        self.first_store = threading.Event()

    def notify_store(self, inode: int, offset: int, data) -> None:
        if self.refuse is not None:
            raise OSError(self.refuse, "refused by the test")
        self.stored.append((inode, offset, bytes(data)))
        self.first_store.set()

    def invalidate_inode(self, inode: int, attr_only: bool = False) -> None:
        self.invalidated.append(inode)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    k = Kernel()
    monkeypatch.setattr(pyfuse3, "notify_store", k.notify_store)
    monkeypatch.setattr(pyfuse3, "invalidate_inode", k.invalidate_inode)
    monkeypatch.setattr(fsmod, "FILL_MAX", 1 << 62)  # fill every size unless a test says
    return k


def corrupt_tail(store: LocalStore, digest: bytes, size: int) -> None:
    pack_id, start, _ = store.locate(digest)
    with open(store.pack_path(pack_id), "r+b") as f:
        f.seek(start + size - 1)
        byte = f.read(1)
        f.seek(start + size - 1)
        f.write(bytes([byte[0] ^ 0x55]))


SIZES = [1, 4096, local.STREAM_CHUNK, local.STREAM_CHUNK * 2 + 777]


@pytest.mark.parametrize("size", SIZES, ids=["1B", "4KiB", "one-chunk", "two-chunks-and-some"])
def test_verify_fills_every_byte_of_the_opening_inode(store, kernel, size) -> None:
    data = pattern(size)
    digest = store.put_blob(data)
    fs = CastoreFS(store)
    assert fs._check_blob(digest, size, INODE) is None
    assert {inode for inode, _, _ in kernel.stored} == {INODE}
    offsets = [off for _, off, _ in kernel.stored]
    assert offsets == sorted(offsets)
    assert b"".join(chunk for _, _, chunk in kernel.stored) == data
    assert kernel.invalidated == []


class VerifyAfterFirstStore:
    """The store, but verification waits until the filler stored something,
    so the bad verdict deterministically comes after pages were filled."""

    def __init__(self, store: LocalStore, kernel: Kernel) -> None:
        self._store = store
        self._kernel = kernel
        self.blob_size = store.blob_size
        self.map_blob = store.map_blob
        self.get_directory = store.get_directory

    def verify_blob(self, digest):
        assert self._kernel.first_store.wait(10), "the filler stored nothing"
        return self._store.verify_blob(digest)


@pytest.mark.parametrize("size", [100, local.STREAM_CHUNK * 2 + 5], ids=["small", "multi-chunk"])
def test_bad_verdict_invalidates_what_was_filled(store, kernel, size) -> None:
    digest = store.put_blob(pattern(size, seed=9))
    corrupt_tail(store, digest, size)
    fs = CastoreFS(VerifyAfterFirstStore(store, kernel))
    problem = fs._check_blob(digest, size, INODE)
    assert problem is not None and "corrupt" in problem and digest.hex() in problem
    assert kernel.stored, "pages were filled before the verdict"
    assert kernel.invalidated == [INODE]


def test_bad_verdict_before_any_fill_invalidates_nothing(store, kernel) -> None:
    digest = store.put_blob(pattern(100, seed=10))
    corrupt_tail(store, digest, 100)
    fs = CastoreFS(store)
    fs._check_blob(digest, 100, INODE)
    assert kernel.invalidated == ([INODE] if kernel.stored else [])


def test_readers_without_map_blob_are_only_verified(store, kernel) -> None:
    size = local.STREAM_CHUNK * 2 + 11
    digest = store.put_blob(pattern(size, seed=12))

    class NoMap:
        blob_size = store.blob_size
        verify_blob = store.verify_blob
        read_blob_at = store.read_blob_at

    fs = CastoreFS(NoMap())
    assert fs._check_blob(digest, size, INODE) is None
    assert kernel.stored == []
    corrupt_tail(store, digest, size)
    assert "corrupt" in CastoreFS(NoMap())._check_blob(digest, size, INODE + 1)
    assert kernel.invalidated == []


@pytest.mark.parametrize("fill_max", [0, 4096], ids=["off", "4KiB"])
def test_blobs_over_fill_max_are_only_verified(store, kernel, fill_max) -> None:
    big = pattern(4097, seed=11)
    small = pattern(4096, seed=12)
    fs = CastoreFS(store)
    fs.fill_max = fill_max
    assert fs._check_blob(store.put_blob(big), len(big), INODE) is None
    assert fs._check_blob(store.put_blob(small), len(small), INODE + 1) is None
    assert [inode for inode, _, _ in kernel.stored] == ([INODE + 1] if fill_max else [])


def test_missing_or_wrong_size_blob_fills_nothing(store, kernel) -> None:
    digest = store.put_blob(b"twelve bytes")
    fs = CastoreFS(store)
    assert "says 13" in fs._check_blob(digest, 13, INODE)
    other = FileNode(name=b"x", digest=bytes(32), size=5)
    assert fs._check_blob(other.digest, 5, INODE) == "is not in the store"
    assert kernel.stored == [] and kernel.invalidated == []


def test_enosys_turns_filling_off_for_the_server(store, kernel, caplog) -> None:
    first = store.put_blob(pattern(5000, seed=1))
    second = store.put_blob(pattern(6000, seed=2))
    fs = CastoreFS(store)
    kernel.refuse = errno.ENOSYS
    with caplog.at_level(logging.WARNING, logger="ocibuild.castore.fuse"):
        assert fs._check_blob(first, 5000, INODE) is None
    assert fs.fill_on_verify is False
    assert "cannot fill the page cache" in caplog.text
    kernel.refuse = None
    assert fs._check_blob(second, 6000, INODE + 1) is None
    assert kernel.stored == []  # not tried again


def test_other_refusal_stops_filling_this_blob_only(store, kernel, caplog) -> None:
    size = local.STREAM_CHUNK * 3
    digest = store.put_blob(pattern(size, seed=3))
    fs = CastoreFS(store)
    kernel.refuse = errno.ENOENT
    with caplog.at_level(logging.WARNING, logger="ocibuild.castore.fuse"):
        assert fs._check_blob(digest, size, INODE) is None
    assert caplog.text.count("cannot fill the page cache") == 1  # once, not per chunk
    assert fs.fill_on_verify is True
    assert kernel.invalidated == []


@pytest.mark.parametrize("off,size", [
    (0, 4096), (123, 1 << 20), ((3 << 20) - 10, 4096), (3 << 20, 4096), ((1 << 20) + 1, 2 << 20),
], ids=["head", "unaligned-1MiB", "tail-short", "past-end", "bigger-than-1MiB"])
async def test_read_answers_from_the_mapping(store, off, size) -> None:
    data = pattern(3 << 20, seed=4)
    digest = store.put_blob(data)
    fs = CastoreFS(store)
    fs._open[INODE] = (digest, len(data), store.map_blob(digest))
    assert bytes(await fs.read(INODE, off, size)) == data[off:off + size]
    assert bytes(await fs.read(INODE, 7, 100)) == data[7:107]


async def test_read_of_a_truncated_pack_is_eio(store) -> None:
    data = pattern(1 << 20, seed=8)
    digest = store.put_blob(data)
    fs = CastoreFS(store)
    fs._open[INODE] = (digest, len(data), store.map_blob(digest))
    pack_id, start, _ = store.locate(digest)
    with open(store.pack_path(pack_id), "r+b") as f:
        f.truncate(start + 1000)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.read(INODE, 0, 4096)
    assert info.value.errno == errno.EIO


class RecordingMap:
    """A BlobMap stand-in that records which ranges were forgotten."""

    def __init__(self, size: int) -> None:
        self.view = memoryview(bytes(size))
        self.forgotten: list[tuple[int, int]] = []

    def intact(self) -> bool:
        return True

    def forget(self, lo: int, hi: int) -> None:
        self.forgotten.append((lo, hi))


async def test_served_pages_are_forgotten_in_steps_never_the_current_request() -> None:
    fs = CastoreFS(object())  # no store access on this path
    one, two = RecordingMap(64 << 20), RecordingMap(8 << 20)
    fs._open[1] = (b"a" * 32, 64 << 20, one)
    fs._open[2] = (b"b" * 32, 8 << 20, two)
    step = 1 << 20
    served = 5 * fsmod.FORGET_EVERY // 2
    for off in range(0, served, step):
        await fs.read(1, off, step)
        for _lo, hi in one.forgotten:
            assert hi <= off, "the request being answered was forgotten"
    # 2.5 x FORGET_EVERY served: the first 2 x forgotten, contiguously, in order.
    assert one.forgotten[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(one.forgotten, one.forgotten[1:]))
    assert one.forgotten[-1][1] == 2 * fsmod.FORGET_EVERY
    # Switching to another blob forgets what was pending on the first.
    await fs.read(2, 0, step)
    assert one.forgotten[-1][1] == served
    assert two.forgotten == []


async def test_read_without_map_blob_falls_back_to_read_blob_at(store) -> None:
    data = pattern(10000, seed=6)
    digest = store.put_blob(data)

    class OldReader:
        blob_size = store.blob_size
        read_blob_at = store.read_blob_at
        verify_blob = store.verify_blob
        get_directory = store.get_directory

    fs = CastoreFS(OldReader())
    fs._open[INODE] = (digest, len(data), None)
    assert bytes(await fs.read(INODE, 5000, 8000)) == data[5000:]


def test_open_entries_and_mappings_go_with_the_last_release(store) -> None:
    import os

    data = pattern(10_000, seed=13)
    node = FileNode(name=b"f", digest=store.put_blob(data), size=len(data))
    fs = CastoreFS(store)
    fs.add_root_nodes([node])

    async def scenario() -> None:
        inode = fs._child(pyfuse3.ROOT_INODE, b"f")
        for _ in range(2):
            info = await fs.open(inode, os.O_RDONLY, None)
            assert info.fh == inode
        await fs.release(inode)
        assert bytes(await fs.read(inode, 0, 100)) == data[:100]  # one open left
        await fs.release(inode)
        assert inode not in fs._open and inode not in fs._open_count
        await fs.open(inode, os.O_RDONLY, None)  # opens again (verified already)
        assert bytes(await fs.read(inode, 9_990, 100)) == data[9_990:]

    trio.run(scenario)


def test_a_bug_in_one_request_is_eio_for_it_not_the_end_of_the_mount(store, caplog) -> None:
    fs = CastoreFS(store, content=True)

    def broken(name: bytes):
        raise TypeError("a bug")

    fs._content_node = broken
    content_ino = fs._content_ino

    async def scenario() -> None:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fs.lookup(content_ino, b"d-" + b"0" * 64, None)
        assert info.value.errno == errno.EIO
        # Requests with nothing to answer swallow it; the others still work.
        fs._open_count = None  # breaks release
        assert await fs.release(5) is None
        attrs = await fs.getattr(pyfuse3.ROOT_INODE, None)
        assert attrs.st_ino == pyfuse3.ROOT_INODE

    trio.run(scenario)
    assert "lookup" in caplog.text and "a bug" in caplog.text and "Traceback" in caplog.text


def test_missing_names_in_stored_directories_are_cached_negatives(store) -> None:
    # A stored directory never changes: the kernel may remember that a name
    # is not in it (a compiler probing include paths asks once per name).
    from stages.castore.fuse.content import content_name
    from stages.castore.fuse.fs import STABLE_TIMEOUT
    from stages.castore.nodes import Directory, FileNode

    digest = store.put_blob(b"#pragma once\n")
    inner = Directory.from_nodes([FileNode(name=b"stdio.h", digest=digest, size=13)])
    store.put_directories([inner])
    fs = CastoreFS(store, content=True)
    content_ino = fs._content_ino

    async def scenario() -> None:
        d = await fs.lookup(content_ino, content_name(inner.as_node(b"x")).encode(), None)
        found = await fs.lookup(d.st_ino, b"stdio.h", None)
        assert found.st_ino != 0
        missing = await fs.lookup(d.st_ino, b"missing.h", None)
        assert missing.st_ino == 0 and missing.entry_timeout == STABLE_TIMEOUT
        # The content directory can gain entries: a missing name there is
        # an error, never remembered.
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fs.lookup(content_ino, b"d-" + b"0" * 64, None)
        assert info.value.errno == errno.ENOENT

    trio.run(scenario)


def test_stored_listings_are_built_once_and_flush_is_declined(store) -> None:
    from stages.castore.fuse.content import content_name
    from stages.castore.nodes import Directory, FileNode

    digest = store.put_blob(b"x")
    inner = Directory.from_nodes([FileNode(name=f"e{i}".encode(), digest=digest, size=1)
                                  for i in range(50)])
    store.put_directories([inner])
    fs = CastoreFS(store, content=True)

    async def scenario() -> None:
        d = await fs.lookup(fs._content_ino, content_name(inner.as_node(b"x")).encode(), None)
        first = fs._listing(d.st_ino)
        assert [n for n, _ in first] == [b".", b"..", *(f"e{i}".encode()
                                                        for i in sorted(range(50), key=str))]
        assert fs._listing(d.st_ino) is first  # kept: a stored directory never changes
        content = fs._listing(fs._content_ino)
        assert fs._listing(fs._content_ino) is not content  # can gain entries: not kept
        # A read-only file system has nothing to flush: ENOSYS, once, and the
        # kernel stops sending FLUSH at every close.
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fs.flush(1)
        assert info.value.errno == errno.ENOSYS

    trio.run(scenario)

"""CastoreFS's read path without a mount: the reused read buffer, and the
page-cache fill done while verifying (the kernel side, pyfuse3.notify_store and
invalidate_inode, is replaced by recorders; the store is a real LocalStore).

The same paths run against the kernel in tests/integration/test_fuse_read_path.py.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import pyfuse3

from stages.castore import local
from stages.castore.fuse.fs import CastoreFS
from stages.castore.local import LocalStore
from stages.castore.nodes import FileNode

INODE = 42


def pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 41 + seed) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


@pytest.fixture
def store(tmp_path: Path):
    s = LocalStore(tmp_path / "store")
    yield s
    s.close()


class Kernel:
    """Records what the filesystem tells the kernel; can be told to refuse."""

    def __init__(self) -> None:
        self.stored: list[tuple[int, int, bytes]] = []
        self.invalidated: list[int] = []
        self.refuse: int | None = None

    def notify_store(self, inode: int, offset: int, data) -> None:
        if self.refuse is not None:
            raise OSError(self.refuse, "refused by the test")
        self.stored.append((inode, offset, bytes(data)))

    def invalidate_inode(self, inode: int, attr_only: bool = False) -> None:
        self.invalidated.append(inode)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    k = Kernel()
    monkeypatch.setattr(pyfuse3, "notify_store", k.notify_store)
    monkeypatch.setattr(pyfuse3, "invalidate_inode", k.invalidate_inode)
    return k


def corrupt_tail(store: LocalStore, digest: bytes, size: int) -> None:
    pack_id, start, _ = store._locate(digest)
    with open(store._pack_path(pack_id), "r+b") as f:
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


@pytest.mark.parametrize("size", [100, local.STREAM_CHUNK * 2 + 5], ids=["small", "multi-chunk"])
def test_bad_verdict_invalidates_what_was_filled(store, kernel, size) -> None:
    digest = store.put_blob(pattern(size, seed=9))
    corrupt_tail(store, digest, size)
    fs = CastoreFS(store)
    problem = fs._check_blob(digest, size, INODE)
    assert problem is not None and "corrupt" in problem and digest.hex() in problem
    assert kernel.stored, "chunks were offered before the verdict"
    assert kernel.invalidated == [INODE]


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
], ids=["head", "unaligned-1MiB", "tail-short", "past-end", "bigger-than-buffer"])
async def test_read_answers_from_the_reused_buffer(store, off, size) -> None:
    data = pattern(3 << 20, seed=4)
    digest = store.put_blob(data)
    fs = CastoreFS(store)
    fs._open[INODE] = (digest, len(data))
    got = bytes(await fs.read(INODE, off, size))
    assert got == data[off:off + size]
    # A second read into the same buffer does not change what the first returned
    # once copied (pyfuse3 copies at once), and answers its own range.
    again = bytes(await fs.read(INODE, 7, 100))
    assert again == data[7:107]


async def test_read_without_read_blob_into_falls_back_to_read_blob_at(store) -> None:
    data = pattern(10000, seed=6)
    digest = store.put_blob(data)

    class OldReader:
        blob_size = store.blob_size
        read_blob_at = store.read_blob_at
        verify_blob = store.verify_blob
        get_directory = store.get_directory

    fs = CastoreFS(OldReader())
    fs._open[INODE] = (digest, len(data))
    assert bytes(await fs.read(INODE, 5000, 8000)) == data[5000:]

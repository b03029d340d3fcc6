"""LocalStore's buffer-reusing read path: read_blob_into and verify_blob(on_chunk=).

The FUSE server reads through these (one reused buffer per server, chunks
offered to the page-cache filler while hashing), so their bounds and their
corruption reports matter as much as read_blob_at's.
"""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest

from stages.castore import local
from stages.castore.errors import CorruptionError, NotFoundError
from stages.castore.local import LocalStore


def pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 37 + seed) % 253 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


@pytest.fixture
def store(tmp_path: Path):
    s = LocalStore(tmp_path / "store")
    yield s
    s.close()


@pytest.mark.parametrize("offset,buf_len", [
    (0, 10), (3, 4), (8, 100), (10, 5), (11, 5), (0, 0),
], ids=["whole", "middle", "past-end", "at-end", "beyond-end", "empty-buffer"])
def test_read_blob_into_matches_slicing(store: LocalStore, offset: int, buf_len: int) -> None:
    data = b"0123456789"
    digest = store.put_blob(data)
    buffer = bytearray(b"\xee" * buf_len)
    n = store.read_blob_into(digest, offset, buffer)
    expected = data[offset:offset + buf_len]
    assert n == len(expected)
    assert bytes(buffer[:n]) == expected
    assert bytes(buffer[n:]) == b"\xee" * (buf_len - n)  # the rest is untouched


def test_read_blob_into_a_memoryview_slice_of_a_big_blob(store: LocalStore) -> None:
    data = pattern(3 << 20, seed=1)
    digest = store.put_blob(data)
    backing = bytearray(1 << 20)
    view = memoryview(backing)[100:100 + 5000]
    assert store.read_blob_into(digest, (2 << 20) + 7, view) == 5000
    assert bytes(view) == data[(2 << 20) + 7:(2 << 20) + 5007]


def test_read_blob_into_refuses_bad_input(store: LocalStore) -> None:
    digest = store.put_blob(b"abc")
    with pytest.raises(NotFoundError):
        store.read_blob_into(blake3.blake3(b"other").digest(), 0, bytearray(4))
    with pytest.raises(ValueError, match="negative offset"):
        store.read_blob_into(digest, -1, bytearray(4))


def test_read_blob_into_reports_a_truncated_pack(store: LocalStore) -> None:
    data = pattern(5000)
    digest = store.put_blob(data)
    pack_id, start, _ = store._locate(digest)
    path = store._pack_path(pack_id)
    with open(path, "r+b") as f:
        f.truncate(start + 100)
    with pytest.raises(CorruptionError, match=digest.hex()):
        store.read_blob_into(digest, 0, bytearray(5000))


@pytest.mark.parametrize("size", [0, 1, 4096, local.STREAM_CHUNK + 12345],
                         ids=["empty", "1B", "4KiB", "over-one-chunk"])
def test_verify_blob_offers_every_byte_in_order(store: LocalStore, size: int) -> None:
    data = pattern(size, seed=3)
    digest = store.put_blob(data)
    seen: list[tuple[int, bytes]] = []
    store.verify_blob(digest, on_chunk=lambda off, chunk: seen.append((off, bytes(chunk))))
    assert b"".join(c for _, c in seen) == data
    offsets = [off for off, _ in seen]
    assert offsets == sorted(offsets)
    assert all(off == sum(len(c) for _, c in seen[:i]) for i, (off, _) in enumerate(seen))


def test_verify_blob_with_on_chunk_still_names_corruption(store: LocalStore) -> None:
    data = pattern(local.STREAM_CHUNK + 999, seed=4)
    digest = store.put_blob(data)
    pack_id, start, _ = store._locate(digest)
    with open(store._pack_path(pack_id), "r+b") as f:
        f.seek(start + len(data) - 3)
        f.write(b"\x00\x01\x02")
    offered = []
    with pytest.raises(CorruptionError, match=digest.hex()):
        store.verify_blob(digest, on_chunk=lambda off, chunk: offered.append(len(chunk)))
    # the caller saw the (unverified) bytes before the verdict: that is the contract
    assert sum(offered) == len(data)

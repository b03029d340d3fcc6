"""LocalStore's read paths for the FUSE server: verify_blob(on_chunk=) and
map_blob (zero-copy views of a pack).

The FUSE server reads through these (replies are slices of a mapping; the
page-cache filler may see verification's chunks), so their bounds and
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
    pack_id, start, _ = store.locate(digest)
    with open(store.pack_path(pack_id), "r+b") as f:
        f.seek(start + len(data) - 3)
        f.write(b"\x00\x01\x02")
    offered = []
    with pytest.raises(CorruptionError, match=digest.hex()):
        store.verify_blob(digest, on_chunk=lambda off, chunk: offered.append(len(chunk)))
    # the caller saw unverified chunks before the verdict, all but the last
    assert 0 < sum(offered) < len(data)


# --- map_blob: zero-copy views for the kernel to copy from ----------------------

def test_map_blob_views_each_blob_of_a_pack(store: LocalStore) -> None:
    blobs = [pattern(n, seed=n % 7) for n in (1, 4095, 4097, 1 << 20, 3)]
    digests = [store.put_blob(b) for b in blobs]
    for data, digest in zip(blobs, digests):
        mapped = store.map_blob(digest)
        assert mapped.size == len(data)
        assert bytes(mapped.view) == data
        assert mapped.intact()


def test_map_blob_maps_again_for_blobs_written_after_the_mapping(store: LocalStore) -> None:
    first = store.put_blob(pattern(10_000, seed=1))
    early = store.map_blob(first)
    later_data = pattern(2 << 20, seed=2)
    later = store.put_blob(later_data)
    assert store.locate(later)[0] == store.locate(first)[0], "same pack expected"
    assert bytes(store.map_blob(later).view) == later_data
    assert bytes(early.view) == pattern(10_000, seed=1)  # the old view stays valid


def test_map_blob_of_a_short_pack_is_corruption_before_mapping(store: LocalStore) -> None:
    digest = store.put_blob(pattern(9000))
    pack_id, start, _ = store.locate(digest)
    with open(store.pack_path(pack_id), "r+b") as f:
        f.truncate(start + 10)
    with pytest.raises(CorruptionError, match=digest.hex()):
        store.map_blob(digest)
    with pytest.raises(NotFoundError):
        store.map_blob(blake3.blake3(b"absent").digest())


def test_intact_notices_a_pack_truncated_under_the_mapping(store: LocalStore) -> None:
    digest = store.put_blob(pattern(3 << 20))
    mapped = store.map_blob(digest)
    assert mapped.intact()
    pack_id, start, _ = store.locate(digest)
    with open(store.pack_path(pack_id), "r+b") as f:
        f.truncate(start + (1 << 20))
    assert not mapped.intact()  # the caller must not touch the view now


def _pack_mapping_rss_kib(pack: Path) -> int:
    """Rss of this process's mapping(s) of the pack file, from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                inside = len(fields) >= 6 and fields[-1] == str(pack)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_forget_unmaps_touched_pages_and_keeps_the_bytes(store: LocalStore) -> None:
    data = pattern(8 << 20, seed=5)
    digest = store.put_blob(data)
    pack = store.pack_path(store.locate(digest)[0])
    mapped = store.map_blob(digest)
    assert bytes(mapped.view) == data  # touches every page of the blob
    before = _pack_mapping_rss_kib(pack)
    assert before >= (8 << 20) // 1024
    mapped.forget(0, mapped.size)
    after = _pack_mapping_rss_kib(pack)
    assert after <= before - (7 << 20) // 1024
    assert bytes(mapped.view[:4096]) == data[:4096]  # still readable (the page cache)
    mapped.forget(-5, 10 ** 12)  # ranges are clipped to the blob


def test_close_with_a_view_still_in_use_does_not_fail(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "store2")
    digest = s.put_blob(b"kept alive")
    mapped = s.map_blob(digest)
    s.close()
    assert bytes(mapped.view) == b"kept alive"

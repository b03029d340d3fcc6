"""Reference scanning (stages.castore.refscan) against a naive reference.

The reference is ``needle in data`` for each needle, over the bytes the test
itself wrote (file contents and symlink targets of the output). Chunk,
segment and batch sizes are shrunk with ``_sizes`` so that small generated
data crosses many chunk and segment boundaries and takes the threaded path.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.castore import refscan
from stages.castore.errors import CastoreError
from stages.castore.refscan import NeedleError, NeedleScanner, RefScanError, scan_outputs

NIXBASE32 = "0123456789abcdfghijklmnpqrsvwxyz"


def naive(needles: list[bytes], data: bytes) -> set[int]:
    return {i for i, n in enumerate(needles) if n in data}


@contextlib.contextmanager
def _sizes(chunk: int, segment: int | None = None, parallel_min: int | None = None,
           batch_bytes: int | None = None, batch_files: int | None = None,
           direct: bool = True) -> Iterator[None]:
    """Scan in these sizes; ``direct=False``: Hyperscan even for small blocks
    (the properties below hold for both engines)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(refscan, "CHUNK_SIZE", chunk))
        if not direct:
            stack.enter_context(mock.patch.object(refscan, "DIRECT_MAX_BYTES", 0))
        for name, value in (("_SEGMENT", segment), ("_PARALLEL_MIN", parallel_min),
                            ("_BATCH_BYTES", batch_bytes), ("_BATCH_FILES", batch_files)):
            if value is not None:
                stack.enter_context(mock.patch.object(refscan, name, value))
        yield


# --- strategies --------------------------------------------------------------

# A small alphabet makes needles overlap, repeat and prefix each other often;
# with NUL in it the scanner takes its escaped-regex path.
alphabets = st.sampled_from([b"ab", b"abc", b"ab\0", bytes(range(256))])


@st.composite
def needles_and_data(draw: st.DrawFn, equal_length: bool | None = None
                     ) -> tuple[list[bytes], bytes]:
    alphabet = draw(alphabets)
    letters = st.sampled_from(alphabet)
    if equal_length is None:
        equal_length = draw(st.booleans())
    if equal_length:
        length = draw(st.integers(1, 12))
        needle = st.lists(letters, min_size=length, max_size=length).map(bytes)
    else:
        needle = st.lists(letters, min_size=1, max_size=12).map(bytes)
    needles = draw(st.lists(needle, min_size=1, max_size=12))
    # Data: random filler with some needles planted (maybe several times).
    pieces = draw(st.lists(
        st.one_of(st.lists(letters, max_size=20).map(bytes), st.sampled_from(needles)),
        max_size=20))
    return needles, b"".join(pieces)


chunk_sizes = st.integers(1, 16)


# --- scan_bytes and streams --------------------------------------------------

@given(needles_and_data(), chunk_sizes, st.booleans())
@settings(max_examples=150, deadline=None)
def test_scan_bytes_matches_naive(case: tuple[list[bytes], bytes], chunk: int,
                                  direct: bool) -> None:
    needles, data = case
    with _sizes(chunk, direct=direct):
        assert NeedleScanner(needles).scan_bytes(data) == naive(needles, data)


@given(needles_and_data(), st.lists(st.integers(0, 400), max_size=10), st.booleans())
@settings(max_examples=150, deadline=None)
def test_stream_finds_needles_across_feeds(case: tuple[list[bytes], bytes],
                                           cuts: list[int], direct: bool) -> None:
    needles, data = case
    with _sizes(refscan.CHUNK_SIZE, direct=direct):
        scanner = NeedleScanner(needles)
        stream = scanner.stream()
        bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
        for a, b in zip(bounds, bounds[1:]):
            stream.feed(data[a:b])
        assert stream.found == naive(needles, data)


def test_stream_needle_split_byte_by_byte() -> None:
    needles = [b"hello world", b"lo w", b"x"]
    stream = NeedleScanner(needles).stream()
    for byte in b"say hello world":
        stream.feed(bytes([byte]))
    stream.feed(b"")
    assert stream.found == {0, 1}


@pytest.mark.parametrize(("needles", "data", "expected"), [
    ([b"abc", b"bcd"], b"abcd", {0, 1}),                    # overlapping occurrences
    ([b"a", b"ab", b"abc", b"abcd"], b"abc", {0, 1, 2}),    # prefixes of each other
    ([b"bc", b"abc"], b"abc", {0, 1}),                      # suffix of another
    (["nix", "nix"], b"nix", {0, 1}),                       # duplicates: both indexes
    ([b"a\0b", b"\0"], b"xa\0by", {0, 1}),                  # NUL bytes in needles
    (["\u00e9t\u00e9"], "\u00e9t\u00e9".encode(), {0}),     # str needles are UTF-8
    ([b"aa"], b"a", set()),
    ([], b"anything", set()),
], ids=["overlap", "prefixes", "suffix", "duplicates", "nul", "utf8", "longer-than-data",
        "no-needles"])
def test_scan_bytes_cases(needles: list, data: bytes, expected: set[int]) -> None:
    assert NeedleScanner(needles).scan_bytes(data) == expected


def test_nix_hash_parts_at_chunk_boundaries() -> None:
    """Equal-length nixbase32 needles inside store paths, each spanning a boundary."""
    import random
    rnd = random.Random(7)
    needles = ["".join(rnd.choices(NIXBASE32, k=32)) for _ in range(200)]
    chunk = 1000
    data = bytearray(rnd.choices(NIXBASE32.encode(), k=50 * chunk))
    planted = set(range(0, 200, 3))
    for k, i in enumerate(sorted(planted)):
        path = f"/nix/store/{needles[i]}-pkg".encode()
        # Cross the boundary between chunks k+1 and k+2 at offset k % 32 into the hash.
        offset = (k + 1) * chunk - 11 - (k % 32)
        data[offset:offset + len(path)] = path
    with _sizes(chunk):
        assert NeedleScanner(needles).scan_bytes(bytes(data)) == naive(
            [n.encode() for n in needles], bytes(data))
        assert planted <= NeedleScanner(needles).scan_bytes(bytes(data))


def test_scanner_shared_by_threads() -> None:
    """One scanner, many threads at once: each thread has its own scratch space."""
    from concurrent.futures import ThreadPoolExecutor
    rnd = __import__("random").Random(5)
    needles = [bytes(rnd.choices(b"ab", k=rnd.randint(3, 9))) for _ in range(40)]
    datas = [bytes(rnd.choices(b"abc", k=rnd.randint(0, 3000))) for _ in range(64)]
    scanner = NeedleScanner(needles)
    with _sizes(97), ThreadPoolExecutor(4) as pool:
        results = list(pool.map(scanner.scan_bytes, datas))
    assert results == [naive(needles, d) for d in datas]


# --- paths ---------------------------------------------------------------------

def _write_tree(root: Path, spec: object) -> None:
    """bytes: a file; ("l", target): a symlink; dict: a directory."""
    if isinstance(spec, dict):
        root.mkdir()
        for name, sub in spec.items():
            _write_tree(root / name, sub)
    elif isinstance(spec, tuple):
        os.symlink(spec[1], root)
    else:
        root.write_bytes(spec)


def _tree_bytes(spec: object) -> list[bytes]:
    """What a scan must see: file contents and symlink targets, no names."""
    if isinstance(spec, dict):
        return [b for sub in spec.values() for b in _tree_bytes(sub)]
    if isinstance(spec, tuple):
        return [spec[1]]
    return [spec]


@given(needles_and_data(), st.integers(0, 6), chunk_sizes, st.integers(1, 64), st.booleans())
@settings(max_examples=100, deadline=None)
def test_scan_file_matches_naive(case: tuple[list[bytes], bytes], extra: int, chunk: int,
                                 segment: int, direct: bool) -> None:
    """Files cut into segments and chunks, scanned in threads, find what `in` finds."""
    needles, data = case
    data = data * (extra + 1)
    with tempfile.TemporaryDirectory() as tmp, \
            _sizes(chunk, segment=segment, parallel_min=0, direct=direct):
        path = Path(tmp) / "out"
        path.write_bytes(data)
        assert NeedleScanner(needles).scan_path(path) == naive(needles, data)


names = st.text(alphabet="abcxyz", min_size=1, max_size=4)


def trees(leaves: st.SearchStrategy[bytes]) -> st.SearchStrategy[object]:
    targets = st.one_of(leaves.filter(lambda b: b and b"\0" not in b),
                        st.just(b"dangling/nowhere"))
    leaf = st.one_of(leaves, st.tuples(st.just("l"), targets))
    return st.recursive(leaf, lambda kids: st.dictionaries(names, kids, max_size=4),
                        max_leaves=12)


@st.composite
def needles_and_tree(draw: st.DrawFn) -> tuple[list[bytes], dict]:
    alphabet = draw(st.sampled_from([b"ab", b"abc/"]))
    letters = st.sampled_from(alphabet)
    needles = draw(st.lists(st.lists(letters, min_size=1, max_size=6).map(bytes),
                            min_size=1, max_size=8))
    leaves = st.lists(st.one_of(st.lists(letters, max_size=8).map(bytes),
                                st.sampled_from(needles)), max_size=6).map(b"".join)
    tree = draw(st.dictionaries(names, trees(leaves), max_size=5))
    return needles, tree


@given(needles_and_tree(), chunk_sizes, st.integers(1, 3), st.booleans())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_scan_tree_matches_naive(case: tuple[list[bytes], dict], chunk: int,
                                 batch_files: int, direct: bool) -> None:
    needles, tree = case
    with tempfile.TemporaryDirectory() as tmp, \
            _sizes(chunk, segment=5, parallel_min=0, batch_bytes=8, batch_files=batch_files,
                   direct=direct):
        root = Path(tmp) / "out"
        _write_tree(root, tree)
        expected = set().union(*(naive(needles, b) for b in _tree_bytes(tree)))
        assert NeedleScanner(needles).scan_path(root) == expected


def test_tree_rules(tmp_path: Path) -> None:
    """Targets are scanned and not followed; names are not scanned; empty files are fine."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"FOLLOWED")
    needles = [b"FOLLOWED", b"NAME", b"TARGET", b"DEEP", b"LINKDIR", b"/outside"]
    tree = {
        "NAME": b"",                                   # a name holding a needle, empty file
        "empty": b"",
        "a": {"b": {"c": {"d": b"xxDEEPxx"}}},         # nested directories
        "link": ("l", str(outside).encode()),          # target holds "/outside"
        "dangling": ("l", b"TARGET/none"),             # dangling, target scanned
        "linkdir": ("l", str(tmp_path).encode()),      # a link to a dir is not entered
        "emptydir": {},
    }
    root = tmp_path / "out"
    _write_tree(root, tree)
    scanner = NeedleScanner(needles)
    assert scanner.scan_path(root) == {2, 3, 5}
    # An output that is itself a symlink: its target, never the file behind it.
    assert scanner.scan_path(root / "link") == {5}
    assert scanner.scan_path(root / "dangling") == {2}
    assert scanner.scan_path(root / "empty") == set()
    assert scanner.scan_path(str(root / "a")) == {3}


def test_scan_outputs_per_output_sorted(tmp_path: Path) -> None:
    needles = ["zzz", "one", "two", "both"]
    (tmp_path / "o1").write_bytes(b"two ... one both")
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "f").write_bytes(b"both")
    os.symlink("nothing", tmp_path / "o3")
    paths = [tmp_path / "o1", tmp_path / "o2", tmp_path / "o3"]
    assert scan_outputs(NeedleScanner(needles), paths) == [[1, 2, 3], [3], []]
    assert scan_outputs(NeedleScanner(needles), []) == []


def test_big_file_segments_in_threads(tmp_path: Path) -> None:
    """Needles straddling every segment and chunk boundary of a multi-segment file."""
    import random
    rnd = random.Random(3)
    needles = [bytes(rnd.choices(NIXBASE32.encode(), k=32)) for _ in range(64)]
    segment, chunk = 1 << 16, 1 << 12
    data = bytearray(os.urandom(40 * segment))
    for k in range(1, 40):
        off = k * segment - 16 + (k % 16)
        data[off:off + 32] = needles[k]
    for k in range(1, 20):
        off = k * chunk * 3 - 31
        data[off:off + 32] = needles[40 + k]
    path = tmp_path / "big"
    path.write_bytes(data)
    with _sizes(chunk, segment=segment, parallel_min=0):
        assert NeedleScanner(needles).scan_path(path) == naive(needles, bytes(data))
    # Defaults: one file smaller than a segment, scanned inline.
    assert NeedleScanner(needles).scan_path(path) == naive(needles, bytes(data))


def test_many_files_in_threads_and_early_stop(tmp_path: Path) -> None:
    needles = [b"needle-%d" % i for i in range(50)]
    root = tmp_path / "out"
    root.mkdir()
    for i in range(300):
        (root / f"f{i}").write_bytes(b"x" * 100 + needles[i % 50] + b"y" * 100)
    with _sizes(64, segment=128, parallel_min=0, batch_bytes=1000, batch_files=4):
        assert NeedleScanner(needles).scan_path(root) == set(range(50))
        # Needles 0..49 and one that never occurs: no early stop, all files read.
        assert NeedleScanner([*needles, b"absent"]).scan_path(root) == set(range(50))


# --- bad input -----------------------------------------------------------------

@pytest.mark.parametrize(("needles", "index", "words"), [
    (["ok", ""], 1, "empty"),
    ([b""], 0, "empty"),
    (["ok", "fine", 7], 2, "int"),
    ([None], 0, "NoneType"),
    ("abc", 0, "sequence"),
    (b"abc", 0, "sequence"),
], ids=["empty-str", "empty-bytes", "int", "none", "bare-str", "bare-bytes"])
def test_bad_needles(needles: object, index: int, words: str) -> None:
    with pytest.raises(NeedleError) as info:
        NeedleScanner(needles)  # type: ignore[arg-type]  # bad needles are the test
    assert info.value.index == index
    assert f"needle {index}" in str(info.value) and words in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CastoreError)


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
    finally:
        sock.close()


@pytest.mark.parametrize(("make", "kind"), [
    (os.mkfifo, "FIFO"),
    (_socket, "socket"),
], ids=["fifo", "socket"])
@pytest.mark.parametrize("nested", [False, True], ids=["output", "inside-tree"])
def test_special_files_refused(tmp_path: Path, make, kind: str, nested: bool) -> None:
    root = tmp_path / "out"
    root.mkdir()
    (root / "fine").write_bytes(b"abc")
    bad = root / "sub" / "special" if nested else tmp_path / "special"
    bad.parent.mkdir(exist_ok=True)
    make(bad)
    with pytest.raises(RefScanError) as info:
        NeedleScanner(["abc"]).scan_path(root if nested else bad)
    assert info.value.path == bad
    assert kind in str(info.value) and str(bad) in str(info.value)
    # Refused even with no needles: the output itself is invalid.
    with pytest.raises(RefScanError):
        NeedleScanner([]).scan_path(root if nested else bad)


def test_file_replaced_after_walk(tmp_path: Path) -> None:
    """A walked file that became a FIFO or symlink before the read is refused, not followed."""
    scanner = NeedleScanner(["x"])
    fifo, link = tmp_path / "fifo", tmp_path / "link"
    os.mkfifo(fifo)  # opening it for reading must not wait for a writer
    os.symlink("/etc/passwd", link)
    buf = bytearray(refscan.CHUNK_SIZE)
    with pytest.raises(RefScanError, match="no longer a regular file") as info:
        scanner._scan_range(os.fsencode(fifo), 0, None, buf, set())
    assert info.value.path == fifo
    with pytest.raises(RefScanError, match="cannot open") as info:
        scanner._scan_range(os.fsencode(link), 0, None, buf, set())
    assert info.value.path == link


def test_device_and_missing_refused(tmp_path: Path) -> None:
    with pytest.raises(RefScanError, match="character device") as info:
        NeedleScanner(["x"]).scan_path(Path("/dev/null"))
    assert info.value.path == Path("/dev/null")
    missing = tmp_path / "nope"
    with pytest.raises(RefScanError, match="No such file") as info:
        NeedleScanner(["x"]).scan_path(missing)
    assert info.value.path == missing


def test_small_outputs_need_no_database() -> None:
    """A scanner searches its first bytes directly; it compiles Hyperscan only
    once it has seen more (and finds the same either way)."""
    needles = [b"aaaa", b"zz\0zz", b"q" * 40]
    scanner = NeedleScanner(needles)
    small = b"xx aaaa yy zz\0zz"
    assert scanner.scan_bytes(small) == {0, 1}
    assert scanner._db is None
    big = bytes(refscan.DIRECT_MAX_BYTES) + small + b"q" * 40
    assert scanner.scan_bytes(big) == {0, 1, 2}
    assert scanner._db is not None
    many = [bytes([65 + i]) * 3 for i in range(refscan.DIRECT_MAX_NEEDLES + 1)]
    assert NeedleScanner(many).scan_bytes(b"xxBBBx") == {1}  # too many needles: Hyperscan

"""The Nix path-info database: registration rules, errors, atomicity under SIGKILL."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import blake3
import pytest

from stages.castore import nixbase32
from stages.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from stages.nix.errors import NixError
from stages.nix.pathinfo import (
    PathInfo,
    PathInfoCorrupt,
    PathInfoDB,
    PathInfoError,
    PathNotRegistered,
    pathinfo_path_for,
)

REPO = Path(__file__).resolve().parents[2]


def store_path(name: str, seed: int | None = None) -> str:
    rnd = random.Random(seed) if seed is not None else random
    return f"/nix/store/{nixbase32.encode(bytes(rnd.getrandbits(8) for _ in range(20)))}-{name}"


def info(path: str, refs=(), deriver=None, data: bytes = b"x") -> PathInfo:
    node = FileNode(name=b"ignored", digest=blake3.blake3(data).digest(), size=len(data))
    return PathInfo(path=path, node=node, references=refs, nar_sha256=bytes(range(32)),
                    nar_size=120, deriver=deriver)


@pytest.fixture
def db(tmp_path: Path):
    with PathInfoDB(tmp_path / "pi.sqlite") as d:
        yield d


def test_register_and_read_back(db: PathInfoDB) -> None:
    a, b = store_path("a", 1), store_path("b", 2)
    assert db.register([info(a)]) == [a]
    assert db.register([info(b, refs=[b, a], deriver=store_path("b.drv", 3))]) == [b]
    got = db.get(b)
    assert got.references == tuple(sorted([a, b]))  # self-reference kept, sorted
    assert got.node.name == b.rsplit("/", 1)[1].encode()  # named by the basename
    assert got.nar_hash == "sha256:" + nixbase32.encode(bytes(range(32)))
    assert got.deriver == store_path("b.drv", 3)
    assert db.closure([b]) == {a, b}
    assert db.has(a) and db.paths() == sorted([a, b])


def test_every_node_kind_round_trips(db: PathInfoDB) -> None:
    nodes = [FileNode(name=b"n", digest=b"\1" * 32, size=3, executable=True),
             DirectoryNode(name=b"n", digest=b"\2" * 32, size=7),
             SymlinkNode(name=b"n", target=b"../x")]
    paths = [store_path(f"k{i}", 10 + i) for i in range(3)]
    db.register([PathInfo(path=p, node=n, references=(), nar_sha256=b"\0" * 32, nar_size=8)
                 for p, n in zip(paths, nodes)])
    for p, n in zip(paths, nodes):
        assert db.get(p).node == n.renamed(p.rsplit("/", 1)[1].encode())


def test_missing_path_is_a_clear_lookup_error(db: PathInfoDB) -> None:
    p = store_path("nope", 4)
    assert db.find(p) is None
    with pytest.raises(PathNotRegistered, match="nope: not registered") as exc:
        db.get(p)
    assert isinstance(exc.value, LookupError) and isinstance(exc.value, NixError)


def test_dangling_reference_refused_and_nothing_written(db: PathInfoDB) -> None:
    a, b, missing = store_path("a", 5), store_path("b", 6), store_path("m", 7)
    with pytest.raises(PathInfoError, match=f"references {missing}, which is not registered"):
        db.register([info(a, refs=[b]), info(b, refs=[missing])])
    assert db.paths() == []  # a was not registered either: one transaction


def test_references_within_one_call_and_cycles_between_outputs(db: PathInfoDB) -> None:
    out, dev = store_path("x", 8), store_path("x-dev", 9)
    db.register([info(out, refs=[dev]), info(dev, refs=[out, dev])])
    assert db.closure([out]) == {out, dev}


def test_reregistering_keeps_the_first(db: PathInfoDB) -> None:
    a = store_path("a", 11)
    db.register([info(a, data=b"first")])
    assert db.register([info(a, data=b"second")]) == []
    assert db.get(a).node.size == len(b"first")


def test_bad_values_are_refused() -> None:
    with pytest.raises(NixError, match="not a valid store path"):
        info("/tmp/x")
    with pytest.raises(PathInfoError, match="32 sha256 bytes"):
        PathInfo(path=store_path("a", 12), node=SymlinkNode(name=b"a", target=b"t"),
                 references=(), nar_sha256=b"short", nar_size=8)


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "pi.sqlite"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(PathInfoCorrupt, match="not a usable path-info database"):
        PathInfoDB(bad)


def test_damaged_row_is_named(db: PathInfoDB) -> None:
    a = store_path("a", 13)
    db.register([info(a)])
    db._conn.execute("UPDATE paths SET node = X'ffff'")
    with pytest.raises(PathInfoCorrupt, match="damaged"):
        db.get(a)


def test_location_follows_the_blob_store(tmp_path: Path) -> None:
    assert pathinfo_path_for("memory://") is None
    assert pathinfo_path_for(f"local://{tmp_path}") == tmp_path / "nix-pathinfo.sqlite"
    with PathInfoDB(None) as mem:
        mem.register([info(store_path("m", 14))])
        assert len(mem.paths()) == 1


# --- crash safety -------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, blake3
    sys.path.insert(0, sys.argv[2])
    from stages.castore.nodes import FileNode
    from stages.castore import nixbase32
    from stages.nix.pathinfo import PathInfo, PathInfoDB

    db = PathInfoDB(sys.argv[1])
    n = 0
    print("ready", flush=True)
    while True:
        n += 1
        # One "build" with five outputs referencing each other, registered at once.
        drv = "/nix/store/" + nixbase32.encode(blake3.blake3(b"d%s-%d" % (sys.argv[3].encode(), n)).digest(20)) + "-b.drv"
        outs = ["/nix/store/" + nixbase32.encode(blake3.blake3(b"o%s-%d-%d" % (sys.argv[3].encode(), n, i)).digest(20))
                + "-out%d" % i for i in range(5)]
        node = FileNode(name=b"x", digest=blake3.blake3(b"x").digest(), size=1)
        db.register([PathInfo(path=p, node=node, references=outs, nar_sha256=b"\\1" * 32,
                              nar_size=8, deriver=drv) for p in outs])
""")


def test_sigkill_mid_registration_leaves_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "pi.sqlite"
    for round_ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(REPO), str(round_)],
                                stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            time.sleep(random.uniform(0.01, 0.15))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        with PathInfoDB(path) as db:
            by_drv: dict[str, list[str]] = {}
            for p in db.paths():
                got = db.get(p)
                by_drv.setdefault(got.deriver, []).append(p)
                # Every path has all five references: no half-written path.
                assert len(got.references) == 5, (round_, p, got.references)
            for drv, outs in by_drv.items():
                assert len(outs) == 5, (round_, drv, outs)  # no half-registered build
                assert db.closure(outs[:1]) == set(outs)
    with PathInfoDB(path) as db:
        assert db.paths(), "no writer ever committed anything; the test proved nothing"

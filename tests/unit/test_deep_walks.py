"""Trees far deeper than Python's recursion limit and the kernel's PATH_MAX.

Every walk over a tree a builder or a request shapes is iterative: removal
(:func:`stages.oci.layout.rmtree`), ingest, NAR rendering, reference
scanning, export, copies between stores and over gRPC, the Nix build plan.
The trees here are 10,000 directories deep (20,000 bytes of path), ten times
the default recursion limit, which the tests leave as it is.

The NARs expected are written here from the grammar (tests/nar_oracle.py),
level by level; tests/integration/test_deep_trees.py holds them against
``nix-store --dump``.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import resource
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nar_oracle import expected_nar, s

from stages.castore.addresses import Castore, open_castore
from stages.castore.copy import copy_node
from stages.castore.errors import IngestError, NotFoundError
from stages.castore.ingest import ingest_path
from stages.castore.nar import nar_bytes, nar_chunks
from stages.castore.nodes import Directory, DirectoryNode, FileNode
from stages.castore.refscan import NeedleScanner, RefScanError
from stages.grpc.castore_client import GrpcBlobService, GrpcDirectoryService
from stages.grpc.castore_reader import GrpcSyncReader
from stages.grpc.castore_server import start_castore_server
from stages.nix.build import _check_output_cycles, _Plan
from stages.nix.derivation import Derivation, DerivationOutput
from stages.nix.errors import NixError
from stages.nix.export import export_node
from stages.nix.pathinfo import PathInfo, PathInfoDB
from stages.oci.layout import BundleLayout, remove_bundle, rmtree
from stages.util.deeptree import PATH_BUDGET, DeepTree, Place

DEPTH = 10_000
NOBODY = 65534
MAGIC = s(b"nix-archive-1")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

assert DEPTH > 5 * sys.getrecursionlimit()
assert 2 * DEPTH > os.pathconf("/", "PC_PATH_MAX")


# --- trees on disk, and their NARs from the grammar ---------------------------------

# A level's extra entries beside its "d": name -> bytes (a file), ("x", bytes)
# (an executable), ("l", target) (a symlink); or a dict (a directory of those).
Extras = dict[bytes, Any]


def _write_leaf(fd: int, name: bytes, spec: Any, owner: int | None) -> None:
    if isinstance(spec, dict):
        os.mkdir(name, 0o755, dir_fd=fd)
        sub = os.open(name, DIR_FLAGS, dir_fd=fd)
        try:
            for n, v in spec.items():
                _write_leaf(sub, n, v, owner)
        finally:
            os.close(sub)
    elif isinstance(spec, bytes) or spec[0] == "x":
        data = spec if isinstance(spec, bytes) else spec[1]
        mode = 0o644 if isinstance(spec, bytes) else 0o755
        f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, dir_fd=fd)
        try:
            os.write(f, data)
            os.fchmod(f, mode)
        finally:
            os.close(f)
    else:
        os.symlink(spec[1], name, dir_fd=fd)
    if owner is not None:
        os.chown(name, owner, owner, dir_fd=fd, follow_symlinks=False)


def make_chain(root: Path | str, depth: int, *, bottom: Extras | None = None,
               extras: Callable[[int], Extras | None] = lambda level: None,
               owner: int | None = None, name: bytes = b"d") -> None:
    """``root``/d/d/.../d (``depth`` of them), ``bottom`` in the last, ``extras(level)``
    beside the "d" of each level (level 0: the root)."""
    os.mkdir(root)
    if owner is not None:
        os.chown(root, owner, owner)
    fd = os.open(root, DIR_FLAGS)
    try:
        for level in range(depth + 1):
            for n, v in (extras(level) or {}).items():
                _write_leaf(fd, n, v, owner)
            if level == depth:
                for n, v in (bottom or {}).items():
                    _write_leaf(fd, n, v, owner)
                break
            os.mkdir(name, dir_fd=fd)
            if owner is not None:
                os.chown(name, owner, owner, dir_fd=fd)
            child = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def _entries(spec: Extras) -> list[tuple[bytes, bytes]]:
    """(name, NAR entry) of a directory's extra entries."""
    return [(n, s(b"entry") + s(b"(") + s(b"name") + s(n) + s(b"node")
             + expected_nar(v)[len(MAGIC):] + s(b")")) for n, v in spec.items()]


def chain_nar(depth: int, *, bottom: Extras | None = None,
              extras: Callable[[int], Extras | None] = lambda level: None,
              name: bytes = b"d") -> bytes:
    """The NAR of :func:`make_chain`'s tree, level by level (no recursion)."""
    heads, tails = [], []
    for level in range(depth):
        entries = sorted(_entries(extras(level) or {}))
        heads.append(s(b"(") + s(b"type") + s(b"directory")
                     + b"".join(e for n, e in entries if n < name)
                     + s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node"))
        tails.append(s(b")") + b"".join(e for n, e in entries if n > name) + s(b")"))
    last = {**(extras(depth) or {}), **(bottom or {})}
    return MAGIC + b"".join(heads) + expected_nar(last)[len(MAGIC):] + b"".join(reversed(tails))


def at_bottom(root: Path, depth: int, name: bytes, fn: Callable[..., object]) -> None:
    """``fn(path, dir_fd=...)`` on entry ``name`` of the bottom of a chain."""
    with DeepTree(root) as tree:
        place = tree.top
        for _ in range(depth):
            place = tree.child(place, b"d")
        with tree.opened(place, name) as (path, dir_fd):
            fn(path, dir_fd=dir_fd)


def gone(path: Path | str) -> bool:
    return not os.path.lexists(path)


@pytest.fixture
def base():
    """A directory others can traverse (for the tests that drop root)."""
    path = Path(tempfile.mkdtemp(prefix="deep-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        if os.path.lexists(path):
            rmtree(path, ignore_errors=True)


def in_child(fn: Callable[[], object], *, uid: int | None = None,
             nofile: int | None = None) -> str:
    """Run ``fn`` in a forked child, as ``uid`` and with at most ``nofile`` fds;
    what it returned (repr), or AssertionError with what it raised.

    Forked, not spawned: a plain user cannot start this Python (its home is
    root's, 0700), and the child needs nothing it has not loaded.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            if nofile is not None:
                used = len(os.listdir("/proc/self/fd"))
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (used + nofile, hard))
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.write(w, repr(fn()).encode())
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(w, f"{type(exc).__name__}: {exc}".encode()[:65536])
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise AssertionError(f"the child failed: {out}")
    return out


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="drops root to a plain user")


# --- DeepTree -------------------------------------------------------------------------

def test_deep_tree_keeps_every_path_short_and_names_the_real_one(base: Path) -> None:
    root = base / "t"
    make_chain(root, DEPTH)
    with DeepTree(root) as tree:
        place, full = tree.top, os.fsencode(root)
        anchors = set()
        for _ in range(DEPTH):
            place, full = tree.child(place, b"d"), full + b"/d"
            anchors.add(id(place.anchor))
            assert tree.display(place) == full
            assert tree.display(place, b"x") == full + b"/x"
            assert len(tree.path(place, b"x" * 255)) <= PATH_BUDGET + 256 + 1
        with tree.opened(place) as (path, dir_fd):
            assert dir_fd is not None  # far below any plain path
            assert os.stat(path, dir_fd=dir_fd).st_ino == os.stat(
                tree.proc_path(place, b".")).st_ino
        assert 2 * DEPTH // PATH_BUDGET <= len(anchors) <= 4 * DEPTH // PATH_BUDGET


def test_deep_tree_opens_few_anchors_and_reopens_them(base: Path) -> None:
    root = base / "t"
    make_chain(root, DEPTH)
    fds = len(os.listdir("/proc/self/fd"))
    with DeepTree(root, max_open=3) as tree:
        places = [tree.top]
        for _ in range(DEPTH):
            places.append(tree.child(places[-1], b"d"))
        seen = []
        for place in [*places, *reversed(places)]:  # down, then up again
            fd = tree.open_dir(place)
            seen.append(os.fstat(fd).st_ino)
            os.close(fd)
            assert len(os.listdir("/proc/self/fd")) <= fds + 3 + 1
        assert seen == seen[::-1] and len(set(seen)) == DEPTH + 1


def test_deep_tree_refuses_a_directory_replaced_under_it(base: Path) -> None:
    root = base / "t"
    make_chain(root, 1000)
    with DeepTree(root, max_open=1) as tree:
        place = tree.top
        for _ in range(1000):
            place = tree.child(place, b"d")
        os.close(tree.open_dir(place))
        tree.forget(place.anchor)
        anchored = tree.display(Place(place.anchor, b""))
        assert len(anchored) < 4096 and place.rel  # an anchor between the root and place
        os.rename(anchored, base / "old")
        make_chain(os.fsdecode(anchored), 1000)
        with pytest.raises(OSError) as caught:
            tree.open_dir(place)
        assert caught.value.errno == errno.ESTALE


# --- removal ------------------------------------------------------------------------

def test_rmtree_removes_a_deep_tree_never_following_symlinks(base: Path) -> None:
    outside = base / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"kept")

    def extras(level: int) -> Extras | None:
        if level % 997:
            return None
        return {b"f": b"x", b"x": ("x", b"#!"), b"l": ("l", str(outside).encode()),
                b"rel": ("l", b"../../.."), b"e": {}, b"\xff\xfe": b"non-UTF-8",
                b"sub": {b"a": b"1", b"b": {b"c": b"2"}}}

    make_chain(base / "t", DEPTH, extras=extras, bottom={b"bottom": b"end"})
    rmtree(base / "t")
    assert gone(base / "t")
    assert (outside / "keep").read_bytes() == b"kept"


@pytest.mark.parametrize("modes", [
    {0: 0o500, 3000: 0o000, 6000: 0o100, 9000: 0o400, DEPTH: 0o000},
    {1: 0o200, 2: 0o000, 5000: 0o500},
], ids=["read-only", "no-access"])
def test_rmtree_through_directories_without_permissions(base: Path, modes: dict) -> None:
    owner = NOBODY if os.geteuid() == 0 else None
    if owner is not None:
        os.chown(base, owner, owner)  # where its tree goes: the owner's to change

    def extras(level: int) -> Extras | None:
        return {b"f": b"x", b"g": {b"h": b"y"}} if level in modes else None

    def chmods() -> None:
        fd = os.open(base / "t", DIR_FLAGS)
        fds = [fd]
        try:
            for level in range(DEPTH + 1):  # deepest last: chmod on the way down
                if level in modes:
                    os.chmod(b"g", modes[level], dir_fd=fd)
                if level < DEPTH:
                    fd = os.open(b"d", DIR_FLAGS, dir_fd=fd)
                    fds.append(fd)
            for level in sorted(modes, reverse=True):
                os.fchmod(fds[level], modes[level])
        finally:
            for fd in fds:
                os.close(fd)

    make_chain(base / "t", DEPTH, extras=extras, owner=owner)
    chmods()
    if owner is not None:
        # As the tree's owner, without root's powers over mode bits.
        in_child(lambda: rmtree(base / "t"), uid=NOBODY)
    else:
        rmtree(base / "t")
    assert gone(base / "t")


def test_rmtree_as_root_through_directories_without_permissions(base: Path) -> None:
    make_chain(base / "t", 3000, bottom={b"f": b"x"},
               extras=lambda level: {b"ro": {b"x": b"1"}} if level % 500 == 0 else None)
    for p in [base / "t", *(base / "t").glob("ro")]:
        os.chmod(p, 0o000)
    rmtree(base / "t")
    assert gone(base / "t")


@needs_root
def test_rmtree_names_what_it_cannot_remove_and_ignore_errors_removes_the_rest(
        base: Path) -> None:
    depth = 3000

    def extras(level: int) -> Extras | None:
        return {b"a": b"1", b"z": {b"y": b"2"}} if level == depth // 2 else None

    os.chown(base, NOBODY, NOBODY)
    make_chain(base / "t", depth, extras=extras, owner=NOBODY, bottom={b"f": b"x"})
    stuck = os.fsdecode(os.fsencode(base / "t") + b"/d" * (depth // 2) + b"/z")
    os.chown(stuck, 0, 0)  # root's, 0755: its entry cannot go
    out = in_child(lambda: _raised(lambda: rmtree(base / "t")), uid=NOBODY)
    assert out.startswith("('PermissionError', "), out[:200]
    assert repr(stuck + "/y") in out, "the error names the full path"
    in_child(lambda: rmtree(base / "t", ignore_errors=True), uid=NOBODY)
    left = base / "t"
    assert not os.path.lexists(os.fsencode(stuck) + b"/../a")  # beside it: gone
    assert os.path.lexists(os.fsencode(stuck) + b"/y")  # what failed: left
    assert not os.path.lexists(os.fsencode(stuck) + b"/../d")  # below its level: gone
    os.chown(stuck, NOBODY, NOBODY)
    rmtree(left)
    assert gone(left)


def _raised(fn: Callable[[], object]) -> tuple[str, str]:
    try:
        fn()
    except OSError as exc:
        return type(exc).__name__, str(exc.filename)
    return "nothing", ""


def test_rmtree_keeps_shutils_rules_for_what_is_not_a_directory(base: Path) -> None:
    (base / "dir").mkdir()
    (base / "link").symlink_to("dir")
    (base / "file").write_bytes(b"")
    with pytest.raises(OSError, match="symbolic link"):
        rmtree(base / "link")
    with pytest.raises(NotADirectoryError):
        rmtree(base / "file")
    with pytest.raises(FileNotFoundError):
        rmtree(base / "missing")
    for p in ("link", "file", "missing"):
        rmtree(base / p, ignore_errors=True)
    assert (base / "dir").is_dir() and (base / "link").is_symlink() and (base / "file").exists()


def test_rmtree_and_ingest_need_few_file_descriptors(base: Path) -> None:
    make_chain(base / "t", DEPTH, bottom={b"f": b"bottom"},
               extras=lambda level: {b"x": b"%d" % level} if level % 50 == 0 else None)

    def work() -> bool:
        async def imported() -> bytes:
            castore = open_castore("memory://", "memory://")
            node = await ingest_path(castore, base / "t")
            return await nar_bytes(castore, node)

        nar = asyncio.run(imported())
        found = NeedleScanner([b"bottom", b"9950"]).scan_path(base / "t")
        rmtree(base / "t")
        return nar == chain_nar(DEPTH, bottom={b"f": b"bottom"},
                                extras=lambda level: {b"x": b"%d" % level}
                                if level % 50 == 0 else None) and found == {0, 1}

    assert in_child(work, nofile=48) == "True"
    assert gone(base / "t")


def test_remove_bundle_with_a_deep_linked_scratch(base: Path) -> None:
    bundle, scratch = base / "bundle", base / "scratch"
    bundle.mkdir()
    scratch.mkdir()
    (bundle / "scratch").symlink_to(scratch)
    make_chain(scratch / "0", DEPTH, bottom={b"f": b"x"})
    make_chain(bundle / "rootfs", 2000)
    assert BundleLayout(bundle, scratch).scratch_base == scratch
    remove_bundle(bundle)
    assert gone(bundle) and gone(scratch)


# --- ingest, NAR, refscan, export -----------------------------------------------------

def _extras(level: int) -> Extras | None:
    if level % 1000 == 0:
        return {b"a": b"level %d" % level, b"exe": ("x", b"#!/bin/sh\n"),
                b"link": ("l", b"../" * 3 + b"a"), b"z": {b"e": b""}}
    if level % 777 == 0:
        return {b"big": bytes(range(256)) * 2048}  # 512 KiB: chunks of their own
    return None


BOTTOM = {b"f": b"at the bottom\n", b"\xe9t\xe9": ("l", b"f")}


@pytest.fixture
def deep(base: Path) -> Path:
    make_chain(base / "t", DEPTH, bottom=BOTTOM, extras=_extras)
    return base / "t"


async def test_ingest_and_nar_of_a_deep_tree(castore: Castore, deep: Path) -> None:
    node = await ingest_path(castore, deep)
    assert isinstance(node, DirectoryNode) and node.name == b"t"
    want = chain_nar(DEPTH, bottom=BOTTOM, extras=_extras)
    chunks = [c async for c in nar_chunks(castore, node)]
    assert b"".join(chunks) == want
    assert all(chunks) and len(chunks) > 10
    # What the bottom holds, read back through the directories one by one.
    digest = node.digest
    for _ in range(DEPTH):
        directory = await castore.directories.get(digest)
        assert directory is not None
        digest = next(d.digest for d in directory.directories if d.name == b"d")
    bottom = await castore.directories.get(digest)
    assert bottom is not None
    (f,) = [f for f in bottom.files if f.name == b"f"]
    assert await castore.blobs.get(f.digest) == BOTTOM[b"f"]


async def test_ingest_names_the_real_path_deep_down(base: Path) -> None:
    make_chain(base / "t", DEPTH)
    bottom = os.fsencode(base / "t") + b"/d" * DEPTH
    at_bottom(base / "t", DEPTH, b"fifo", os.mkfifo)
    castore = open_castore("memory://", "memory://")
    with pytest.raises(IngestError, match="is a FIFO") as caught:
        await ingest_path(castore, base / "t")
    assert caught.value.path == os.fsdecode(bottom + b"/fifo")
    with pytest.raises(RefScanError, match="is a FIFO") as scan_error:
        NeedleScanner([b"x"]).scan_path(base / "t")
    assert scan_error.value.path == Path(os.fsdecode(bottom + b"/fifo"))


@needs_root
def test_ingest_of_an_unreadable_deep_file_names_its_real_path(base: Path) -> None:
    make_chain(base / "t", 3000, owner=NOBODY, bottom={b"secret": b"s"})
    secret = os.fsencode(base / "t") + b"/d" * 3000 + b"/secret"
    at_bottom(base / "t", 3000, b"secret", functools.partial(os.chmod, mode=0o000))

    def work() -> str:
        try:
            asyncio.run(ingest_path(open_castore("memory://", "memory://"), base / "t"))
        except IngestError as exc:
            return f"{exc.path}|{exc}"
        return "imported"

    out = in_child(work, uid=NOBODY)
    shown = os.fsdecode(secret)
    assert out == repr(f"{shown}|{shown}: cannot open: Permission denied")


async def test_ingest_of_many_deep_branches(base: Path) -> None:
    # Forty branches, each deep enough for anchors of its own: more anchors
    # with files than are pinned at once.
    root = base / "t"
    root.mkdir()
    for i in range(40):
        make_chain(root / f"b{i:02}", 700, bottom={b"f": b"%d" % i},
                   extras=lambda level, i=i: {b"g": b"%d" % (level * i)}
                   if level % 100 == 0 else None)
    castore = open_castore("memory://", "memory://")
    node = await ingest_path(castore, root)
    got = await nar_bytes(castore, node)
    branches = [(f"b{i:02}".encode(), chain_nar(
        700, bottom={b"f": b"%d" % i},
        extras=lambda level, i=i: {b"g": b"%d" % (level * i)} if level % 100 == 0 else None))
        for i in range(40)]
    want = (MAGIC + s(b"(") + s(b"type") + s(b"directory")
            + b"".join(s(b"entry") + s(b"(") + s(b"name") + s(n) + s(b"node")
                       + nar[len(MAGIC):] + s(b")") for n, nar in branches) + s(b")"))
    assert got == want


async def test_nar_of_a_deep_tree_missing_a_directory() -> None:
    castore = open_castore("memory://", "memory://")
    bottom = Directory(files=[FileNode(name=b"f", digest=b"\1" * 32, size=1)])
    uploads, top = [bottom], bottom.as_node(b"d")
    for _ in range(DEPTH):
        uploads.append(Directory(directories=[top]))
        top = uploads[-1].as_node(b"d")
    assert await castore.directories.put_tree(uploads) == top.digest
    with pytest.raises(NotFoundError) as caught:
        await nar_bytes(castore, top)
    assert caught.value.kind == "blob"
    # An incomplete store: the bottom directory gone from under the others.
    del castore.directories.directories[bottom.digest]  # type: ignore[attr-defined]
    with pytest.raises(NotFoundError) as caught:
        await nar_bytes(castore, top)
    assert (caught.value.kind, caught.value.digest) == ("directory", bottom.digest)


async def test_refscan_finds_needles_deep_down(deep: Path) -> None:
    scanner = NeedleScanner([b"at the bottom", b"../../../a", b"level 9000", b"absent"])
    assert scanner.scan_path(deep) == {0, 1, 2}


async def test_export_of_a_deep_tree(base: Path, deep: Path) -> None:
    castore = open_castore("memory://", "memory://")
    node = await ingest_path(castore, deep)
    await export_node(castore, node, base / "out")
    again = await ingest_path(castore, base / "out")
    assert again.digest == node.digest
    fd = os.open(os.fsencode(base / "out") + b"/d" * 1000, DIR_FLAGS)
    try:
        assert stat.S_IMODE(os.stat(b"exe", dir_fd=fd).st_mode) == 0o755
        assert stat.S_IMODE(os.stat(b"a", dir_fd=fd).st_mode) == 0o644
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o755
    finally:
        os.close(fd)
    rmtree(base / "out")


# --- copies, gRPC ---------------------------------------------------------------------

async def test_copy_and_grpc_fetches_of_a_deep_tree(deep: Path) -> None:
    src = open_castore("memory://", "memory://")
    node = await ingest_path(src, deep)
    want = chain_nar(DEPTH, bottom=BOTTOM, extras=_extras)
    sock = Path(tempfile.mkdtemp(prefix="dgc-", dir="/tmp"))
    backing = open_castore("memory://", "memory://")
    server, _ = await start_castore_server(backing, [f"unix://{sock}/c.sock"])
    address = f"grpc+unix://{sock}/c.sock"
    remote = Castore(GrpcBlobService(address), GrpcDirectoryService(address))
    try:
        assert await copy_node(src, remote, node) > 0
        assert await nar_bytes(remote, node) == want
        walked = [d.digest async for d in remote.directories.get_recursive(node.digest)]
        assert len(walked) == len({*walked}) == DEPTH + 2  # the chain, one z
        back = open_castore("memory://", "memory://")
        assert await copy_node(remote, back, node) > 0
        assert await nar_bytes(back, node) == want
        reader = await asyncio.to_thread(GrpcSyncReader, address, address)
        try:
            directory = await asyncio.to_thread(reader.get_directory, node.digest)
            assert directory is not None and directory.digest == node.digest
        finally:
            reader.close()
    finally:
        await remote.aclose()
        await server.stop(None)
        shutil.rmtree(sock, ignore_errors=True)


# --- the Nix build plan ---------------------------------------------------------------

H = "0" * 27


def _drv_path(i: int) -> str:
    return f"/nix/store/{H}{i:05}-d{i}.drv"


async def test_plan_of_a_long_chain_of_derivations() -> None:
    plan = _Plan(castore=open_castore("memory://", "memory://"), pathinfo=PathInfoDB(None))
    n = 5000
    for i in range(n):
        plan.drvs[_drv_path(i)] = Derivation(
            outputs={"out": DerivationOutput(path=f"/nix/store/{H}{i:05}-o{i}")},
            input_drvs={_drv_path(i - 1): ("out",)} if i else {},
            system="x86_64-linux", builder="/b")
    await plan.visit(_drv_path(n - 1), set())
    assert plan.to_build == [_drv_path(i) for i in range(n)]
    assert plan.errors == {}


async def test_plan_passes_an_input_failure_up_a_chain() -> None:
    plan = _Plan(castore=open_castore("memory://", "memory://"), pathinfo=PathInfoDB(None))
    missing = f"/nix/store/{H}99999-missing.drv"
    for i in range(3):
        plan.drvs[_drv_path(i)] = Derivation(
            outputs={"out": DerivationOutput(path=f"/nix/store/{H}{i:05}-o{i}")},
            input_drvs={_drv_path(i - 1) if i else missing: ("out",)},
            system="x86_64-linux", builder="/b")
    await plan.visit(_drv_path(2), set())
    assert plan.to_build == []
    assert plan.errors[_drv_path(0)].startswith(f"input derivation {missing} failed: ")
    assert plan.errors[_drv_path(2)] == (f"input derivation {_drv_path(1)} failed: "
                                         f"{plan.errors[_drv_path(1)]}")


def _outputs(n: int, cycle: bool) -> tuple[list[str], list[PathInfo]]:
    names = [f"o{i:05}" for i in range(n)]
    paths = [f"/nix/store/{H}{i:05}-{name}" for i, name in enumerate(names)]
    refs = [[paths[i + 1]] if i + 1 < n else ([paths[0]] if cycle else []) for i in range(n)]
    from stages.castore.nodes import SymlinkNode

    return names, [PathInfo(path=p, node=SymlinkNode(name=b"x", target=b"t"), references=r,
                            nar_sha256=b"\0" * 32, nar_size=8) for p, r in zip(paths, refs)]


def test_output_cycles_over_long_reference_chains() -> None:
    names, infos = _outputs(5000, cycle=False)
    _check_output_cycles("/nix/store/x.drv", names, infos)
    names, infos = _outputs(5000, cycle=True)
    with pytest.raises(NixError) as caught:
        _check_output_cycles("/nix/store/x.drv", names, infos)
    assert f"({' -> '.join([*names, names[0]])})" in str(caught.value)

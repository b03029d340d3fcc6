"""The castore FUSE view over a real mount: content, isolation, lifetime, errors.

Every test mounts under its own tmp_path; the ``mountpoint`` fixture and a
module-level guard make sure no FUSE mount is left under pytest's temporary
directories, also when a test fails.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from stages.castore.addresses import open_castore
from stages.castore.errors import ValidationError
from stages.castore.fuse import MountError, MountServer, cleanup_stale_mounts
from stages.castore.fuse.mounts import find_mount, resolve_without_entering
from stages.castore.ingest import ingest_path
from stages.castore.local import open_local_store
from stages.castore.nodes import FileNode, Node, SymlinkNode, node_to_json

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]


# --- fixtures ---------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _no_mount_left(tmp_path_factory: pytest.TempPathFactory):
    yield
    left = cleanup_stale_mounts(tmp_path_factory.getbasetemp())
    assert not left, f"FUSE mounts were left behind (now detached): {left}"


async def ingest(address: str, path: Path) -> Node:
    castore = open_castore(address, address)
    try:
        return await ingest_path(castore, path)
    finally:
        await castore.aclose()


def make_tree(root: Path) -> Path:
    """A source tree with every edge case the mount must reproduce."""
    src = root / "src"
    (src / "deep" / "er" / "est").mkdir(parents=True)
    (src / "emptydir").mkdir()
    (src / "hello.txt").write_bytes(b"hello, castore\n")
    (src / "empty").write_bytes(b"")
    tool = src / "bin-tool"
    tool.write_bytes(b"#!/bin/busybox sh\necho tool\n")
    tool.chmod(0o755)
    (src / "deep" / "er" / "est" / "leaf").write_bytes(b"leaf" * 1000)
    (src / "large").write_bytes(os.urandom(3 << 20) * 3)  # 9 MiB, spans many reads
    os.symlink("hello.txt", src / "rel-link")
    os.symlink("/etc/hostname", src / "abs-link")
    os.symlink("does/not/exist", src / "dangling")
    os.symlink("../../hello.txt", src / "deep" / "er" / "up-link")
    (Path(os.fsdecode(os.fsencode(src) + b"/caf\xe9-\xff"))).write_bytes(b"latin-1 name\n")
    many = src / "many"
    many.mkdir()
    for i in range(1500):  # several readdir batches
        (many / f"entry-{i:04d}-{'x' * 40}").write_bytes(b"")
    return src


def describe(top: Path) -> dict[bytes, tuple]:
    """Everything the mount must reproduce, keyed by relative bytes path."""
    out: dict[bytes, tuple] = {}
    base = os.fsencode(top)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", sorted(os.listdir(path)))
            else:
                with open(path, "rb") as f:
                    data = f.read()
                out[rel] = ("file", bool(st.st_mode & 0o100), len(data), data)
    return out


class _Dirent(ctypes.Structure):
    # glibc's struct dirent on 64-bit Linux (what readdir(3) returns).
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]
DT_DIR = 4


def raw_readdir(path: Path) -> list[tuple[bytes, int, int]]:
    """(name, d_ino, d_type) in readdir order, "." and ".." included (os.listdir drops them)."""
    handle = _libc.opendir(os.fsencode(path))
    if not handle:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    try:
        entries = []
        while True:
            ctypes.set_errno(0)
            ent = _libc.readdir(handle)
            if not ent:
                if ctypes.get_errno():
                    raise OSError(ctypes.get_errno(), "readdir failed", str(path))
                return entries
            entries.append((ent.contents.d_name, ent.contents.d_ino, ent.contents.d_type))
    finally:
        _libc.closedir(handle)


# --- content ----------------------------------------------------------------

async def test_mounted_tree_walks_identical_to_source(tmp_path, mountpoint, store_address):
    src = make_tree(tmp_path)
    node = await ingest(store_address, src)
    async with MountServer(mountpoint, blob_address=store_address,
                           directory_address=store_address) as server:
        top = await server.add("build-1", [node])
        assert top == mountpoint / "build-1"
        mounted = top / "src"
        expected = describe(src)
        got = await asyncio.to_thread(describe, mounted)
        assert got.keys() == expected.keys()
        for rel in expected:
            assert got[rel] == expected[rel], rel

        # Modes, link counts, sizes, blocks.
        for rel, info in expected.items():
            st = os.lstat(os.path.join(os.fsencode(mounted), rel))
            if info[0] == "file":
                assert stat.S_IMODE(st.st_mode) == (0o555 if info[1] else 0o444), rel
                assert st.st_size == info[2]
                assert st.st_blocks == (info[2] + 511) // 512
                assert st.st_nlink == 1
            elif info[0] == "dir":
                assert stat.S_IMODE(st.st_mode) == 0o555
                subdirs = sum(1 for name in info[1]
                              if os.path.isdir(os.path.join(os.fsencode(src), rel, name))
                              and not os.path.islink(os.path.join(os.fsencode(src), rel, name)))
                assert st.st_nlink == 2 + subdirs, rel
            else:
                assert stat.S_ISLNK(st.st_mode)
                assert st.st_size == len(info[1])

        # Inode numbers are stable, and distinct except that files of equal
        # content and exec bit share one (so their page cache is shared).
        inos = {rel: os.lstat(os.path.join(os.fsencode(mounted), rel)).st_ino
                for rel in expected}

        def identity(rel):
            info = expected[rel]
            if info[0] == "file":
                return ("file", info[1], info[3])  # exec bit, contents
            return ("path", rel)

        same_ino = {(a, b) for a in inos for b in inos if inos[a] == inos[b]}
        assert same_ino == {(a, b) for a in inos for b in inos if identity(a) == identity(b)}
        again = {rel: os.lstat(os.path.join(os.fsencode(mounted), rel)).st_ino
                 for rel in expected}
        assert again == inos

        # The executable runs as itself? No shell here; the bit is enough.
        assert os.access(mounted / "bin-tool", os.X_OK)
        assert not os.access(mounted / "hello.txt", os.X_OK)

        # Missing names, and every kind of write.
        with pytest.raises(FileNotFoundError):
            os.lstat(mounted / "nope")
        with pytest.raises(FileNotFoundError):
            os.lstat(mountpoint / "no-such-key")
        for attempt in (
            lambda: open(mounted / "hello.txt", "r+b"),
            lambda: open(mounted / "new-file", "wb"),
            lambda: os.mkdir(mounted / "newdir"),
            lambda: os.unlink(mounted / "hello.txt"),
            lambda: os.rename(mounted / "hello.txt", mounted / "moved"),
            lambda: os.chmod(mounted / "hello.txt", 0o777),
            lambda: os.symlink("x", mounted / "newlink"),
            lambda: os.rmdir(mounted / "emptydir"),
        ):
            with pytest.raises(OSError) as info:
                await asyncio.to_thread(attempt)
            assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)

        # Large reads at offsets.
        with open(mounted / "large", "rb") as f:
            f.seek(5 << 20)
            assert f.read(1 << 20) == (src / "large").read_bytes()[5 << 20:6 << 20]


async def test_readdir_lists_dot_entries_and_owner_is_configurable(
        tmp_path, mountpoint, store_address):
    # As a disk filesystem (and Nix's sandbox) shows them: "." and ".." first,
    # with the inode numbers of the directory and of its parent; every entry
    # owned by the ids the server was given.
    src = tmp_path / "d"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "leaf").write_bytes(b"leaf")
    (src / "f").write_bytes(b"f")
    os.symlink("f", src / "l")
    (src / "many").mkdir()
    for i in range(600):  # more than one readdir reply
        (src / "many" / f"e{i:04d}-{'y' * 60}").write_bytes(b"")
    node = await ingest(store_address, src)
    single = await ingest(store_address, src / "f")
    async with MountServer(mountpoint, blob_address=store_address,
                           directory_address=store_address, uid=4242, gid=4343) as server:
        top = await server.add("k", [node, single])
        for path, parent in ((top, mountpoint), (top / "d", top), (top / "d" / "sub", top / "d"),
                             (top / "d" / "many", top / "d")):
            entries = await asyncio.to_thread(raw_readdir, path)
            names = [e[0] for e in entries]
            assert names[:2] == [b".", b".."], path
            assert sorted(names[2:]) == sorted(os.fsencode(n) for n in os.listdir(path))
            assert len(set(names)) == len(names)
            assert entries[0][1:] == (os.stat(path).st_ino, DT_DIR), path
            assert entries[1][1:] == (os.stat(parent).st_ino, DT_DIR), path
        assert len(await asyncio.to_thread(raw_readdir, top / "d" / "many")) == 602
        for rel in ("", "d", "d/sub", "d/sub/leaf", "d/f", "d/l", "f"):
            st = os.lstat(top / rel)
            assert (st.st_uid, st.st_gid) == (4242, 4343), rel
        # the owner changes nothing about who may read: the modes decide
        assert (top / "d" / "sub" / "leaf").read_bytes() == b"leaf"


async def test_owner_defaults_to_root_and_bad_ids_are_refused(
        tmp_path, mountpoint, store_address):
    (tmp_path / "f").write_bytes(b"x")
    node = await ingest(store_address, tmp_path / "f")
    async with MountServer(mountpoint, blob_address=store_address,
                           directory_address=store_address) as server:
        top = await server.add("k", [node])
        for p in (top, top / "f"):
            assert (os.lstat(p).st_uid, os.lstat(p).st_gid) == (0, 0)
    for bad in ({"uid": -1}, {"gid": 2**32 - 1}, {"uid": "1000"}, {"gid": True}):
        what = next(iter(bad))
        with pytest.raises(MountError, match=f"{what} must be an id"):
            MountServer(mountpoint, blob_address=store_address,
                        directory_address=store_address, **bad)
    assert find_mount(mountpoint) is None


async def test_keys_added_concurrently_see_only_their_own_nodes(
        tmp_path, mountpoint, store_address):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "only-a").write_bytes(b"A")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "only-b").write_bytes(b"B")
    (tmp_path / "shared.txt").write_bytes(b"both")
    node_a = await ingest(store_address, tmp_path / "a")
    node_b = await ingest(store_address, tmp_path / "b")
    shared = await ingest(store_address, tmp_path / "shared.txt")
    async with MountServer(mountpoint, blob_address=store_address,
                           directory_address=store_address) as server:
        top_a, top_b = await asyncio.gather(server.add("key-a", [node_a, shared]),
                                            server.add("key-b", [node_b, shared]))
        assert sorted(os.listdir(mountpoint)) == [".by-digest", "key-a", "key-b"]
        assert sorted(os.listdir(top_a)) == ["a", "shared.txt"]
        assert sorted(os.listdir(top_b)) == ["b", "shared.txt"]
        assert os.listdir(top_a / "a") == ["only-a"]
        assert (top_b / "b" / "only-b").read_bytes() == b"B"
        with pytest.raises(FileNotFoundError):
            os.lstat(top_a / "b")

        with pytest.raises(MountError, match="already mounted"):
            await server.add("key-a", [shared])
        with pytest.raises(ValidationError):
            await server.add("bad/key", [shared])

        await server.remove("key-a")
        assert sorted(os.listdir(mountpoint)) == [".by-digest", "key-b"]
        with pytest.raises(FileNotFoundError):
            os.lstat(top_a)
        # The same key can come back with other content.
        await server.add("key-a", [node_b])
        assert os.listdir(top_a) == ["b"]
        with pytest.raises(MountError, match="not mounted"):
            await server.remove("never-added")
    assert find_mount(mountpoint) is None


async def test_content_directory_serves_anything_stored_by_digest(
        tmp_path, mountpoint, store_address):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(b"some data\n")
    (src / "sub").mkdir()
    (src / "sub" / "tool").write_bytes(b"#!/bin/sh\n")
    (src / "sub" / "tool").chmod(0o755)
    os.symlink("data", src / "link")
    tree = await ingest(store_address, src)
    tool = await ingest(store_address, src / "sub" / "tool")
    data = await ingest(store_address, src / "data")
    async with MountServer(mountpoint, blob_address=store_address,
                           directory_address=store_address) as server:
        # Nothing was added: the content is there by digest alone.
        await server.ensure_running()
        content = server.content_root
        assert content == mountpoint / ".by-digest"
        assert os.listdir(mountpoint) == [".by-digest"]
        top = server.content_path(tree)
        assert top.name == "d-" + tree.digest.hex()
        assert await asyncio.to_thread(describe, top) == describe(src)
        assert server.content_path(data).name == f"f-{data.digest.hex()}-{data.size}"
        assert server.content_path(data).read_bytes() == b"some data\n"
        assert stat.S_IMODE(os.stat(server.content_path(data)).st_mode) == 0o444
        exe = server.content_path(tool)
        assert exe.name == f"x-{tool.digest.hex()}-{tool.size}"
        assert stat.S_IMODE(os.stat(exe).st_mode) == 0o555
        # One inode per file content, wherever it is seen; stable names.
        assert os.stat(exe).st_ino == os.stat(top / "sub" / "tool").st_ino
        assert os.stat(top).st_ino == os.stat(server.content_path(tree)).st_ino
        # The directory lists as empty: it holds whatever the store holds.
        assert os.listdir(content) == []
        with pytest.raises(ValueError, match="no content"):
            server.content_path(SymlinkNode(name=b"l", target=b"x"))

        absent = b"\x07" * 32
        for name in ["d-" + absent.hex(),                 # not in the store
                     "d-" + tree.digest.hex().upper(),    # not the one spelling
                     f"f-{data.digest.hex()}-0{data.size}",
                     f"f-{data.digest.hex()}",            # no size
                     "e-" + tree.digest.hex(), "anything", "key-a"]:
            with pytest.raises(FileNotFoundError):
                os.lstat(content / name)
        # A file whose blob is missing is found, and fails when opened.
        missing = content / f"f-{absent.hex()}-5"
        assert os.stat(missing).st_size == 5
        with pytest.raises(OSError) as err:
            missing.read_bytes()
        assert err.value.errno == errno.EIO
        # The name cannot be taken by a key.
        with pytest.raises(MountError, match="reserved"):
            await server.add(".by-digest", [data])
        with pytest.raises(MountError, match="reserved"):
            await server.remove(".by-digest")
        assert os.listdir(mountpoint) == [".by-digest"]
    assert find_mount(mountpoint) is None


async def test_a_prestarted_spare_server_is_taken_and_serves(
        tmp_path, mountpoint, store_address):
    from stages.castore.fuse import spare

    data = await ingest(store_address, _write(tmp_path / "data", b"spare\n"))
    spare.prestart()
    waiting = spare._spare
    assert waiting is not None
    spare.prestart()  # one spare at a time
    assert spare._spare is waiting
    async with MountServer(mountpoint, blob_address=store_address,
                           directory_address=store_address) as server:
        assert server.pid == waiting.pid  # taken, not a new process
        assert spare.take() is None
        assert server.content_path(data).read_bytes() == b"spare\n"
        top = await server.add("k", [data])
        assert (top / "data").read_bytes() == b"spare\n"
    assert find_mount(mountpoint) is None
    assert waiting.poll() is not None  # stopped and reaped with the mount


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_spare_nobody_takes_exits_with_its_owner(tmp_path) -> None:
    script = textwrap.dedent("""
        from stages.castore.fuse import spare
        spare.prestart()
        print(spare._spare.pid, flush=True)
    """)
    owner = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           cwd=REPO, timeout=60)
    assert owner.returncode == 0, owner.stderr
    assert _pid_gone(int(owner.stdout)), "the unused spare outlived its owner"
    assert owner.stderr == ""


def test_a_spare_refuses_bad_settings_naming_them(tmp_path) -> None:
    cmd = [sys.executable, "-m", "stages.castore.fuse.server", "--owner-pid", str(os.getpid()),
           "--settings-from-stdin"]
    for line, message in [(b"not json\n", "bad settings line"),
                          (b'{"mountpoint": "/x", "colour": 1}\n', "keys among"),
                          (b'{"uid": 5}\n', "no mountpoint"),
                          (b'{"mountpoint": 5}\n', "mountpoint must be a string"),
                          (b'{"mountpoint": "/x", "uid": "0"}\n', "uid must be an integer")]:
        proc = subprocess.run(cmd, input=line, capture_output=True, cwd=REPO, timeout=60)
        assert proc.returncode == 2, proc
        assert message in proc.stderr.decode(), proc.stderr
    # No settings at all (its owner went away): a quiet exit.
    proc = subprocess.run(cmd, input=b"", capture_output=True, cwd=REPO, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, b"")


async def test_corrupt_blob_reads_as_eio_and_names_the_digest(
        tmp_path, mountpoint, store_address):
    (tmp_path / "victim").write_bytes(b"precious bytes " * 1000)
    node = await ingest(store_address, tmp_path / "victim")
    assert isinstance(node, FileNode)
    store = open_local_store(tmp_path / "store")
    pack, offset = store.where(node.digest).rsplit("@", 1)
    store.close()
    with open(pack, "r+b") as f:
        f.seek(int(offset) + 100)
        f.write(b"X")
    async with MountServer(mountpoint, blob_address=store_address,
                           directory_address=store_address) as server:
        top = await server.add("k", [node])
        for _ in range(2):  # the verdict is remembered, and still EIO
            with pytest.raises(OSError) as info:
                await asyncio.to_thread((top / "victim").read_bytes)
            assert info.value.errno == errno.EIO
        assert node.digest.hex() in server.stderr_tail()


# --- errors -----------------------------------------------------------------

async def test_bad_mountpoints_and_addresses_are_refused(tmp_path, mountpoint, store_address):
    with pytest.raises(MountError, match="does not exist"):
        async with MountServer(tmp_path / "missing", blob_address=store_address):
            pass
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(MountError, match="not a directory"):
        async with MountServer(tmp_path / "file", blob_address=store_address):
            pass
    with pytest.raises(MountError, match="memory://"):
        async with MountServer(mountpoint, blob_address="memory://",
                               directory_address=store_address):
            pass
    async with MountServer(mountpoint, blob_address=store_address,
                           directory_address=store_address):
        with pytest.raises(MountError, match="already mounted"):
            async with MountServer(mountpoint, blob_address=store_address,
                                   directory_address=store_address):
                pass
    assert find_mount(mountpoint) is None


async def test_server_death_is_reported_with_its_stderr(tmp_path, mountpoint, store_address):
    (tmp_path / "f").write_bytes(b"x")
    node = await ingest(store_address, tmp_path / "f")
    async with MountServer(mountpoint, blob_address=store_address,
                           directory_address=store_address) as server:
        os.kill(server.pid, signal.SIGKILL)
        with pytest.raises(MountError, match="died") as info:
            await server.add("k", [node])
        assert "ocibuild-fuse" in str(info.value)  # its stderr tail is included
    assert await _wait_unmounted(mountpoint)


async def test_start_returns_at_once_and_the_first_add_waits_for_the_mount(
        tmp_path, mountpoint, store_address):
    (tmp_path / "f").write_bytes(b"lazy")
    node = await ingest(store_address, tmp_path / "f")
    server = MountServer(mountpoint, blob_address=store_address, directory_address=store_address)
    try:
        await server.start()
        # Not mounted yet: the server process is still starting.
        assert find_mount(mountpoint) is None
        root = await server.add("k", [node])
        assert (root / "f").read_bytes() == b"lazy"
    finally:
        await server.__aexit__(None, None, None)
    assert await _wait_unmounted(mountpoint)


async def test_a_server_that_fails_to_start_fails_the_first_add(tmp_path, mountpoint):
    # A store path under a regular file cannot be opened by the server.
    (tmp_path / "file").write_bytes(b"")
    bad = f"local://{tmp_path}/file/store"
    server = MountServer(mountpoint, blob_address=bad, directory_address=bad)
    try:
        await server.start()
        with pytest.raises(MountError, match="before mounting"):
            await server.add("k", [])
    finally:
        await server.__aexit__(None, None, None)
    assert find_mount(mountpoint) is None


# --- lifetime ---------------------------------------------------------------

OWNER = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from stages.castore.fuse import MountServer
    from stages.castore.nodes import node_from_json

    async def main():
        mp, addr, node = sys.argv[1], sys.argv[2], node_from_json(sys.argv[3])
        async with MountServer(Path(mp), blob_address=addr, directory_address=addr) as s:
            await s.add("k", [node])
            print(json.dumps({"server": s.pid}), flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
""")


def _start_owner(mountpoint: Path, address: str, node: Node) -> tuple[subprocess.Popen, int]:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(mountpoint), address,
                              node_to_json(node)], stdout=subprocess.PIPE, cwd=REPO)
    line = owner.stdout.readline()
    assert line, "the owner process died before mounting"
    return owner, json.loads(line)["server"]


async def _wait_unmounted(mountpoint: Path, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if find_mount(mountpoint) is None:
            return True
        await asyncio.sleep(0.05)
    return False


def _pid_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("victim,sig", [
    ("owner", signal.SIGTERM),
    ("owner", signal.SIGKILL),
    ("server", signal.SIGKILL),
], ids=["owner-sigterm", "owner-sigkill", "server-sigkill"])
async def test_mount_goes_away_when_its_owner_or_server_dies(
        tmp_path, mountpoint, store_address, victim, sig):
    (tmp_path / "f").write_bytes(b"content")
    node = await ingest(store_address, tmp_path / "f")
    owner, server_pid = _start_owner(mountpoint, store_address, node)
    try:
        assert (mountpoint / "k" / "f").read_bytes() == b"content"
        os.kill(owner.pid if victim == "owner" else server_pid, sig)
        assert await _wait_unmounted(mountpoint), f"mount still there after {victim} {sig!r}"
        if victim == "owner":
            assert _pid_gone(server_pid), "the server outlived its owner"
    finally:
        for pid in (server_pid, owner.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        owner.wait()
        owner.stdout.close()


async def test_cleanup_stale_mounts_detaches_a_hung_servers_mount(
        tmp_path, mountpoint, store_address):
    (tmp_path / "f").write_bytes(b"content")
    node = await ingest(store_address, tmp_path / "f")
    owner, server_pid = _start_owner(mountpoint, store_address, node)
    try:
        os.kill(server_pid, signal.SIGSTOP)  # a hung server: its mount stays
        assert find_mount(mountpoint) is not None
        assert cleanup_stale_mounts(tmp_path) == [resolve_without_entering(mountpoint)]
        assert find_mount(mountpoint) is None
        assert cleanup_stale_mounts(tmp_path) == []
    finally:
        for pid in (server_pid, owner.pid):
            try:
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        owner.wait()
        owner.stdout.close()


SERVE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from stages.castore.fuse import serve_until_signal
    from stages.castore.nodes import node_from_json
    nodes = [node_from_json(line) for line in sys.stdin if line.strip()]
    serve_until_signal(Path(sys.argv[1]), nodes, sys.argv[2], sys.argv[2])
    print("unmounted", flush=True)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
async def test_serve_until_signal_serves_at_the_top_and_unmounts(
        tmp_path, mountpoint, store_address, sig):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"in d")
    (tmp_path / "top.txt").write_bytes(b"top")
    nodes = [await ingest(store_address, tmp_path / "d"),
             await ingest(store_address, tmp_path / "top.txt")]
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(mountpoint), store_address],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    try:
        proc.stdin.write("".join(node_to_json(n) + "\n" for n in nodes).encode())
        proc.stdin.close()
        deadline = time.monotonic() + 20
        while find_mount(mountpoint) is None:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "never mounted"
            await asyncio.sleep(0.05)
        assert sorted(os.listdir(mountpoint)) == ["d", "top.txt"]
        assert (mountpoint / "d" / "x").read_bytes() == b"in d"
        assert os.lstat(mountpoint / "d" / "x").st_uid == 0  # root's unless told otherwise
        proc.send_signal(sig)
        proc.wait(timeout=20)
        out, err = proc.stdout.read(), proc.stderr.read()
        assert proc.returncode == 0, err.decode()
        assert out == b"unmounted\n"
        assert find_mount(mountpoint) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# --- a real container -------------------------------------------------------

CONTAINER_SCRIPT = r"""
cd /inputs
for p in $(busybox find . | busybox sort); do
  if [ -L "$p" ]; then echo "L $p $(busybox readlink "$p")";
  elif [ -d "$p" ]; then echo "D $p $(busybox stat -c %a "$p")";
  else echo "F $p $(busybox stat -c %a "$p") $(busybox sha256sum < "$p" | busybox cut -d' ' -f1)"; fi
done
echo "id $(busybox id -u)"
"""


def _expected_listing(src: Path) -> list[str]:
    import hashlib
    lines = []
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = "./" + str(path.relative_to(src.parent))
            if path.is_symlink():
                lines.append(f"L {rel} {os.readlink(path)}")
            elif path.is_dir():
                lines.append(f"D {rel} 555")
            else:
                mode = 555 if path.stat().st_mode & 0o100 else 444
                lines.append(f"F {rel} {mode} {hashlib.sha256(path.read_bytes()).hexdigest()}")
    lines.append(f"D ./{src.name} 555")
    return sorted(lines)


def _bundle(root: Path, inputs: Path) -> Path:
    bundle = root / "bundle"
    rootfs = bundle / "rootfs"
    for d in ("bin", "inputs", "proc", "dev", "tmp"):
        (rootfs / d).mkdir(parents=True)
    (rootfs / "bin" / "busybox").write_bytes(b"")
    idmap = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0},
                    "args": ["/bin/busybox", "sh", "-c", CONTAINER_SCRIPT],
                    "env": ["PATH=/bin"], "cwd": "/", "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "fuse-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755"]},
            {"destination": "/bin/busybox", "type": "bind", "source": "/bin/busybox",
             "options": ["bind", "ro"]},
            # A user namespace may not drop the FUSE mount's locked flags on
            # the read-only remount, so they are repeated here.
            {"destination": f"/inputs/{inputs.name}", "type": "bind", "source": str(inputs),
             "options": ["bind", "ro", "nosuid", "nodev", "noatime"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts", "user")],
            "uidMappings": idmap, "gidMappings": idmap,
        },
    }
    (rootfs / "inputs" / inputs.name).mkdir()
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


@pytest.mark.runc
async def test_runc_container_reads_the_tree_through_a_bind_mount(tmp_path, store_address):
    src = tmp_path / "pkg"
    (src / "lib" / "sub").mkdir(parents=True)
    (src / "lib" / "data.bin").write_bytes(os.urandom(300_000))
    (src / "lib" / "sub" / "empty").write_bytes(b"")
    (src / "run.sh").write_bytes(b"#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    os.symlink("lib/data.bin", src / "link")
    node = await ingest(store_address, src)
    container_id = f"ocibuild-fuse-test-{uuid.uuid4().hex[:12]}"
    # The container's root is host uid 100000: the bundle and the mount must
    # sit where that uid can traverse (pytest's tmp dirs are 0700).
    shared = Path(tempfile.mkdtemp(prefix="ocibuild-fuse-runc-"))
    try:
        shared.chmod(0o755)
        mountpoint = shared / "mnt"
        mountpoint.mkdir()
        async with MountServer(mountpoint, blob_address=store_address,
                               directory_address=store_address) as server:
            top = await server.add("build", [node])
            bundle = _bundle(shared, top / "pkg")
            try:
                done = await asyncio.to_thread(
                    subprocess.run, ["runc", "run", "--bundle", str(bundle), container_id],
                    capture_output=True, timeout=60)
            finally:
                subprocess.run(["runc", "delete", "-f", container_id], capture_output=True)
        assert done.returncode == 0, done.stderr.decode()
        lines = done.stdout.decode().splitlines()
        assert lines[-1] == "id 0"  # uid 0 inside, 100000 on the host
        listing = sorted(line for line in lines[:-1] if not line.startswith("D . "))
        assert listing == _expected_listing(src)
    finally:
        left = cleanup_stale_mounts(shared)
        shutil.rmtree(shared, ignore_errors=True)
        assert not left, f"a FUSE mount was left at {left}"


async def test_cancellation_inside_the_block_still_unmounts(mountpoint, store_address):
    entered = asyncio.Event()

    async def body() -> None:
        async with MountServer(mountpoint, blob_address=store_address,
                               directory_address=store_address):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(body())
    await asyncio.wait_for(entered.wait(), 30)
    assert find_mount(mountpoint) is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert find_mount(mountpoint) is None


@pytest.mark.root
def test_lazy_unmount_of_a_mount_already_gone_is_not_an_error(tmp_path: Path) -> None:
    # What the owner sees when fusermount3's auto_unmount removed the mount of
    # a killed server between its mountinfo check and its umount2 (EINVAL).
    from stages.castore.fuse.mounts import lazy_unmount

    lazy_unmount(tmp_path)  # a plain directory: nothing mounted there

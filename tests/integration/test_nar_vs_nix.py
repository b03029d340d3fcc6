"""NAR export of castore trees is byte-identical to `nix-store --dump`.

Each tree is built on disk, imported into a memory:// castore, rendered as a
NAR by stages.castore.nar and compared with what Nix itself writes for the
same path. Trees are imported two ways: with ``ingest_path`` (the real
import), and with a few-line walker written here (so a NAR bug cannot hide
behind an ingest bug, or the other way round).

The NAR hash is checked against Nix's own printing of it: ``nix-hash --type
sha256 --base32`` over the path, and ``nix-store -q --hash`` after
``nix-store --add`` (the added store path is deleted again afterwards).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sysconfig
from pathlib import Path

import pytest

from stages.castore.addresses import Castore
from stages.castore.memory import MemoryBlobService, MemoryDirectoryService
from stages.castore.nar import format_nar_hash, nar_bytes, nar_hash_and_size
from stages.castore.nodes import Directory, FileNode, Node, SymlinkNode

pytestmark = pytest.mark.nix


def nix_dump(path: Path) -> bytes:
    return subprocess.run(["nix-store", "--dump", str(path)], check=True,
                          capture_output=True).stdout


async def walk_into(castore: Castore, path: bytes, name: bytes, uploads: list[Directory]) -> Node:
    """The test's own importer: lstat, never follow, owner x bit."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return SymlinkNode(name=name, target=os.readlink(path))
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            data = f.read()
        return FileNode(name=name, digest=await castore.blobs.put(data), size=len(data),
                        executable=bool(st.st_mode & stat.S_IXUSR))
    assert stat.S_ISDIR(st.st_mode), path
    children = [await walk_into(castore, os.path.join(path, child), child, uploads)
                for child in os.listdir(path)]
    directory = Directory.from_nodes(children)
    uploads.append(directory)
    return directory.as_node(name)


async def import_tree(how: str, path: Path) -> tuple[Castore, Node]:
    castore = Castore(MemoryBlobService(), MemoryDirectoryService())
    if how == "ingest_path":
        from stages.castore.ingest import ingest_path

        return castore, await ingest_path(castore, path)
    uploads: list[Directory] = []
    node = await walk_into(castore, os.fsencode(path), os.fsencode(path.name), uploads)
    if uploads:
        await castore.directories.put_tree(uploads)
    return castore, node


IMPORTERS = pytest.mark.parametrize("how", ["walker", "ingest_path"])


# --- trees -------------------------------------------------------------------

def make_edge_tree(root: Path) -> Path:
    """Every edge case of the format in one tree."""
    root.mkdir()
    (root / "empty-file").write_bytes(b"")
    (root / "empty-dir").mkdir()
    (root / "eight").write_bytes(b"12345678")        # no padding needed
    (root / "nine").write_bytes(b"123456789")        # padding needed
    exe = root / "script"
    exe.write_bytes(b"#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    owner_only = root / "owner-x"
    owner_only.write_bytes(b"x")
    owner_only.chmod(0o700)
    group_x = root / "group-x-only"                  # not executable for Nix
    group_x.write_bytes(b"g")
    group_x.chmod(0o654)
    shutil.copy2("/bin/busybox", root / "busybox")   # a real binary, several MiB
    (root / "big").write_bytes(os.urandom(3 * (1 << 20) + 5))
    os.symlink("script", root / "rel-link")
    os.symlink("../outside/../x", root / "dotdot-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("does/not/exist", root / "dangling")
    os.symlink("empty-dir", root / "dir-link")
    # Non-UTF-8 and otherwise odd names, and bytewise ordering: 'B' < 'a' <
    # 'a-' < 'a.' < 'a0' < 'aa' < 0xc3 0xa9 ('é') < 0xff.
    raw = os.fsencode(root)
    for name in (b"B", b"a", b"a-", b"a.", b"a0", b"aa", "\u00e9".encode(), b"\xff\xfe",
                 b"with space", b"new\nline", b"\x01ctl", b"." + b"n" * 250):
        with open(os.path.join(raw, name), "wb") as f:
            f.write(name)
    os.mkdir(os.path.join(raw, b"dir\xff"))
    os.symlink(b"\xfe\xfftarget", os.path.join(raw, b"dir\xff", b"link\x80"))
    # Names that sort differently as files and directories in some tools.
    (root / "sort").mkdir()
    (root / "sort" / "a.b").write_bytes(b"")
    (root / "sort" / "a").mkdir()
    (root / "sort" / "a" / "b").write_bytes(b"")
    (root / "sort" / "a-b").symlink_to("a")
    deep = root / "deep"
    for i in range(40):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "bottom").write_bytes(b"bottom\n")
    return root


def make_package_copy(root: Path) -> Path:
    """A copy of a real package tree: the standard library's email package."""
    source = Path(sysconfig.get_paths()["stdlib"]) / "email"
    shutil.copytree(source, root, symlinks=True)
    return root


# --- comparisons -------------------------------------------------------------

@IMPORTERS
async def test_edge_case_tree(tmp_path: Path, how: str) -> None:
    tree = make_edge_tree(tmp_path / "edge")
    castore, node = await import_tree(how, tree)
    assert await nar_bytes(castore, node) == nix_dump(tree)


@IMPORTERS
async def test_real_package_tree(tmp_path: Path, how: str) -> None:
    tree = make_package_copy(tmp_path / "email")
    castore, node = await import_tree(how, tree)
    assert await nar_bytes(castore, node) == nix_dump(tree)


ROOTS = {
    "file": lambda p: p.write_bytes(b"just a file\n"),
    "empty-file": lambda p: p.write_bytes(b""),
    "exec-file": lambda p: (p.write_bytes(b"#!/bin/sh\n"), p.chmod(0o755)),
    "relative-symlink": lambda p: p.symlink_to("../elsewhere"),
    "absolute-symlink": lambda p: p.symlink_to("/nix/store"),
    "dangling-symlink": lambda p: p.symlink_to("no-such-target"),
    "empty-dir": lambda p: p.mkdir(),
}


@IMPORTERS
@pytest.mark.parametrize("kind", ROOTS.keys())
async def test_root_of_every_kind(tmp_path: Path, how: str, kind: str) -> None:
    path = tmp_path / "root"
    ROOTS[kind](path)
    castore, node = await import_tree(how, path)
    assert await nar_bytes(castore, node) == nix_dump(path)


async def test_nar_hash_is_what_nix_hash_prints(tmp_path: Path) -> None:
    tree = make_edge_tree(tmp_path / "edge")
    castore, node = await import_tree("walker", tree)
    digest, size = await nar_hash_and_size(castore, node)
    printed = subprocess.run(["nix-hash", "--type", "sha256", "--base32", str(tree)],
                             check=True, capture_output=True, text=True).stdout.strip()
    assert format_nar_hash(digest) == "sha256:" + printed
    assert size == len(nix_dump(tree))


async def test_nar_hash_is_what_nix_store_query_hash_prints(tmp_path: Path) -> None:
    tree = make_package_copy(tmp_path / "ocibuild-test-email")
    castore, node = await import_tree("walker", tree)
    digest, size = await nar_hash_and_size(castore, node)
    store_path = subprocess.run(["nix-store", "--add", str(tree)], check=True,
                                capture_output=True, text=True).stdout.strip()
    try:
        printed = subprocess.run(["nix-store", "-q", "--hash", store_path], check=True,
                                 capture_output=True, text=True).stdout.strip()
        printed_size = subprocess.run(["nix-store", "-q", "--size", store_path], check=True,
                                      capture_output=True, text=True).stdout.strip()
    finally:
        subprocess.run(["nix-store", "--delete", store_path], capture_output=True)
    assert format_nar_hash(digest) == printed
    assert size == int(printed_size)


@pytest.mark.parametrize("algo, size", [("md5", 16), ("sha1", 20), ("sha256", 32), ("sha512", 64)])
def test_nixbase32_agrees_with_nix_hash(algo: str, size: int) -> None:
    from stages.castore import nixbase32

    for _ in range(5):
        raw = os.urandom(size)
        printed = subprocess.run(["nix-hash", "--type", algo, "--to-base32", raw.hex()],
                                 check=True, capture_output=True, text=True).stdout.strip()
        assert nixbase32.encode(raw) == printed
        assert nixbase32.decode(printed) == raw

"""ingest_path over memory:// and the local store, on trees with every edge case.

The check is a round trip independent of the ingest code: walk the castore
result (directories, blobs) and compare it entry by entry with the
filesystem as os.lstat/os.readlink/open see it.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from pathlib import Path

import blake3
import pytest

from stages.castore.addresses import Castore, open_castore
from stages.castore.errors import IngestError
from stages.castore.ingest import ingest_path
from stages.castore.nodes import (
    EMPTY_DIRECTORY_DIGEST,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
)

NON_UTF8 = b"caf\xe9-\xff\xfe"


def make_edge_tree(root: Path) -> None:
    r = os.fsencode(root)
    os.makedirs(r)
    with open(os.path.join(r, b"empty-file"), "wb"):
        pass
    os.mkdir(os.path.join(r, b"empty-dir"))
    with open(os.path.join(r, b"run.sh"), "wb") as f:
        f.write(b"#!/bin/sh\necho hi\n")
    os.chmod(os.path.join(r, b"run.sh"), 0o755)
    with open(os.path.join(r, b"group-exec-only"), "wb") as f:
        f.write(b"not executable for the owner")
    os.chmod(os.path.join(r, b"group-exec-only"), 0o651)
    os.symlink(b"run.sh", os.path.join(r, b"rel-link"))
    os.symlink(b"/etc/passwd", os.path.join(r, b"abs-link"))
    os.symlink(b"does/not/exist", os.path.join(r, b"dangling"))
    os.symlink(b"empty-dir", os.path.join(r, b"link-to-dir"))
    os.symlink(NON_UTF8 + b"-target", os.path.join(r, b"non-utf8-target"))
    with open(os.path.join(r, NON_UTF8), "wb") as f:
        f.write(b"latin-1 name")
    os.mkdir(os.path.join(r, NON_UTF8 + b".d"))
    with open(os.path.join(r, NON_UTF8 + b".d", b"inner"), "wb") as f:
        f.write(b"inside a non-UTF-8 directory")
    # bytewise ordering: uppercase before lowercase, '-' and '.' before
    # letters, UTF-8 multibyte after ASCII
    order = os.path.join(r, b"order")
    os.mkdir(order)
    for name in (b"b", b"B", b"a", b"a-", b"a.b", b"ab", "é".encode(), b"Z", b"0", b"_"):
        with open(os.path.join(order, name), "wb") as f:
            f.write(name)
    os.mkdir(os.path.join(order, b"aa"))  # a directory sorted among the files
    deep = os.path.join(r, b"deep")
    for i in range(60):
        deep = os.path.join(deep, b"level%d" % i)
    os.makedirs(deep)
    with open(os.path.join(deep, b"bottom"), "wb") as f:
        f.write(b"at the bottom")
    # the same content twice (and a hard link): stored once, named twice
    with open(os.path.join(r, b"copy1"), "wb") as f:
        f.write(b"same bytes")
    with open(os.path.join(r, b"copy2"), "wb") as f:
        f.write(b"same bytes")
    os.link(os.path.join(r, b"copy1"), os.path.join(r, b"hardlink"))
    with open(os.path.join(r, b"big"), "wb") as f:
        f.write(os.urandom(3 << 20))


async def assert_matches(castore: Castore, node: Node, path: bytes) -> int:
    """Compare node with the filesystem at path; return the number of entries below."""
    st = os.lstat(path)
    if isinstance(node, SymlinkNode):
        assert stat.S_ISLNK(st.st_mode), path
        assert node.target == os.readlink(path)
        return 0
    if isinstance(node, FileNode):
        assert stat.S_ISREG(st.st_mode), path
        with open(path, "rb") as f:
            data = f.read()
        assert node.size == len(data)
        assert node.digest == blake3.blake3(data).digest()
        assert node.executable == bool(st.st_mode & stat.S_IXUSR), path
        assert await castore.blobs.get(node.digest) == data
        return 0
    assert isinstance(node, DirectoryNode)
    assert stat.S_ISDIR(st.st_mode), path
    directory = await castore.directories.get(node.digest)
    assert directory is not None
    assert directory.size == node.size
    names = [e.name for e in directory.entries()]
    assert sorted(os.listdir(path)) == names
    for kind in (directory.directories, directory.files, directory.symlinks):
        assert [e.name for e in kind] == sorted(e.name for e in kind)
    count = 0
    for entry in directory.entries():
        count += 1 + await assert_matches(castore, entry, os.path.join(path, entry.name))
    if not names:
        assert node.digest == EMPTY_DIRECTORY_DIGEST
    return count


def count_entries(path: bytes) -> int:
    total = 0
    for _dirpath, dirs, files in os.walk(path):
        total += len(dirs) + len(files)  # os.walk lists symlinks to dirs in dirs, unfollowed
    return total


async def test_edge_case_tree_round_trips(castore: Castore, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    make_edge_tree(src)
    node = await ingest_path(castore, src)
    assert isinstance(node, DirectoryNode)
    assert node.name == b"tree"
    entries = await assert_matches(castore, node.renamed(b""), os.fsencode(src))
    assert entries == count_entries(os.fsencode(src)) == node.size
    # The tree in castore, breadth first, has every directory once.
    walked = [d async for d in castore.directories.get_recursive(node.digest)]
    assert len({d.digest for d in walked}) == len(walked)


async def test_same_tree_same_digest_across_backends(tmp_path: Path) -> None:
    src = tmp_path / "tree"
    make_edge_tree(src)
    mem = open_castore("memory://", "memory://")
    address = f"local://{tmp_path / 'store'}"
    loc = open_castore(address, address)
    try:
        a = await ingest_path(mem, src)
        b = await ingest_path(loc, os.fsencode(src))
        c = await ingest_path(loc, str(src) + "/")  # again, and with a trailing slash
        assert a == b == c
    finally:
        loc.blobs.store.close()


@pytest.mark.parametrize("mode,executable", [(0o755, True), (0o644, False)],
                         ids=["755", "644"])
async def test_root_is_a_file(castore: Castore, tmp_path: Path, mode: int,
                              executable: bool) -> None:
    path = tmp_path / "tool"
    path.write_bytes(b"#!/bin/sh\n")
    os.chmod(path, mode)
    node = await ingest_path(castore, path)
    assert node == FileNode(name=b"tool", digest=blake3.blake3(b"#!/bin/sh\n").digest(),
                            size=10, executable=executable)
    assert await castore.blobs.get(node.digest) == b"#!/bin/sh\n"


async def test_root_is_a_symlink_not_followed(castore: Castore, tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.symlink(b"dir", os.path.join(os.fsencode(tmp_path), NON_UTF8))
    node = await ingest_path(castore, os.path.join(os.fsencode(tmp_path), NON_UTF8))
    assert node == SymlinkNode(name=NON_UTF8, target=b"dir")


async def test_root_is_an_empty_directory(castore: Castore, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    node = await ingest_path(castore, tmp_path / "empty")
    assert node == DirectoryNode(name=b"empty", digest=EMPTY_DIRECTORY_DIGEST, size=0)


async def test_fifo_is_refused(castore: Castore, tmp_path: Path) -> None:
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    os.mkfifo(tmp_path / "tree" / "sub" / "pipe")
    with pytest.raises(IngestError, match=r"sub/pipe.*FIFO"):
        await ingest_path(castore, tmp_path / "tree")
    with pytest.raises(IngestError, match=r"pipe.*FIFO"):
        await ingest_path(castore, tmp_path / "tree" / "sub" / "pipe")


async def test_socket_is_refused(castore: Castore) -> None:
    # AF_UNIX paths are short: bind in a short temp dir.
    with tempfile.TemporaryDirectory(prefix="ing-", dir="/tmp") as tmp:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(os.path.join(tmp, "sock"))
            with pytest.raises(IngestError, match=r"sock.*socket"):
                await ingest_path(castore, tmp)
        finally:
            sock.close()


async def test_missing_path(castore: Castore, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"nowhere.*does not exist"):
        await ingest_path(castore, tmp_path / "nowhere")


async def test_many_files_in_parallel(castore: Castore, tmp_path: Path) -> None:
    src = tmp_path / "many"
    for d in range(20):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(40):
            (src / f"d{d}" / f"f{f}").write_bytes(b"%d/%d\n" % (d, f) * (f + 1))
    node = await ingest_path(castore, src)
    assert await assert_matches(castore, node.renamed(b""), os.fsencode(src)) == 20 * 41

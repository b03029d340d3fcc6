"""Importing a filesystem path (directory, file or symlink) into castore.

:func:`ingest_path` walks the path without following symlinks, stores every
regular file as a blob through ``castore.blobs.put_files`` (the local store
does that in parallel threads with batched commits; any other BlobService
works through the generic one-by-one default), then uploads the directories
leaves to root in one ``put_multiple_start()`` upload, and returns the root
node named by the path's basename.

Rules:

- Names and symlink targets are raw bytes (``os.fsencode``); non-UTF-8 names
  work. Symlinks are recorded, never followed (lstat, O_NOFOLLOW).
- A file is executable when its owner's x bit is set (``st_mode & 0o100``).
- Sockets, FIFOs and devices are refused with IngestError naming the path,
  also when a file turns into one between the walk and the read.

Caveats:

- The tree is not snapshotted: a file that changes while it is read is
  stored as read (its digest and size always agree with the stored blob).
- Paths are handed to the kernel whole, so a path longer than PATH_MAX
  (4096 bytes) fails with an IngestError naming it.
- The walk keeps every entry of the tree in memory (names, targets, results),
  not file contents.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Literal

from stages.castore.addresses import Castore
from stages.castore.errors import IngestError, ValidationError
from stages.castore.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode
from stages.castore.services import StoredFile

__all__ = ["ingest_path"]


class _Dir:
    """A directory found by the walk: its entries, kind-tagged."""

    __slots__ = ("path", "entries", "node")

    def __init__(self, path: bytes) -> None:
        self.path = path
        self.entries: list[_Entry] = []
        self.node: DirectoryNode | None = None


# (name, "f", index into files) | (name, "l", target) | (name, "d", _Dir)
_Entry = (tuple[bytes, Literal["f"], int] | tuple[bytes, Literal["l"], bytes]
          | tuple[bytes, Literal["d"], _Dir])


def _kind(mode: int) -> str:
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return f"of unsupported type (mode {mode:o})"


def _refuse(path: bytes, mode: int) -> IngestError:
    return IngestError(os.fsdecode(path),
                       f"is {_kind(mode)}; only regular files, directories and symlinks "
                       f"can be imported")


def _os_error(path: bytes, what: str, exc: OSError) -> IngestError:
    if isinstance(exc, FileNotFoundError):
        return IngestError(os.fsdecode(path), "does not exist")
    return IngestError(os.fsdecode(path), f"cannot {what}: {exc.strerror or exc}")


def _readlink(path: bytes) -> bytes:
    try:
        return os.readlink(path)
    except OSError as exc:
        raise _os_error(path, "read the symlink", exc) from exc


def _walk(root: bytes) -> tuple[list[_Dir], list[bytes]]:
    """All directories under ``root`` in pre-order, and the files to store."""
    files: list[bytes] = []
    order: list[_Dir] = []
    stack = [_Dir(root)]
    while stack:
        current = stack.pop()
        order.append(current)
        try:
            with os.scandir(current.path) as it:
                entries = list(it)
        except OSError as exc:
            raise _os_error(current.path, "list the directory", exc) from exc
        for entry in entries:
            name = entry.name
            path = entry.path
            try:
                if entry.is_symlink():
                    current.entries.append((name, "l", _readlink(path)))
                elif entry.is_dir(follow_symlinks=False):
                    child = _Dir(path)
                    current.entries.append((name, "d", child))
                    stack.append(child)
                elif entry.is_file(follow_symlinks=False):
                    current.entries.append((name, "f", len(files)))
                    files.append(path)
                else:
                    raise _refuse(path, entry.stat(follow_symlinks=False).st_mode)
            except OSError as exc:
                raise _os_error(path, "stat", exc) from exc
    return order, files


def _build(order: list[_Dir], stored: list[StoredFile]) -> list[Directory]:
    """Directory values, leaves to root (reversed pre-order puts children first)."""
    out: list[Directory] = []
    by_name = lambda n: n.name
    for d in reversed(order):
        dirs: list[DirectoryNode] = []
        files: list[FileNode] = []
        links: list[SymlinkNode] = []
        for entry in d.entries:
            name = entry[0]
            try:
                if entry[1] == "f":
                    s = stored[entry[2]]
                    files.append(FileNode(name=name, digest=s.digest, size=s.size,
                                          executable=bool(s.mode & 0o100)))
                elif entry[1] == "l":
                    links.append(SymlinkNode(name=name, target=entry[2]))
                else:
                    child = entry[2].node
                    assert child is not None  # children come first (reversed pre-order)
                    dirs.append(DirectoryNode(name=name, digest=child.digest, size=child.size))
            except ValidationError as exc:
                raise IngestError(os.fsdecode(os.path.join(d.path, name)), str(exc)) from exc
        dirs.sort(key=by_name)
        files.sort(key=by_name)
        links.sort(key=by_name)
        directory = Directory(directories=dirs, files=files, symlinks=links)
        d.node = directory.as_node()
        out.append(directory)
    return out


async def ingest_path(castore: Castore, path: Path | bytes | str) -> Node:
    """Import ``path`` into ``castore``; the root node, named by its basename."""
    raw = os.fsencode(path)
    if not raw:
        raise IngestError("''", "an empty path cannot be imported")
    name = os.path.basename(os.path.abspath(raw))
    try:
        st = os.lstat(raw)
    except OSError as exc:
        raise _os_error(raw, "stat", exc) from exc
    try:
        if stat.S_ISLNK(st.st_mode):
            return SymlinkNode(name=name, target=_readlink(raw))
        if stat.S_ISREG(st.st_mode):
            (s,) = await castore.blobs.put_files([raw])
            return FileNode(name=name, digest=s.digest, size=s.size,
                            executable=bool(s.mode & 0o100))
    except ValidationError as exc:
        raise IngestError(os.fsdecode(raw), str(exc)) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(raw, st.st_mode)

    order, files = await asyncio.to_thread(_walk, raw)
    stored = await castore.blobs.put_files(files)
    directories = await asyncio.to_thread(_build, order, stored)
    putter = castore.directories.put_multiple_start()
    for directory in directories:
        await putter.put(directory)
    root = await putter.close()
    node = order[0].node
    assert node is not None and node.digest == root
    return node.renamed(name)

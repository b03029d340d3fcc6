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
- Any depth, any path length: the walk is iterative (an explicit stack) and
  reaches directories through :class:`~stages.util.deeptree.DeepTree`
  anchors, so no path handed to the kernel passes PATH_MAX (4096 bytes)
  however deep the tree. Files deeper than a plain path can name are handed
  to ``put_files`` as ``/proc/self/fd/N/...`` paths, a few anchors at a time;
  errors name the file's real path.
- The walk keeps every entry of the tree in memory (names, targets, results),
  not file contents, nor a full path per entry.
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
from stages.util.deeptree import Anchor, DeepTree, Place

__all__ = ["ingest_path"]


class _Dir:
    """A directory found by the walk: where it is, its entries, kind-tagged."""

    __slots__ = ("place", "entries", "node")

    def __init__(self, place: Place) -> None:
        self.place = place
        self.entries: list[_Entry] = []
        self.node: DirectoryNode | None = None


# (name, "f", index into files) | (name, "l", target) | (name, "d", _Dir)
_Entry = (tuple[bytes, Literal["f"], int] | tuple[bytes, Literal["l"], bytes]
          | tuple[bytes, Literal["d"], _Dir])

# Anchors pinned (kept open) at once while their files are stored.
_PINNED_AT_ONCE = 16


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


def _readlink(path: bytes, dir_fd: int | None = None, shown: bytes | None = None) -> bytes:
    try:
        return os.readlink(path, dir_fd=dir_fd)
    except OSError as exc:
        raise _os_error(shown or path, "read the symlink", exc) from exc


def _walk(tree: DeepTree) -> tuple[list[_Dir], list[tuple[_Dir, bytes]]]:
    """All directories of the tree in pre-order, and the files to store
    (each its directory and name)."""
    files: list[tuple[_Dir, bytes]] = []
    order: list[_Dir] = []
    stack = [_Dir(tree.top)]
    while stack:
        current = stack.pop()
        order.append(current)
        place = current.place
        try:
            fd = tree.open_dir(place)
        except OSError as exc:
            raise _os_error(tree.display(place), "list the directory", exc) from exc
        try:
            try:
                with os.scandir(fd) as it:
                    entries = list(it)
            except OSError as exc:
                raise _os_error(tree.display(place), "list the directory", exc) from exc
            for entry in entries:
                name = os.fsencode(entry.name)
                try:
                    if entry.is_symlink():
                        target = _readlink(name, fd, tree.display(place, name))
                        current.entries.append((name, "l", target))
                    elif entry.is_dir(follow_symlinks=False):
                        child = _Dir(tree.child(place, name))
                        current.entries.append((name, "d", child))
                        stack.append(child)
                    elif entry.is_file(follow_symlinks=False):
                        current.entries.append((name, "f", len(files)))
                        files.append((current, name))
                    else:
                        raise _refuse(tree.display(place, name),
                                      entry.stat(follow_symlinks=False).st_mode)
                except OSError as exc:
                    raise _os_error(tree.display(place, name), "stat", exc) from exc
        finally:
            os.close(fd)
    return order, files


def _build(tree: DeepTree, order: list[_Dir], stored: list[StoredFile]) -> list[Directory]:
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
                raise IngestError(os.fsdecode(tree.display(d.place, name)), str(exc)) from exc
        dirs.sort(key=by_name)
        files.sort(key=by_name)
        links.sort(key=by_name)
        directory = Directory(directories=dirs, files=files, symlinks=links)
        d.node = directory.as_node()
        out.append(directory)
    return out


async def _store_files(castore: Castore, tree: DeepTree,
                       files: list[tuple[_Dir, bytes]]) -> list[StoredFile]:
    """put_files of every file found, in order.

    Files a plain path names go in one call (the usual case: all of them);
    deeper ones by ``/proc/self/fd`` paths, a few anchors pinned per call.
    """
    stored: list[StoredFile | None] = [None] * len(files)
    plain = [i for i, (d, _) in enumerate(files) if tree.is_plain(d.place)]
    if plain:
        got = await castore.blobs.put_files([tree.path(files[i][0].place, files[i][1])
                                             for i in plain])
        for i, s in zip(plain, got, strict=True):
            stored[i] = s
    if len(plain) < len(files):
        by_anchor: dict[Anchor, list[int]] = {}
        for i, (d, _) in enumerate(files):
            if not tree.is_plain(d.place):
                by_anchor.setdefault(d.place.anchor, []).append(i)
        groups = list(by_anchor.items())
        for start in range(0, len(groups), _PINNED_AT_ONCE):
            batch = groups[start:start + _PINNED_AT_ONCE]
            pinned: list[Anchor] = []
            try:
                for anchor, _ in batch:
                    try:
                        tree.pin(anchor)
                    except OSError as exc:
                        first = files[by_anchor[anchor][0]][0]
                        raise _os_error(tree.display(first.place), "open the directory",
                                        exc) from exc
                    pinned.append(anchor)
                indexes = [i for _, group in batch for i in group]
                paths = [tree.proc_path(files[i][0].place, files[i][1]) for i in indexes]
                try:
                    got = await castore.blobs.put_files(paths)
                except IngestError as exc:
                    shown = dict(zip(map(os.fsdecode, paths), indexes))
                    at = shown.get(str(exc.path))
                    if at is None:
                        raise
                    real = os.fsdecode(tree.display(files[at][0].place, files[at][1]))
                    raise IngestError(real, str(exc)[len(f"{exc.path}: "):]) from exc
                for i, s in zip(indexes, got, strict=True):
                    stored[i] = s
            finally:
                for anchor in pinned:
                    tree.unpin(anchor)
    done = [s for s in stored if s is not None]
    assert len(done) == len(files), "a file was not stored"
    return done


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

    with DeepTree(raw) as tree:
        order, files = await asyncio.to_thread(_walk, tree)
        stored = await _store_files(castore, tree, files)
        directories = await asyncio.to_thread(_build, tree, order, stored)
    putter = castore.directories.put_multiple_start()
    for directory in directories:
        await putter.put(directory)
    root = await putter.close()
    node = order[0].node
    assert node is not None and node.digest == root
    return node.renamed(name)

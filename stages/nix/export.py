"""Materializing a registered store path as ordinary files: ``ocibuild nix export``.

:func:`export_path` writes the tree of a path registered in the path-info
database to ``DIR/<basename>`` (``DIR/<hash>-<name>``, as it would sit in
/nix/store): ``DIR`` must exist and be a directory, and ``DIR/<basename>``
must not exist (nothing is ever overwritten). The tree is written under a
temporary name inside ``DIR`` and renamed into place at the end, so a failure
or a crash never leaves a partial tree under the final name.

What survives, as in a NAR: file contents, the executable bit, symlink
targets (relative, absolute or dangling, written as they are), the directory
structure. Modes are the owner-writable counterparts of Nix's: files 0644,
executables and directories 0755 (so the user can delete the copy); times
are not set (NAR carries none).

Caveats:

- Blobs are verified as they are read: a corrupt blob fails the export
  (CorruptionError from castore), and the temporary tree is removed.
- Everything is read through the castore services one blob at a time; a
  large tree is not held in memory.
- Any depth, any path length: the tree is written iteratively (one listing
  per level held) through :class:`~stages.util.deeptree.DeepTree` anchors,
  and a failed export is removed by :func:`stages.oci.layout.rmtree`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from stages.castore.addresses import Castore
from stages.castore.errors import NotFoundError
from stages.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from stages.nix.errors import NixError
from stages.nix.pathinfo import PathInfoDB
from stages.nix.storepath import basename
from stages.oci.layout import rmtree
from stages.util.deeptree import DeepTree, Place

__all__ = ["ExportError", "export_node", "export_path"]


class ExportError(NixError):
    """An export that cannot be done; names the destination and why."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


async def export_node(castore: Castore, node: Node, dest: Path) -> None:
    """Write ``node``'s tree at ``dest`` (which must not exist)."""
    if not isinstance(node, DirectoryNode):
        await _write_leaf(castore, node, os.fsencode(dest), None)
        return
    raw = os.fsencode(dest)
    children = await _children(castore, node)
    os.mkdir(raw, 0o755)
    os.chmod(raw, 0o755)
    with DeepTree(raw) as tree:
        # The children still to write of each directory being written, outermost first.
        stack: list[tuple[Place, Iterator[Node]]] = [(tree.top, iter(children))]
        while stack:
            place, todo = stack[-1]
            child = next(todo, None)
            if child is None:
                stack.pop()
                continue
            if isinstance(child, DirectoryNode):
                below = await _children(castore, child)
                with tree.opened(place, child.name) as (path, dir_fd):
                    os.mkdir(path, 0o755, dir_fd=dir_fd)
                    os.chmod(path, 0o755, dir_fd=dir_fd)
                stack.append((tree.child(place, child.name), iter(below)))
            else:
                with tree.opened(place, child.name) as (path, dir_fd):
                    await _write_leaf(castore, child, path, dir_fd)


async def _children(castore: Castore, node: DirectoryNode) -> list[Node]:
    directory = await castore.directories.get(node.digest)
    if directory is None:
        raise NotFoundError("directory", node.digest)
    return [*directory.directories, *directory.files, *directory.symlinks]


async def _write_leaf(castore: Castore, node: Node, path: bytes, dir_fd: int | None) -> None:
    """A file or a symlink at ``path`` (from ``dir_fd``), which must not exist."""
    if isinstance(node, SymlinkNode):
        os.symlink(node.target, path, dir_fd=dir_fd)
    elif isinstance(node, FileNode):
        mode = 0o755 if node.executable else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dir_fd)
        try:
            async with await castore.blobs.open_read(node.digest) as reader:
                while chunk := await reader.read():
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                if node.size == 0:
                    await reader.verify()
            os.fchmod(fd, mode)  # not narrowed by the umask
        finally:
            os.close(fd)
    else:  # pragma: no cover - the node types are closed
        raise TypeError(f"not a castore node: {node!r}")


async def export_path(castore: Castore, pathinfo: PathInfoDB, store_path: str,
                      dest_dir: Path | str) -> Path:
    """Materialize registered ``store_path`` as ``dest_dir/<basename>``; return that path."""
    name = basename(store_path)
    info = pathinfo.get(store_path)
    dest_dir = Path(dest_dir)
    if not dest_dir.is_dir():
        raise ExportError(dest_dir, "is not an existing directory (create it first)")
    final = dest_dir / name
    if os.path.lexists(final):
        raise ExportError(final, "already exists; export never overwrites (remove it first)")
    tmp = Path(tempfile.mkdtemp(prefix=".ocibuild-export-", dir=dest_dir))
    try:
        staged = tmp / name
        await export_node(castore, info.node, staged)
        try:
            # renameat2(RENAME_NOREPLACE) is not in os; link-then-check would not
            # cover directories. A racing creator of `final` makes rename fail for
            # a non-empty directory; a file or symlink would be replaced, so check
            # once more right before.
            if os.path.lexists(final):
                raise ExportError(final, "appeared during the export; not overwritten")
            os.rename(staged, final)
        except OSError as exc:
            raise ExportError(final, f"cannot move the exported tree into place: "
                                     f"{exc.strerror}") from exc
    finally:
        rmtree(tmp, ignore_errors=True)
    return final

"""Copying a node's closure from one castore to another (e.g. to a remote one).

:func:`copy_node` makes everything a node needs present in ``dst``: the blob
of each file and every directory of the tree. It copies only what ``dst``
lacks, streams blobs through a reader and a writer (bounded memory, the
reader verifies what it sends), and uploads directories leaves to root in one
upload, so ``dst``'s upload rules hold.

Caveats:

- The tree is walked in ``src`` (one recursive get); when ``dst`` already has
  the root directory its directories are not uploaded again, but each blob is
  still checked (a directory service does not vouch for blobs).
- Blobs are checked and copied :data:`PARALLEL` at a time.
- The returned count is blob bytes plus the canonical bytes of uploaded
  directories: what crossed over, not the size of the tree.
"""

from __future__ import annotations

import asyncio

from stages.castore.addresses import Castore
from stages.castore.errors import CorruptionError, NotFoundError
from stages.castore.nodes import Directory, DirectoryNode, FileNode, Node
from stages.castore.services import READ_CHUNK

__all__ = ["PARALLEL", "copy_blob", "copy_node"]

PARALLEL = 8


async def copy_blob(src: Castore, dst: Castore, digest: bytes) -> int:
    """Copy one blob if ``dst`` lacks it; the bytes copied (0 when present)."""
    if await dst.blobs.stat(digest) is not None:
        return 0
    copied = 0
    async with await src.blobs.open_read(digest) as reader:
        writer = dst.blobs.open_write()
        async with writer:
            while chunk := await reader.read(READ_CHUNK):
                await writer.write(chunk)
                copied += len(chunk)
            stored = await writer.close()
    if stored != digest:
        raise CorruptionError("blob", digest,
                              f"copy (the destination stored it as {stored.hex()})")
    return copied


def _leaves_to_root(root: bytes, directories: dict[bytes, Directory]) -> list[Directory]:
    """Post-order from the root: every directory after all it references."""
    order: list[Directory] = []
    done: set[bytes] = set()
    stack: list[tuple[bytes, bool]] = [(root, False)]
    while stack:
        digest, expanded = stack.pop()
        if digest in done:
            continue
        if expanded:
            done.add(digest)
            order.append(directories[digest])
            continue
        stack.append((digest, True))
        for child in directories[digest].directories:
            if child.digest not in done:
                stack.append((child.digest, False))
    return order


async def copy_node(src: Castore, dst: Castore, node: Node) -> int:
    """Copy what ``dst`` lacks of ``node``'s closure; return the bytes copied."""
    if isinstance(node, FileNode):
        return await copy_blob(src, dst, node.digest)
    if not isinstance(node, DirectoryNode):
        return 0  # a symlink is all in the node
    directories: dict[bytes, Directory] = {}
    blobs: set[bytes] = set()
    async for directory in src.directories.get_recursive(node.digest):
        directories[directory.digest] = directory
        blobs.update(f.digest for f in directory.files)
    if node.digest not in directories:
        raise NotFoundError("directory", node.digest)

    limit = asyncio.Semaphore(PARALLEL)

    async def one(digest: bytes) -> int:
        async with limit:
            return await copy_blob(src, dst, digest)

    # Blobs first: a directory in dst should not point at missing blobs.
    copied = sum(await asyncio.gather(*(one(d) for d in sorted(blobs))))
    if await dst.directories.get(node.digest) is None:
        order = _leaves_to_root(node.digest, directories)
        root = await dst.directories.put_tree(order)
        if root != node.digest:
            raise CorruptionError("directory", node.digest,
                                  f"copy (the destination stored the root as {root.hex()})")
        copied += sum(len(d.canonical_bytes) for d in order)
    return copied

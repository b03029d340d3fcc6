"""Small values for the store tests: digests, byte patterns, a tree of directories."""

from __future__ import annotations

import blake3

from stages.castore.nodes import Directory, FileNode, SymlinkNode

__all__ = ["b3", "file_node", "pattern", "tree"]


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes that are not all alike (so a flipped byte changes the digest)."""
    block = bytes((i * 31 + seed) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


def file_node(name: bytes, data: bytes, executable: bool = False) -> FileNode:
    return FileNode(name=name, digest=b3(data), size=len(data), executable=executable)


def tree() -> tuple[list[Directory], Directory]:
    """A small tree with a shared child: leaves first, root last."""
    empty = Directory()
    leaf = Directory(files=[file_node(b"x", b"x")], symlinks=[SymlinkNode(name=b"l", target=b"x")])
    mid = Directory(directories=[leaf.as_node(b"leaf"), empty.as_node(b"void")])
    root = Directory(directories=[leaf.as_node(b"a"), mid.as_node(b"b"), empty.as_node(b"c")],
                     files=[file_node(b"f", b"hello", True)])
    return [empty, leaf, mid, root], root

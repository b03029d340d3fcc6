"""Castore nodes rendered as NAR, Nix's archive format, and their NAR hash.

A NAR is what ``nix-store --dump PATH`` writes: the string ``nix-archive-1``
and then the root node, where every string is a little-endian u64 length, the
bytes, and zero padding to a multiple of 8::

    file:      ( type regular [executable ""] contents <u64 size><bytes><pad> )
    symlink:   ( type symlink target <target> )
    directory: ( type directory { entry ( name <name> node <node> ) }* )

Directory entries come sorted bytewise by name, across files, directories and
symlinks alike. A NAR carries no name for its root, no timestamps, no owners
and no permission bits other than the executable flag, so the castore view of
a tree and Nix's view of it serialize identically.

The NAR hash is sha256 of those bytes; :func:`format_nar_hash` prints it as
``nix-store -q --hash`` does (``sha256:`` + nixbase32).

Caveats:

- Streaming: :func:`nar_chunks` holds one directory listing per level of depth
  and one blob chunk at a time, never a whole tree or a whole file. Directories
  are fetched one by one, when the walk reaches them. The walk is iterative
  (an explicit stack of listings), so any depth renders.
- A blob is verified by its reader as it streams, so corruption is detected
  only at the end of that blob: the bytes before it have already been yielded
  when :class:`CorruptionError` is raised. Consumers that must not publish bad
  data (a NAR cache) should buffer or discard on error.
- A missing blob or directory raises :class:`NotFoundError` naming its digest,
  also part-way through the stream.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import AsyncIterator, Iterator
from typing import BinaryIO

from stages.castore.addresses import Castore
from stages.castore.errors import CorruptionError, NotFoundError, ValidationError
from stages.castore.hashes import format_sha256
from stages.castore.nodes import (
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    blob_digest,
)
from stages.castore.services import READ_CHUNK

__all__ = [
    "NAR_MAGIC",
    "format_nar_hash",
    "nar_bytes",
    "nar_chunks",
    "nar_hash_and_size",
    "write_nar",
]

NAR_MAGIC = b"nix-archive-1"

# Small pieces (headers, small files) are gathered until this many bytes before
# a chunk is yielded, so a tree of many small files is not thousands of tiny
# writes; blob chunks at least this big are passed through unchanged.
_FLUSH_AT = 256 * 1024


def _str(data: bytes) -> bytes:
    """One NAR string: u64 LE length, the bytes, zero padding to 8."""
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


_OPEN = _str(b"(")
_CLOSE = _str(b")")
_TYPE = _str(b"type")
_REGULAR = _OPEN + _TYPE + _str(b"regular")
_EXECUTABLE = _str(b"executable") + _str(b"")
_CONTENTS = _str(b"contents")
_SYMLINK = _OPEN + _TYPE + _str(b"symlink") + _str(b"target")
_DIRECTORY = _OPEN + _TYPE + _str(b"directory")
_ENTRY = _str(b"entry") + _OPEN + _str(b"name")
_NODE = _str(b"node")
_EMPTY_BLOB_DIGEST = blob_digest(b"")


class _Out:
    """Gathers small pieces; hands out chunks of about _FLUSH_AT bytes."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def take(self) -> bytes:
        chunk = bytes(self.buf)
        self.buf.clear()
        return chunk


async def nar_chunks(castore: Castore, node: Node) -> AsyncIterator[bytes]:
    """The NAR serialization of ``node``, as a stream of non-empty chunks.

    The node's own name is not part of a NAR and is ignored.
    """
    out = _Out()
    out.buf += _str(NAR_MAGIC)
    # The entries still to write of each directory being written, outermost first.
    stack: list[Iterator[Node]] = []
    pending: Node | None = node
    while True:
        if pending is not None:
            current, pending = pending, None
            if isinstance(current, DirectoryNode):
                directory = await _directory(castore, current)
                out.buf += _DIRECTORY
                stack.append(iter(directory.entries()))
            else:
                if isinstance(current, SymlinkNode):
                    out.buf += _SYMLINK + _str(current.target) + _CLOSE
                elif isinstance(current, FileNode):
                    out.buf += _REGULAR
                    if current.executable:
                        out.buf += _EXECUTABLE
                    out.buf += _CONTENTS + struct.pack("<Q", current.size)
                    async for chunk in _blob(castore, current, out):
                        yield chunk
                    out.buf += b"\0" * (-current.size % 8) + _CLOSE
                else:
                    raise TypeError(f"not a castore node: {current!r}")
                # A node is done: the chunk boundaries fall where they always did.
                if len(out.buf) >= _FLUSH_AT:
                    yield out.take()
                if stack:
                    out.buf += _CLOSE  # its entry in the directory around it
        if not stack:
            break
        entry = next(stack[-1], None)
        if entry is not None:
            out.buf += _ENTRY + _str(entry.name) + _NODE
            pending = entry
            continue
        stack.pop()  # a directory is done
        out.buf += _CLOSE
        if len(out.buf) >= _FLUSH_AT:
            yield out.take()
        if not stack:
            break
        out.buf += _CLOSE  # its entry in the directory around it
    if out.buf:
        yield out.take()


async def _directory(castore: Castore, node: DirectoryNode) -> Directory:
    directory = await castore.directories.get(node.digest)
    if directory is None:
        raise NotFoundError("directory", node.digest)
    if directory.digest != node.digest:
        raise CorruptionError("directory", node.digest, "directory service")
    if directory.size != node.size:
        raise ValidationError(
            "directory-size",
            f"DirectoryNode says size {node.size}, the directory has {directory.size}",
            name=node.name or None, digest=node.digest)
    return directory


async def _blob(castore: Castore, node: FileNode, out: _Out) -> AsyncIterator[bytes]:
    if node.size == 0:
        # The empty blob need not be stored; its digest says what it is.
        if await castore.blobs.stat(node.digest) is None:
            if node.digest != _EMPTY_BLOB_DIGEST:
                raise NotFoundError("blob", node.digest)
            return
    reader = await castore.blobs.open_read(node.digest)
    async with reader:
        if reader.size != node.size:
            raise ValidationError(
                "file-size",
                f"FileNode says size {node.size}, the blob has {reader.size} bytes",
                name=node.name or None, digest=node.digest)
        remaining = node.size
        while remaining:
            chunk = await reader.read(min(READ_CHUNK, remaining))
            if not chunk:
                raise CorruptionError("blob", node.digest,
                                      f"ended {remaining} bytes short of its size")
            remaining -= len(chunk)
            if len(chunk) >= _FLUSH_AT:
                if out.buf:
                    yield out.take()
                yield chunk
            else:
                out.buf += chunk
                if len(out.buf) >= _FLUSH_AT:
                    yield out.take()
        # Reading at the end is where a reader checks the digest (again, for
        # readers that already did at the last byte); it must find nothing.
        if await reader.read():
            raise CorruptionError("blob", node.digest,
                                  f"holds more than the {node.size} bytes of its size")
        if node.size == 0:
            await reader.verify()


async def nar_hash_and_size(castore: Castore, node: Node) -> tuple[bytes, int]:
    """sha256 of the node's NAR and the NAR's length in bytes."""
    hasher = hashlib.sha256()
    size = 0
    async for chunk in nar_chunks(castore, node):
        hasher.update(chunk)
        size += len(chunk)
    return hasher.digest(), size


def format_nar_hash(sha256: bytes) -> str:
    """A NAR hash as ``nix-store -q --hash`` prints it: ``sha256:<nixbase32>``."""
    return format_sha256(sha256)


async def nar_bytes(castore: Castore, node: Node) -> bytes:
    """The whole NAR in memory (for small trees and tests)."""
    return b"".join([chunk async for chunk in nar_chunks(castore, node)])


async def write_nar(castore: Castore, node: Node, out: BinaryIO) -> int:
    """Stream the NAR into a binary file object; return its length."""
    size = 0
    async for chunk in nar_chunks(castore, node):
        out.write(chunk)
        size += len(chunk)
    return size

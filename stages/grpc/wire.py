"""Wire details shared by the castore gRPC server and client.

Why this module: ``tvix.castore.v1.BlobChunk`` is one ``bytes data = 1``
field, and going through the generated protobuf class costs a full copy of
every chunk on each end plus per-message object overhead. Blob Read and Put
therefore use a hand-written codec for exactly that message (what protobuf
would produce: tag 0x0a, a varint length, the bytes), with protobuf as the
fallback for any other encoding a peer may send (unknown fields, several
occurrences of the field). The bytes on the wire are the same, so tvix
peers and the generated stubs interoperate.

Caveats:

- :func:`decode_chunk_view` returns a memoryview into gRPC's received
  buffer (no copy); :func:`decode_chunk` copies to bytes.
- :func:`tune_malloc` changes the process's allocator (fixed 32 MiB mmap and
  trim thresholds); the server and the clients call it when they start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

from stages.proto import rpc_blobstore_pb2

__all__ = [
    "CHANNEL_OPTIONS",
    "CHUNK",
    "MAX_MESSAGE",
    "POISON",
    "SERVER_OPTIONS",
    "Chunk",
    "decode_chunk",
    "decode_chunk_view",
    "encode_chunk",
    "tune_malloc",
]

# Bytes of blob data per BlobChunk message, both directions: below gRPC's
# default 4 MiB so peers with default limits can read what we send. 2-4 MiB
# messages measured no faster than 1 MiB (within the noise of a shared
# machine), and callers reading READ_CHUNK (1 MiB) would then get copies of
# message halves. OCIBUILD_GRPC_CHUNK overrides it (for measuring).
CHUNK = int(os.environ.get("OCIBUILD_GRPC_CHUNK", str(1 << 20)))
# The largest message either end accepts (room for a big Directory).
MAX_MESSAGE = 16 << 20
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]
CHANNEL_OPTIONS = [
    *SERVER_OPTIONS,
    # Reconnect quickly after a server restart instead of backing off to 2 min.
    ("grpc.max_reconnect_backoff_ms", 2000),
]

BLOB_SERVICE = "tvix.castore.v1.BlobService"


# What an aborting client sends before it cancels an upload: a BlobChunk
# whose field claims more bytes than follow, which no protobuf decoder
# accepts, so the server fails the upload. Why: a gRPC Python server may see
# a client's cancel as a plain end of stream (a half-close) and would then
# commit the bytes received so far as a blob; messages arrive in order, so
# this one is seen first.
POISON = b"\x0a\x05"


class Chunk:
    """A BlobChunk without protobuf: ``.data`` is bytes or a memoryview."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk(message: Chunk | rpc_blobstore_pb2.BlobChunk | bytes) -> bytes:
    if isinstance(message, bytes):
        return message  # already encoded (POISON)
    data = message.data
    if not data:
        return b""  # proto3 omits an empty bytes field
    return b"".join((b"\x0a", _varint(len(data)), data))


def _fast_offset(buf: bytes) -> int | None:
    """Where the data starts if ``buf`` is exactly one field 1, else None."""
    if len(buf) < 2 or buf[0] != 0x0A:
        return None
    length = shift = 0
    pos = 1
    while pos < len(buf) and pos < 11:
        byte = buf[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return pos if pos + length == len(buf) else None
        shift += 7
    return None


def decode_chunk_view(buf: bytes) -> Chunk:
    """A received BlobChunk, its data a view into ``buf`` (no copy)."""
    if not buf:
        return Chunk(b"")
    start = _fast_offset(buf)
    if start is None:
        return Chunk(rpc_blobstore_pb2.BlobChunk.FromString(buf).data)
    return Chunk(memoryview(buf)[start:])


def decode_chunk(buf: bytes) -> Chunk:
    """A received BlobChunk with its data as bytes."""
    if not buf:
        return Chunk(b"")
    start = _fast_offset(buf)
    if start is None:
        return Chunk(rpc_blobstore_pb2.BlobChunk.FromString(buf).data)
    return Chunk(buf[start:])


# --- the allocator -------------------------------------------------------------

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Fixed thresholds: blocks up to 32 MiB (any message, MAX_MESSAGE plus its
# header) come from the heap, and up to 32 MiB of freed heap stays mapped.
MALLOC_THRESHOLD = 32 << 20
_tuned: bool | None = None
_tune_lock = threading.Lock()


def tune_malloc() -> bool:
    """Keep freed message buffers mapped, once per process; True if applied.

    Why: every message crossing gRPC's Python layer is a fresh 1-16 MiB
    buffer (gRPC's receive copies, our encoder's bytes). glibc serves blocks
    that size with their own mmap and unmaps them on free, or trims the heap
    top; the next buffer then page-faults on every page and the kernel zeroes
    it: measured, 28% of a castore server's CPU during an upload
    (clear_page_erms) and a third of its CPU per GiB overall. Fixed
    thresholds (:data:`MALLOC_THRESHOLD`) make those buffers reuse heap
    memory instead. Process-wide: the process may keep up to 32 MiB of
    freed memory mapped. A no-op (False) where the C library has no
    ``mallopt`` (not glibc) or ``OCIBUILD_GRPC_MALLOC=default`` says so.
    """
    global _tuned
    with _tune_lock:
        if _tuned is None:
            _tuned = False
            if os.environ.get("OCIBUILD_GRPC_MALLOC") != "default":
                try:
                    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                    mallopt = libc.mallopt
                except (OSError, AttributeError):
                    return False
                mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                mallopt.restype = ctypes.c_int
                _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_THRESHOLD)) and bool(
                    mallopt(_M_TRIM_THRESHOLD, MALLOC_THRESHOLD))
        return _tuned

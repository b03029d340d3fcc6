"""The blocking castore reader over gRPC, for the FUSE mount server.

The mount server answers the kernel from one trio thread and reads stores
through plain blocking calls (:class:`~stages.castore.fuse.store.StoreReader`);
for ``grpc+unix``, ``grpc+http`` and ``grpc+https`` stores that is
:class:`GrpcSyncReader`. Deadlines, retries and errors are those of every
client (:mod:`stages.grpc.channels`).

Caveats:

- The protocol has no range reads: a blob is fetched whole, verified, into
  an unlinked spool file at its first open, and read from there.
- A remote store that is down when the reader opens is a clear StoreError.
"""

from __future__ import annotations

import collections
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import blake3
import grpc

from stages.castore.errors import CorruptionError, NotFoundError, StoreError, ValidationError
from stages.castore.nodes import Directory, directory_from_proto, validate_digest
from stages.grpc.channels import (
    DEFAULT_OPTIONS,
    GrpcOptions,
    GrpcTarget,
    parse_address,
    sync_channel,
    translate_error,
)
from stages.grpc.wire import tune_malloc
from stages.proto import (
    rpc_blobstore_pb2,
    rpc_blobstore_pb2_grpc,
    rpc_directory_pb2,
    rpc_directory_pb2_grpc,
)

__all__ = ["GrpcSyncReader"]

T = TypeVar("T")


class GrpcSyncReader:
    """The FUSE server's :class:`StoreReader` over a remote castore (blocking).

    Directories are cached by digest and blob sizes by digest (both bounded).
    The protocol has no range reads, so a blob is fetched whole: the first
    verify streams it once, hashing, into an unlinked spool file, and reads
    are then preads of that file. Spooled blobs are kept up to
    ``spool_bytes`` in total (least recently used dropped first; a dropped
    one is fetched and verified again when read). Thread-safe.
    """

    def __init__(self, blob_address: str | None, directory_address: str | None, *,
                 options: GrpcOptions = DEFAULT_OPTIONS,
                 spool_dir: str | None = None,
                 spool_bytes: int = 4 << 30,
                 max_directories: int = 100_000) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._blob_target = parse_address(blob_address) if blob_address else None
        self._dir_target = parse_address(directory_address) if directory_address else None
        self._channels: list[grpc.Channel] = []
        tune_malloc()
        self.blobs = self.directories = None
        if self._blob_target is not None:
            ch = self._channel(self._blob_target)
            self.blobs = rpc_blobstore_pb2_grpc.BlobServiceStub(ch)
        if self._dir_target is not None:
            ch = self._channel(self._dir_target)
            self.directories = rpc_directory_pb2_grpc.DirectoryServiceStub(ch)
        self._spool_dir = spool_dir
        self._spool_bytes = spool_bytes
        self._spooled: collections.OrderedDict[bytes, tuple[int, int]] = collections.OrderedDict()
        self._spooled_total = 0
        self._sizes: dict[bytes, int] = {}
        self._dirs: collections.OrderedDict[bytes, Directory] = collections.OrderedDict()
        self._max_dirs = max_directories
        # One fetch per digest at a time.
        self._fetching: dict[bytes, threading.Lock] = {}

    def _channel(self, target: GrpcTarget) -> grpc.Channel:
        if target.target.startswith("unix://") and not os.path.exists(
                target.target[len("unix://"):]):
            raise StoreError(target.address, "no server: the socket does not exist")
        channel = sync_channel(target)
        self._channels.append(channel)
        try:
            grpc.channel_ready_future(channel).result(timeout=self.options.connect_timeout)
        except grpc.FutureTimeoutError:
            self.close()
            raise StoreError(target.address, f"cannot connect within "
                                             f"{self.options.connect_timeout:g} s (is the "
                                             f"server running at {target.target}?)") from None
        return channel

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels = []
        with self._lock:
            for fd, _size in self._spooled.values():
                os.close(fd)
            self._spooled.clear()
            self._spooled_total = 0

    def _unary(self, call: Callable[[], T], address: str, kind: str, digest: bytes) -> T:
        tries = 0
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                delay = self.options.retry_delay(exc, tries)
                if delay is None:
                    raise translate_error(exc, address, kind, digest) from exc
                time.sleep(delay)
                tries += 1

    # --- the StoreReader methods ----------------------------------------------

    def blob_size(self, digest: bytes) -> int | None:
        validate_digest(digest)
        size = self._sizes.get(digest)
        if size is not None:
            return size
        blobs, target = self.blobs, self._blob_target
        assert blobs is not None and target is not None  # blobs are read only given an address
        request = rpc_blobstore_pb2.StatBlobRequest(digest=digest, send_chunks=True)
        try:
            response = self._unary(
                lambda: blobs.Stat(request, timeout=self.options.call_timeout,
                                   wait_for_ready=True),
                target.address, "blob", digest)
        except NotFoundError:
            return None
        if response.chunks:
            size = sum(c.size for c in response.chunks)
        else:
            size = self._spool(digest, None)[1]
        with self._lock:
            if len(self._sizes) > 1_000_000:
                self._sizes.clear()
            self._sizes[digest] = size
        return size

    def get_directory(self, digest: bytes) -> Directory | None:
        validate_digest(digest)
        with self._lock:
            cached = self._dirs.get(digest)
            if cached is not None:
                self._dirs.move_to_end(digest)
                return cached
        directories, target = self.directories, self._dir_target
        # Directories are read only from a reader given a directory address.
        assert directories is not None and target is not None
        address = target.address
        request = rpc_directory_pb2.GetDirectoryRequest(digest=digest, recursive=False)
        try:
            messages = self._unary(
                lambda: list(directories.Get(request, timeout=self.options.call_timeout,
                                             wait_for_ready=True)),
                address, "directory", digest)
        except NotFoundError:
            return None
        if not messages:
            return None
        try:
            directory = directory_from_proto(messages[0])
        except ValidationError as exc:
            raise CorruptionError("directory", digest, f"{address} ({exc})") from exc
        if directory.digest != digest:
            raise CorruptionError("directory", digest,
                                  f"{address} (sent a directory hashing to "
                                  f"{directory.digest.hex()})")
        with self._lock:
            self._dirs[digest] = directory
            while len(self._dirs) > self._max_dirs:
                self._dirs.popitem(last=False)
        return directory

    def verify_blob(self, digest: bytes,
                    on_chunk: Callable[[int, memoryview], None] | None = None) -> None:
        """Fetch, hash and spool the blob (CorruptionError / NotFoundError)."""
        validate_digest(digest)
        with self._lock:
            if digest in self._spooled and on_chunk is None:
                self._spooled.move_to_end(digest)
                return
        self._spool(digest, on_chunk)

    def read_blob_at(self, digest: bytes, offset: int, n: int) -> bytes:
        return self._with_spooled(
            digest, lambda fd, size: os.pread(fd, max(0, min(n, size - offset)), offset)
            if offset < size else b"")

    def read_blob_into(self, digest: bytes, offset: int, buffer: bytearray | memoryview) -> int:
        return self._with_spooled(
            digest, lambda fd, size: os.preadv(fd, [memoryview(buffer)[:size - offset]], offset)
            if offset < size else 0)

    # --- spooling -------------------------------------------------------------

    def _with_spooled(self, digest: bytes, read: Callable[[int, int], T]) -> T:
        """``read(fd, size)`` on the blob's spool file, fetching it when needed.

        Runs under the lock so an eviction never closes an fd being read (a
        closed fd number could be reused by another file); preads of a local
        spool file are short.
        """
        while True:
            with self._lock:
                found = self._spooled.get(digest)
                if found is not None:
                    self._spooled.move_to_end(digest)
                    return read(*found)
            self._spool(digest, None)

    def _read_stream(self, digest: bytes) -> Iterator[bytes]:
        assert self.blobs is not None and self._blob_target is not None  # as in blob_size
        address = self._blob_target.address
        size = self._sizes.get(digest, 0)
        # An overall deadline scaled by size (at least 10 MB/s), as sync
        # streams have no per-message timeout.
        timeout = self.options.call_timeout + size / 10e6
        call = self.blobs.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=digest),
                               timeout=timeout, wait_for_ready=True)
        try:
            for message in call:
                yield message.data
        except grpc.RpcError as exc:
            raise translate_error(exc, address, "blob", digest) from exc
        finally:
            call.cancel()

    def _spool(self, digest: bytes,
               on_chunk: Callable[[int, memoryview], None] | None) -> tuple[int, int]:
        with self._lock:
            gate = self._fetching.setdefault(digest, threading.Lock())
        try:
            with gate:
                return self._spool_locked(digest, on_chunk)
        finally:
            with self._lock:
                self._fetching.pop(digest, None)

    def _spool_locked(self, digest: bytes,
                      on_chunk: Callable[[int, memoryview], None] | None) -> tuple[int, int]:
        with self._lock:
            found = self._spooled.get(digest)
        if found is not None and on_chunk is None:
            return found
        assert self._blob_target is not None  # as in blob_size
        address = self._blob_target.address
        fd = os.open(self._spool_dir or tempfile.gettempdir(),
                     os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            hasher = blake3.blake3()
            offset = 0
            for data in self._read_stream(digest):
                hasher.update(data)
                view = memoryview(data)
                if on_chunk is not None:
                    on_chunk(offset, view)
                while view:
                    written = os.pwrite(fd, view, offset)
                    offset += written
                    view = view[written:]
            if hasher.digest() != digest:
                raise CorruptionError("blob", digest,
                                      f"{address} (the bytes received do not hash to "
                                      f"the digest)")
        except BaseException:
            os.close(fd)
            raise
        entry = (fd, offset)
        with self._lock:
            old = self._spooled.pop(digest, None)
            if old is not None:
                os.close(old[0])
                self._spooled_total -= old[1]
            self._spooled[digest] = entry
            self._spooled_total += offset
            self._sizes[digest] = offset
            while self._spooled_total > self._spool_bytes and len(self._spooled) > 1:
                _, (old_fd, old_size) = self._spooled.popitem(last=False)
                # Safe: preads of spool files run under the lock too.
                os.close(old_fd)
                self._spooled_total -= old_size
        return entry

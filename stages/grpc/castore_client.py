"""The castore over gRPC, client side: addresses ``grpc+unix``, ``grpc+http``, ``grpc+https``.

:data:`BACKEND` serves the three schemes for :mod:`stages.castore.addresses`
(registered as entry points in pyproject.toml), so
``open_castore("grpc+unix:///run/c.sock", ...)`` gives a
:class:`GrpcBlobService` and a :class:`GrpcDirectoryService` speaking
tvix.castore.v1 to a server (ours, :mod:`stages.grpc.castore_server`, or
tvix's). The blocking reader the FUSE mount server uses for remote stores
is :class:`stages.grpc.castore_reader.GrpcSyncReader`; addresses, channels,
the retry policy and the status-code boundary are in
:mod:`stages.grpc.channels`.

Addresses::

    grpc+unix:///abs/path      a unix socket (absolute path)
    grpc+http://host:port      plain HTTP/2 over TCP (port required)
    grpc+https://host:port     TLS with the system's roots

Errors are translated from status codes at one boundary
(:func:`~stages.grpc.channels.translate_error`): NOT_FOUND -> NotFoundError, INVALID_ARGUMENT ->
ValidationError (with the server's rule and message), DATA_LOSS ->
CorruptionError, anything else (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...)
-> StoreError naming the address.

Never a hang (:class:`~stages.grpc.channels.GrpcOptions`, all configurable):

- the first call on a channel waits at most ``connect_timeout`` for it to be
  ready, else StoreError "cannot connect";
- unary-shaped calls (Stat, a single directory Get) carry a ``call_timeout``
  deadline and are retried with exponential backoff on UNAVAILABLE (they are
  idempotent); a recursive Get and blob Read are retried only before their
  first message arrives, never mid-stream;
- streams wait at most ``idle_timeout`` for each next message (or for the
  peer to accept one), so a stalled peer is an error, not a hang; uploads are
  never retried (the caller still holds the bytes and decides).

Caveats:

- Readers verify: the bytes of a blob are hashed as they arrive and the last
  chunk is only returned after the digest matched (else CorruptionError);
  :meth:`BlobReader.pread` is unverified and, as the protocol has no range
  reads, streams from the start of the blob up to the range.
- A blob's size comes from Stat with ``send_chunks`` (sum of the chunk
  sizes). A server that answers with an empty chunk list (tvix: "one
  chunk, the blob itself") makes the client count the bytes of a Read.
- Channels are created lazily on the first call, in the running event loop;
  a service instance must be used from one event loop.
- Uploads return the server's digest; the client does not hash what it sends.

Throughput (issue 6): see :mod:`stages.grpc.castore_server` for the table
(before/after, both processes). On this side, at load 1.2-2.6 on 2 cores:
upload 0.8-1.0 CPU s/GiB (bare gRPC: 0.66), download 1.3-1.9 (bare: 0.90;
the difference is BLAKE3 and one copy out of the message). The client
calls :func:`~stages.grpc.wire.tune_malloc` when it opens a channel.
Hashing in a thread while the next message arrives was measured and
dropped: more CPU, and slower on a busy machine.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import blake3
import grpc

from stages.castore.addresses import Backend
from stages.castore.errors import CorruptionError, NotFoundError, StoreError, ValidationError
from stages.castore.nodes import (
    Directory,
    directory_from_proto,
    directory_to_proto,
    validate_digest,
)
from stages.castore.services import (
    READ_CHUNK,
    BlobReader,
    BlobService,
    BlobWriter,
    ClosureValidator,
    DirectoryPutter,
    DirectoryService,
)
from stages.grpc.channels import (
    DEFAULT_OPTIONS,
    GrpcOptions,
    aio_channel,
    parse_address,
    translate_error,
)
from stages.grpc.wire import (
    BLOB_SERVICE,
    CHUNK,
    POISON,
    Chunk,
    decode_chunk,
    encode_chunk,
    tune_malloc,
)
from stages.proto import (
    castore_pb2,
    rpc_blobstore_pb2,
    rpc_blobstore_pb2_grpc,
    rpc_directory_pb2,
    rpc_directory_pb2_grpc,
)

if TYPE_CHECKING:
    from stages.castore.services import StoreReader

__all__ = ["BACKEND", "GrpcBlobService", "GrpcDirectoryService"]

T = TypeVar("T")


async def _raise_final_status(call: grpc.aio.Call, exc: grpc.aio.AioRpcError, address: str,
                              kind: str = "blob", digest: bytes | None = None) -> None:
    """Raise what a failed write of a client stream means.

    A write racing the server's end of the call can fail in gRPC's core
    ("Internal error from Core") before the call's status has arrived; the
    status (the server's refusal) is the real reason, so wait a moment for
    it and raise that; else the write's own error.
    """
    try:
        code = await asyncio.wait_for(call.code(), 1.0)
        details = await call.details()
    except TimeoutError:
        code = details = None
    if code is not None and code != grpc.StatusCode.OK:
        final = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                     details=details)
        raise translate_error(final, address, kind, digest) from exc
    raise translate_error(exc, address, kind, digest) from exc



# --- the asyncio client -----------------------------------------------------------

class _Connection:
    """One lazily created channel plus its stubs, checked ready once."""

    def __init__(self, address: str, options: GrpcOptions) -> None:
        self.target = parse_address(address)
        self.address = address
        self.options = options
        self._channel: grpc.aio.Channel | None = None
        self._ready = False
        self.blobs: rpc_blobstore_pb2_grpc.BlobServiceStub
        self.directories: rpc_directory_pb2_grpc.DirectoryServiceStub

    async def ready(self) -> None:
        if self._channel is None:
            tune_malloc()
            self._channel = aio_channel(self.target)
            self.blobs = rpc_blobstore_pb2_grpc.BlobServiceStub(self._channel)
            # Read and Put with the fast BlobChunk codec (grpc_wire).
            self.read = self._channel.unary_stream(
                f"/{BLOB_SERVICE}/Read",
                request_serializer=rpc_blobstore_pb2.ReadBlobRequest.SerializeToString,
                response_deserializer=decode_chunk)
            self.put = self._channel.stream_unary(
                f"/{BLOB_SERVICE}/Put", request_serializer=encode_chunk,
                response_deserializer=rpc_blobstore_pb2.PutBlobResponse.FromString)
            self.directories = rpc_directory_pb2_grpc.DirectoryServiceStub(self._channel)
        if self._ready:
            return
        if self.target.target.startswith("unix://") and not os.path.exists(
                self.target.target[len("unix://"):]):
            raise StoreError(self.address, "no server: the socket does not exist")
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self.options.connect_timeout)
        except TimeoutError:
            raise StoreError(self.address, f"cannot connect within "
                                           f"{self.options.connect_timeout:g} s "
                                           f"(is the server running at {self.target.target}?)"
                             ) from None
        self._ready = True

    async def unary(self, call: Callable[[], asyncio.Future[T]], kind: str,
                    digest: bytes) -> T:
        """Run an idempotent call with deadline and retries on UNAVAILABLE."""
        await self.ready()
        return await self._retrying(call, kind, digest)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]], kind: str,
                        digest: bytes) -> T:
        """``attempt()``, again with backoff while it fails UNAVAILABLE (up to
        ``options.retries`` times); other gRPC errors translated."""
        tries = 0
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as exc:
                delay = self.options.retry_delay(exc, tries)
                if delay is None:
                    raise translate_error(exc, self.address, kind, digest) from exc
                await asyncio.sleep(delay)
                tries += 1

    async def open_stream(self, start: Callable[[], grpc.aio.UnaryStreamCall], *,
                          timeout: float, what: str, kind: str,
                          digest: bytes) -> tuple[grpc.aio.UnaryStreamCall, object]:
        """Start a server stream and read its first message (or EOF).

        Retried with backoff on UNAVAILABLE only until that first message:
        nothing has been handed to the caller yet, so a retry is safe.
        """
        async def attempt() -> tuple[grpc.aio.UnaryStreamCall, object]:
            call = start()
            try:
                return call, await asyncio.wait_for(call.read(), timeout)
            except TimeoutError:
                call.cancel()
                raise StoreError(self.address, f"no answer within {timeout:g} s "
                                               f"to {what}") from None

        return await self._retrying(attempt, kind, digest)

    async def next_message(self, call: grpc.aio.Call, kind: str, digest: bytes) -> object:
        """The next message of a response stream (EOF at the end), with the idle timeout."""
        try:
            # asyncio.timeout, not wait_for: no extra task per message.
            async with asyncio.timeout(self.options.idle_timeout):
                return await call.read()
        except TimeoutError:
            call.cancel()
            raise StoreError(self.address, f"no message from the server for "
                                           f"{self.options.idle_timeout:g} s "
                                           f"while reading {kind} {digest.hex()}") from None
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc, self.address, kind, digest) from exc

    async def aclose(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._ready = False
            await channel.close()


class _GrpcReader(BlobReader):
    def __init__(self, conn: _Connection, digest: bytes, size: int) -> None:
        self._conn = conn
        self.digest = digest
        self.size = size
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._buffer = b""  # the last message's bytes, from _offset on unread
        self._offset = 0
        self._pos = 0
        self._hasher = blake3.blake3()
        self._done = False

    async def _open(self) -> grpc.aio.UnaryStreamCall:
        """Start the Read stream; retried (on UNAVAILABLE) only until its first message."""
        conn = self._conn
        await conn.ready()
        request = rpc_blobstore_pb2.ReadBlobRequest(digest=self.digest)
        call, self._first = await conn.open_stream(
            lambda: conn.read(request), timeout=conn.options.idle_timeout,
            what=f"a read of blob {self.digest.hex()}", kind="blob", digest=self.digest)
        return call

    async def _fetch(self) -> bytes | None:
        """The next chunk from the server, None at the end of the stream."""
        if self._call is None:
            self._call = await self._open()
            message = self._first
        else:
            message = await self._conn.next_message(self._call, "blob", self.digest)
        if message is grpc.aio.EOF:
            return None
        # As _Connection.read decodes them (decode_chunk).
        assert isinstance(message, Chunk) and isinstance(message.data, bytes)
        return message.data

    async def read(self, n: int = READ_CHUNK) -> bytes:
        if not self._buffer and not self._done:
            while True:
                data = await self._fetch()
                if data is None:
                    self._finish()
                    break
                if data:
                    self._pos += len(data)
                    if self._pos > self.size:
                        self._fail(f"the server sent more than the blob's {self.size} bytes")
                    self._hasher.update(data)
                    self._buffer = data
                    if self._pos == self.size:
                        # Hold nothing back: check now that the end is reached.
                        self._verify_end()
                    break
        if not self._buffer:
            if not self._done:
                self._finish()
            return b""
        buffer, offset = self._buffer, self._offset
        if offset == 0 and n >= len(buffer):
            self._buffer = b""
            return buffer
        # A caller reading less than a message: copy out its part only.
        out = buffer[offset:offset + n]
        offset += len(out)
        if offset >= len(buffer):
            self._buffer, offset = b"", 0
        self._offset = offset
        return out

    def _verify_end(self) -> None:
        if self._hasher.digest() != self.digest:
            self._buffer = b""
            self._fail("the bytes received do not hash to the digest")

    def _finish(self) -> None:
        self._done = True
        if self._pos != self.size:
            self._fail(f"the server sent {self._pos} of the blob's {self.size} bytes")
        if self.size == 0:
            self._verify_end()

    def _fail(self, why: str) -> None:
        self._done = True
        if self._call is not None:
            self._call.cancel()
        raise CorruptionError("blob", self.digest, f"{self._conn.address} ({why})")

    async def pread(self, offset: int, n: int) -> bytes:
        # No range reads in the protocol: stream from the start up to the range.
        reader = _GrpcReader(self._conn, self.digest, self.size)
        parts, pos, end = [], 0, min(offset + n, self.size)
        try:
            while pos < end:
                data = await reader._fetch()
                if data is None:
                    break
                lo, hi = max(offset - pos, 0), min(end - pos, len(data))
                if lo < hi:
                    parts.append(data[lo:hi])
                pos += len(data)
        finally:
            await reader.aclose()
        return b"".join(parts)

    async def verify(self) -> None:
        reader = _GrpcReader(self._conn, self.digest, self.size)
        try:
            while await reader.read():
                pass
        finally:
            await reader.aclose()

    async def aclose(self) -> None:
        if self._call is not None and not self._done:
            self._call.cancel()
        self._done = True


class _GrpcWriter(BlobWriter):
    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._call: grpc.aio.StreamUnaryCall | None = None
        self.closed = False
        self.digest: bytes | None = None

    async def _send(self, data: memoryview) -> None:
        conn = self._conn
        assert self._call is not None  # write() started the call
        try:
            async with asyncio.timeout(conn.options.idle_timeout):
                await self._call.write(Chunk(data))
        except TimeoutError:
            self._call.cancel()
            raise StoreError(conn.address, f"the server took no data for "
                                           f"{conn.options.idle_timeout:g} s during an upload"
                             ) from None
        except grpc.aio.AioRpcError as exc:
            await _raise_final_status(self._call, exc, conn.address)
        except asyncio.InvalidStateError:
            # The call already ended (the server refused it): its status says why.
            await self._raise_status()

    async def _raise_status(self) -> None:
        assert self._call is not None  # the call it sent on
        try:
            await self._call
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc, self._conn.address) from exc
        raise StoreError(self._conn.address, "the server ended the upload early")

    async def _start(self) -> None:
        await self._conn.ready()
        self._call = self._conn.put()

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise ValueError("write to a closed blob writer")
        if self._call is None:
            await self._start()
        # Slices of a view: the codec copies each once, into the message.
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            await self._send(view[start:start + CHUNK])

    async def close(self) -> bytes:
        if self.closed:
            if self.digest is None:
                raise ValueError("the blob writer was aborted")
            return self.digest
        if self._call is None:
            await self._start()
            assert self._call is not None
        conn = self._conn
        try:
            await self._call.done_writing()
            response = await asyncio.wait_for(self._call, conn.options.idle_timeout)
        except TimeoutError:
            self._call.cancel()
            raise StoreError(conn.address, f"the server did not confirm an upload within "
                                           f"{conn.options.idle_timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc, conn.address) from exc
        finally:
            self.closed = True
        digest = response.digest
        validate_digest(digest)
        self.digest = digest
        return digest

    async def abort(self) -> None:
        # A malformed message first, then the cancel: the server fails the
        # upload and aborts its writer, nothing is stored (see grpc_wire.POISON).
        if self._call is not None and not self._call.done():
            try:
                await asyncio.wait_for(self._call.write(POISON), 1.0)
            except (TimeoutError, asyncio.InvalidStateError, grpc.aio.AioRpcError):
                pass
            finally:
                self._call.cancel()
        self.closed = True


class GrpcBlobService(BlobService):
    """BlobService of a remote castore (tvix.castore.v1.BlobService)."""

    def __init__(self, address: str, options: GrpcOptions = DEFAULT_OPTIONS) -> None:
        self.address = address
        self._conn = _Connection(address, options)
        self._sizes: dict[bytes, int] = {}  # from Stat; blobs never change

    async def stat(self, digest: bytes) -> int | None:
        validate_digest(digest)
        size = self._sizes.get(digest)
        if size is not None:
            return size
        conn = self._conn
        request = rpc_blobstore_pb2.StatBlobRequest(digest=digest, send_chunks=True)
        try:
            response = await conn.unary(
                lambda: conn.blobs.Stat(request, timeout=conn.options.call_timeout),
                "blob", digest)
        except NotFoundError:
            return None
        if response.chunks:
            size = sum(c.size for c in response.chunks)
        else:
            size = await self._count(digest)
        if len(self._sizes) > 100_000:
            self._sizes.clear()
        self._sizes[digest] = size
        return size

    async def _count(self, digest: bytes) -> int:
        """The size of a blob a server would not describe in chunks, by reading it."""
        reader = _GrpcReader(self._conn, digest, 1 << 63)
        total = 0
        try:
            while (data := await reader._fetch()) is not None:
                total += len(data)
        finally:
            await reader.aclose()
        return total

    async def open_read(self, digest: bytes) -> BlobReader:
        size = await self.stat(digest)
        if size is None:
            raise NotFoundError("blob", digest)
        return _GrpcReader(self._conn, digest, size)

    def open_write(self) -> BlobWriter:
        return _GrpcWriter(self._conn)

    async def aclose(self) -> None:
        await self._conn.aclose()


class _GrpcPutter(DirectoryPutter):
    """Checks the upload as it is put, sends it whole once it is complete.

    The upload rules are checked here as each directory is put, and the
    whole upload is checked at :meth:`close` before anything is sent (the
    server checks them again). A refused upload thus fails with its rule and
    sends nothing: a refusal never races writes the server has stopped
    reading, and no part of it can be stored. The directories are held until
    then, as the rules need them anyway.
    """

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._call: grpc.aio.StreamUnaryCall | None = None
        self._closure = ClosureValidator()
        self._held: list[Directory] = []

    async def put(self, directory: Directory) -> None:
        self._closure.add(directory)
        self._held.append(directory)

    async def _send(self, directory: Directory) -> None:
        conn = self._conn
        assert self._call is not None
        try:
            await asyncio.wait_for(self._call.write(directory_to_proto(directory)),
                                   conn.options.idle_timeout)
        except TimeoutError:
            self._call.cancel()
            raise StoreError(conn.address, "the server took no directory for "
                                           f"{conn.options.idle_timeout:g} s") from None
        except asyncio.InvalidStateError:
            await self._result()  # raises the server's verdict
        except grpc.aio.AioRpcError as exc:
            await _raise_final_status(self._call, exc, conn.address, "directory",
                                      directory.digest)

    async def _result(self) -> bytes:
        conn = self._conn
        assert self._call is not None  # close() started the call
        try:
            response = await asyncio.wait_for(self._call, conn.options.idle_timeout)
        except TimeoutError:
            self._call.cancel()
            raise StoreError(conn.address, "the server did not confirm a directory upload "
                                           f"within {conn.options.idle_timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc, conn.address, "directory") from exc
        validate_digest(response.root_digest)
        return response.root_digest

    async def close(self) -> bytes:
        self._closure.finalize()  # put-empty, put-disconnected: nothing sent
        await self._conn.ready()
        self._call = self._conn.directories.Put()
        for directory in self._held:
            await self._send(directory)
        self._held = []
        try:
            await self._call.done_writing()
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc, self._conn.address, "directory") from exc
        except asyncio.InvalidStateError:
            pass
        return await self._result()


class GrpcDirectoryService(DirectoryService):
    """DirectoryService of a remote castore (tvix.castore.v1.DirectoryService)."""

    def __init__(self, address: str, options: GrpcOptions = DEFAULT_OPTIONS) -> None:
        self.address = address
        self._conn = _Connection(address, options)

    async def _stream(self, digest: bytes, recursive: bool) -> AsyncIterator[Directory]:
        conn = self._conn
        await conn.ready()
        request = rpc_directory_pb2.GetDirectoryRequest(digest=digest, recursive=recursive)
        call, first = await conn.open_stream(
            lambda: conn.directories.Get(request), timeout=conn.options.call_timeout,
            what=f"a get of directory {digest.hex()}", kind="directory", digest=digest)
        try:
            message = first
            while message is not grpc.aio.EOF:
                assert isinstance(message, castore_pb2.Directory)  # what Get streams
                try:
                    yield directory_from_proto(message)
                except ValidationError as exc:
                    raise CorruptionError("directory", digest,
                                          f"{conn.address} (sent an invalid directory: {exc})"
                                          ) from exc
                if not recursive:
                    return
                message = await conn.next_message(call, "directory", digest)
            if first is grpc.aio.EOF:
                raise NotFoundError("directory", digest)
        finally:
            if not call.done():
                call.cancel()

    async def get(self, digest: bytes) -> Directory | None:
        validate_digest(digest)
        try:
            async for directory in self._stream(digest, recursive=False):
                if directory.digest != digest:
                    raise CorruptionError("directory", digest,
                                          f"{self.address} (sent a directory hashing to "
                                          f"{directory.digest.hex()})")
                return directory
        except NotFoundError:
            return None
        return None

    async def get_recursive(self, digest: bytes) -> AsyncIterator[Directory]:
        """Breadth first, each once; checks that the server keeps to that."""
        validate_digest(digest)
        expected = collections.deque([digest])
        seen = {digest}
        async for directory in self._stream(digest, recursive=True):
            if not expected or directory.digest != expected[0]:
                raise CorruptionError(
                    "directory", digest,
                    f"{self.address} (recursive get sent directory {directory.digest.hex()} "
                    f"out of breadth-first order)")
            expected.popleft()
            for child in directory.directories:
                if child.digest not in seen:
                    seen.add(child.digest)
                    expected.append(child.digest)
            yield directory
        if expected:
            raise NotFoundError("directory", expected[0])

    def put_multiple_start(self) -> DirectoryPutter:
        return _GrpcPutter(self._conn)

    async def aclose(self) -> None:
        await self._conn.aclose()


# --- the backend ----------------------------------------------------------------

def _reader(blob_address: str | None, directory_address: str | None) -> StoreReader:
    from stages.grpc.castore_reader import GrpcSyncReader

    return GrpcSyncReader(blob_address, directory_address)


BACKEND = Backend(
    blobs=lambda url, address: GrpcBlobService(address),
    directories=lambda url, address: GrpcDirectoryService(address),
    reader=_reader,
    check=parse_address)

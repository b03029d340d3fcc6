"""The castore over gRPC, client side: addresses ``grpc+unix``, ``grpc+http``, ``grpc+https``.

Importing this module registers the three schemes in
:mod:`stages.castore.addresses`, so ``open_castore("grpc+unix:///run/c.sock",
...)`` gives a :class:`GrpcBlobService` and a :class:`GrpcDirectoryService`
speaking tvix.castore.v1 to a server (ours, :mod:`stages.castore.grpc_server`,
or tvix's). :class:`GrpcSyncReader` is the blocking reader the FUSE mount
server uses for remote stores.

Addresses::

    grpc+unix:///abs/path      a unix socket (absolute path)
    grpc+http://host:port      plain HTTP/2 over TCP (port required)
    grpc+https://host:port     TLS with the system's roots

Errors are translated from status codes at one boundary
(:func:`translate_error`): NOT_FOUND -> NotFoundError, INVALID_ARGUMENT ->
ValidationError (with the server's rule and message), DATA_LOSS ->
CorruptionError, anything else (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...)
-> StoreError naming the address.

Never a hang (:class:`GrpcOptions`, all configurable):

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

Throughput (issue 6): see :mod:`stages.castore.grpc_server` for the table
(before/after, both processes). On this side, at load 1.2-2.6 on 2 cores:
upload 0.8-1.0 CPU s/GiB (bare gRPC: 0.66), download 1.3-1.9 (bare: 0.90;
the difference is BLAKE3 and one copy out of the message). The client
calls :func:`~stages.castore.grpc_wire.tune_malloc` when it opens a channel.
Hashing in a thread while the next message arrives was measured and
dropped: more CPU, and slower on a busy machine.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import re
import tempfile
import threading
import time
import urllib.parse
from typing import AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import attrs
import blake3
import grpc

from stages.castore import addresses
from stages.castore.errors import (
    CastoreError,
    CorruptionError,
    NotFoundError,
    StoreError,
    ValidationError,
)
from stages.castore.grpc_wire import (
    BLOB_SERVICE,
    CHANNEL_OPTIONS,
    CHUNK,
    POISON,
    Chunk,
    decode_chunk,
    encode_chunk,
    tune_malloc,
)
from stages.castore.nodes import Directory, directory_from_proto, directory_to_proto, validate_digest
from stages.castore.services import (
    READ_CHUNK,
    BlobReader,
    BlobService,
    BlobWriter,
    DirectoryPutter,
    DirectoryService,
)
from stages.proto import (
    rpc_blobstore_pb2,
    rpc_blobstore_pb2_grpc,
    rpc_directory_pb2,
    rpc_directory_pb2_grpc,
)

__all__ = [
    "GrpcBlobService",
    "GrpcDirectoryService",
    "GrpcOptions",
    "GrpcSyncReader",
    "GrpcTarget",
    "channel_for",
    "parse_address",
    "translate_error",
]

SCHEMES = ("grpc+unix", "grpc+http", "grpc+https")
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
_HEX = re.compile(r"\b([0-9a-f]{64})\b")
T = TypeVar("T")


@attrs.frozen(kw_only=True)
class GrpcOptions:
    """Deadlines and retries of a castore gRPC client (seconds)."""

    connect_timeout: float = 5.0   # first readiness of the channel
    call_timeout: float = 30.0     # deadline of one unary-shaped call
    idle_timeout: float = 60.0     # longest wait for the next message of a stream
    retries: int = 3               # extra attempts of idempotent calls on UNAVAILABLE
    backoff: float = 0.1           # first retry delay; doubles, with jitter


DEFAULT_OPTIONS = GrpcOptions()


@attrs.frozen(kw_only=True)
class GrpcTarget:
    """A parsed castore gRPC address."""

    address: str          # as given, for messages
    target: str           # what grpc dials: unix:///abs/path or host:port
    tls: bool


def parse_address(address: str) -> GrpcTarget:
    """Check a ``grpc+...`` address; StoreError saying what is wrong."""
    url = urllib.parse.urlsplit(address)
    if url.scheme not in SCHEMES:
        raise StoreError(address, f"not a gRPC castore address; expected one of "
                                  f"{', '.join(s + '://' for s in SCHEMES)}")
    if url.query or url.fragment:
        raise StoreError(address, "a gRPC castore address takes no query or fragment")
    if url.scheme == "grpc+unix":
        path = urllib.parse.unquote(url.path)
        if url.netloc or not path.startswith("/"):
            raise StoreError(address, "a unix socket address is grpc+unix:///absolute/path "
                                      "(three slashes, absolute path)")
        if path.endswith("/"):
            raise StoreError(address, "a unix socket address names a socket, not a directory")
        return GrpcTarget(address=address, target="unix://" + path, tls=False)
    if url.path not in ("", "/"):
        raise StoreError(address, f"a {url.scheme} address is {url.scheme}://host:port "
                                  f"with no path")
    try:
        port = url.port
    except ValueError as exc:
        raise StoreError(address, f"bad port: {exc}") from None
    host = url.hostname
    if not host:
        raise StoreError(address, f"missing host; expected {url.scheme}://host:port")
    if port is None:
        raise StoreError(address, f"missing port; expected {url.scheme}://host:port")
    if url.username or url.password:
        raise StoreError(address, "credentials in the address are not supported")
    host_part = f"[{host}]" if ":" in host else host
    return GrpcTarget(address=address, target=f"{host_part}:{port}",
                      tls=url.scheme == "grpc+https")


def channel_for(address: str) -> grpc.aio.Channel:
    """An asyncio channel to a ``grpc+...`` address (StoreError if malformed)."""
    return _aio_channel(parse_address(address))


def _aio_channel(target: GrpcTarget) -> grpc.aio.Channel:
    if target.tls:
        return grpc.aio.secure_channel(target.target, grpc.ssl_channel_credentials(),
                                       options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(target.target, options=CHANNEL_OPTIONS)


def _sync_channel(target: GrpcTarget) -> grpc.Channel:
    if target.tls:
        return grpc.secure_channel(target.target, grpc.ssl_channel_credentials(),
                                   options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(target.target, options=CHANNEL_OPTIONS)


# --- errors: the one boundary --------------------------------------------------

def translate_error(exc: grpc.RpcError, address: str, kind: str = "blob",
                    digest: bytes | None = None) -> CastoreError:
    """The castore error a failed call means (``raise translate_error(...) from exc``)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""

    def named_digest() -> bytes:
        found = _HEX.search(details)
        if found:
            return bytes.fromhex(found.group(1))
        return digest if digest is not None else b""

    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(kind, named_digest())
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        rule, sep, rest = details.partition(": ")
        if not sep or " " in rule:
            rule, rest = "remote", details
        return ValidationError(rule, rest)
    if code == grpc.StatusCode.DATA_LOSS:
        return CorruptionError(kind, named_digest(), f"{address} ({details})")
    if code == grpc.StatusCode.UNAVAILABLE:
        return StoreError(address, f"server unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return StoreError(address, f"no answer before the deadline: {details}")
    if code == grpc.StatusCode.CANCELLED:
        return StoreError(address, f"call cancelled: {details}")
    return StoreError(address, f"{code.name}: {details}")


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
    except asyncio.TimeoutError:
        code = details = None
    if code is not None and code != grpc.StatusCode.OK:
        final = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                     details=details)
        raise translate_error(final, address, kind, digest) from exc
    raise translate_error(exc, address, kind, digest) from exc


def _backoff(options: GrpcOptions, attempt: int) -> float:
    return options.backoff * (2 ** attempt) * (0.5 + random.random())


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
            self._channel = _aio_channel(self.target)
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
        except asyncio.TimeoutError:
            raise StoreError(self.address, f"cannot connect within "
                                           f"{self.options.connect_timeout:g} s "
                                           f"(is the server running at {self.target.target}?)"
                             ) from None
        self._ready = True

    async def unary(self, call: Callable[[], "asyncio.Future[T]"], kind: str,
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
                if exc.code() in _RETRYABLE and tries < self.options.retries:
                    await asyncio.sleep(_backoff(self.options, tries))
                    tries += 1
                    continue
                raise translate_error(exc, self.address, kind, digest) from exc

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
            except asyncio.TimeoutError:
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
        except asyncio.TimeoutError:
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
        try:
            async with asyncio.timeout(conn.options.idle_timeout):
                await self._call.write(Chunk(data))
        except asyncio.TimeoutError:
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
        conn = self._conn
        try:
            await self._call.done_writing()
            response = await asyncio.wait_for(self._call, conn.options.idle_timeout)
        except asyncio.TimeoutError:
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
            except (asyncio.TimeoutError, asyncio.InvalidStateError, grpc.aio.AioRpcError):
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
    """Streams each directory as it is put; the server checks the rules."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._call: grpc.aio.StreamUnaryCall | None = None

    async def put(self, directory: Directory) -> None:
        conn = self._conn
        if self._call is None:
            await conn.ready()
            self._call = conn.directories.Put()
        try:
            await asyncio.wait_for(self._call.write(directory_to_proto(directory)),
                                   conn.options.idle_timeout)
        except asyncio.TimeoutError:
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
        try:
            response = await asyncio.wait_for(self._call, conn.options.idle_timeout)
        except asyncio.TimeoutError:
            self._call.cancel()
            raise StoreError(conn.address, "the server did not confirm a directory upload "
                                           f"within {conn.options.idle_timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc, conn.address, "directory") from exc
        validate_digest(response.root_digest)
        return response.root_digest

    async def close(self) -> bytes:
        if self._call is None:
            raise ValidationError("put-empty", "an upload must contain at least the root")
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


# --- the blocking reader (FUSE mount server) -------------------------------------

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
        channel = _sync_channel(target)
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
        attempt = 0
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() in _RETRYABLE and attempt < self.options.retries:
                    time.sleep(_backoff(self.options, attempt))
                    attempt += 1
                    continue
                raise translate_error(exc, address, kind, digest) from exc

    # --- the StoreReader methods ----------------------------------------------

    def blob_size(self, digest: bytes) -> int | None:
        validate_digest(digest)
        size = self._sizes.get(digest)
        if size is not None:
            return size
        request = rpc_blobstore_pb2.StatBlobRequest(digest=digest, send_chunks=True)
        try:
            response = self._unary(
                lambda: self.blobs.Stat(request, timeout=self.options.call_timeout,
                                        wait_for_ready=True),
                self._blob_target.address, "blob", digest)
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
        address = self._dir_target.address
        request = rpc_directory_pb2.GetDirectoryRequest(digest=digest, recursive=False)
        try:
            messages = self._unary(
                lambda: list(self.directories.Get(request, timeout=self.options.call_timeout,
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


# --- registration ---------------------------------------------------------------

def _blob_factory(url: urllib.parse.SplitResult, address: str) -> BlobService:
    return GrpcBlobService(address)


def _directory_factory(url: urllib.parse.SplitResult, address: str) -> DirectoryService:
    return GrpcDirectoryService(address)


for _scheme in SCHEMES:
    addresses.BLOB_BACKENDS[_scheme] = _blob_factory
    addresses.DIRECTORY_BACKENDS[_scheme] = _directory_factory

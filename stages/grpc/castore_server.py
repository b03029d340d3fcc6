"""The castore over gRPC, server side: tvix.castore.v1 BlobService and DirectoryService.

:class:`BlobServicer` and :class:`DirectoryServicer` are ``grpc.aio`` servicers
over any :class:`BlobService` / :class:`DirectoryService` (memory, local, even
another gRPC client); :func:`add_castore_servicers` puts both on a server.
:func:`start_castore_server` starts a server on listen addresses (what the
tests, the benchmark and ``python -m stages.grpc.castore_server`` use).

Status codes (PROTOCOL.md), decided in one place (:func:`status_for`):

==========================================  =========================
a digest that is not 32 bytes                INVALID_ARGUMENT
a broken upload or node rule                 INVALID_ARGUMENT, the
                                             ValidationError's message
                                             (``rule: detail``)
an unknown blob or directory                 NOT_FOUND, naming the digest
stored bytes that do not hash to the digest  DATA_LOSS, naming the digest
anything else                                INTERNAL
==========================================  =========================

Streams:

- Read sends the blob in :data:`CHUNK`-byte messages as the store's
  verifying reader yields them; a corrupt blob ends the stream with
  DATA_LOSS instead of its last chunk, so a client never gets all the bytes
  of a blob that does not hash right.
- Put writes each message through one BlobWriter as it arrives (bounded
  memory: gRPC's flow control holds the sender); the store computes the
  digest. A client that disconnects or cancels, or a server that dies,
  leaves no blob: the writer is aborted (or, on SIGKILL, never committed).
- Directory Put feeds each Directory to the service's putter in order, so
  the upload rules (leaves to root, sizes, connectivity) are the ones of
  :class:`ClosureValidator`; the reply is the root's digest.
- Directory Get with ``recursive`` is :meth:`DirectoryService.get_recursive`:
  breadth first from the root, each directory once.

Caveats:

- Stat sends no chunk list unless ``send_chunks`` is set; then it describes
  the blob as one chunk (its own digest and size). That is how a client
  learns a blob's size (the protocol has no size field).
- ``send_bao`` is ignored (no bao outboard is kept).
- Messages are at most :data:`MAX_MESSAGE` bytes on both ends; blobs are
  sent in :data:`CHUNK`-byte messages, well under gRPC's default 4 MiB, so
  other clients with default limits can read them.

Throughput (one 512 MiB blob over a unix socket, against bare grpc.aio and
the local store in process): README, "Numbers"; rerun with
``python -m bench.bench_grpc_castore --size-mib 512 --runs 3``.

Where the time went and what changed (perf and py-spy of both processes):

- A third of the server's CPU was the kernel zeroing fresh pages: glibc
  gave each freed 1 MiB message buffer back to the kernel, and the next one
  faulted in again. :func:`~stages.grpc.wire.tune_malloc` keeps them
  (server down 3.2-4.5 -> 1.3-2.1 CPU s/GiB).
- Read sends one chunk read (and encoded) ahead, so the store's read of the
  next chunk overlaps gRPC's send; the local store's writer writes behind
  the receiving loop in bounded batches (one thread hop per batch).
- What is left is inherent to Python gRPC and to verifying: gRPC's receive
  copies every message twice (slices -> bytes -> joined bytes) and its send
  once more; BLAKE3 on both sides (server: Put must be verified, Read is
  verified in the same pass as the read; client: Read must be verified);
  the page-cache copy of the pack write. Server upload to local: ~18%
  hashing, 14% page-cache copy, 12% gRPC copies, 6% socket copy, 10%
  interpreter.
- Uploads, second round (same bench and per-run drivers, load 1.1-4):
  a repeated upload (the store has the blob) went from 280-620 MB/s at
  2.1-3.2 server CPU s/GiB to 550-810 MB/s at 1.6-2.1 (load 1-2; 240-390
  at load 4); cold uploads 140-280 -> 180-290 MB/s; the bench's median of
  3 runs (its run 2) stayed at 300-345 MB/s (254-344 before).
  What bounds the rest on this VM: (1) the disk: a cold blob is fdatasync'ed
  before it is visible, and ``dd conv=fdatasync`` of 512 MiB does 250-510
  MB/s here; the local store now starts writeback every 16 MiB so the disk
  works during the upload (the final fdatasync of 512 MiB: 1.0 -> 0.5 s).
  (2) Fresh memory is expensive: the VM's balloon reports freed pages to
  the host, so a page the kernel hands out again costs a host fault (1.3 s
  per GiB touched, measured on anonymous memory); copying into new page
  cache pages for the pack is 2-3 times slower than overwriting kept ones.
  A cold upload needs new pages for its blob, and so does the first upload
  of a duplicate (the bench's run 2, its median); later duplicates now
  reuse the pages a dropped duplicate left (LocalStore ``drop``). A
  memory:// server pays it on every upload: it holds the received
  messages until the digest is known (no longer copied twice more).
  (3) What each byte costs on the server: BLAKE3 ~0.35 CPU
  s/GiB, the page-cache copy 0.2-1.0, gRPC's two receive copies ~0.25 and
  the socket copy ~0.15; the hash now runs on the receiving side while the
  store's thread writes the previous batch, instead of after it.
- Measured and not taken: messages of 2-4 MiB (no gain above the noise, and
  callers reading 1 MiB would copy out halves); gRPC channel options
  (``grpc.http2.max_frame_size``, ``lookahead_bytes``, ``bdp_probe``, TCP
  read chunk sizes: within noise on the bare transport); hashing received
  chunks in a thread on the client (more CPU and slower on a busy machine:
  there is no idle core to overlap into).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import grpc

from stages.castore.addresses import Castore, open_castore
from stages.castore.errors import CastoreError, CorruptionError, NotFoundError, ValidationError
from stages.castore.nodes import directory_from_proto, directory_to_proto, validate_digest
from stages.castore.services import BlobReader, BlobService, DirectoryService
from stages.grpc.wire import (
    BLOB_SERVICE,
    CHUNK,
    MAX_MESSAGE,
    SERVER_OPTIONS,
    Chunk,
    decode_chunk_view,
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

__all__ = [
    "CHUNK",
    "MAX_MESSAGE",
    "BlobServicer",
    "DirectoryServicer",
    "add_castore_servicers",
    "start_castore_server",
    "status_for",
]

log = logging.getLogger("ocibuild.castore.grpc")

def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a castore error becomes on the wire."""
    if isinstance(exc, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, CorruptionError):
        return grpc.StatusCode.DATA_LOSS, str(exc)
    if isinstance(exc, CastoreError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("castore RPC failed: %s", message, exc_info=exc)
    await context.abort(code, message)


async def _next_message(reader: BlobReader) -> bytes | None:
    """The reader's next :data:`CHUNK` as an encoded BlobChunk; None at the end."""
    data = await reader.read(CHUNK)
    return encode_chunk(Chunk(data)) if data else None


async def _unless_cancelled(context: grpc.aio.ServicerContext) -> None:
    """Raise CancelledError if the client cancelled its upload stream.

    A client that cancels can end the request iteration like a half-close
    would; only a real end of upload may commit (blobs and directories alike).
    """
    await asyncio.sleep(0)
    if context.cancelled():
        raise asyncio.CancelledError("the client cancelled the upload")


class BlobServicer(rpc_blobstore_pb2_grpc.BlobServiceServicer):
    """tvix.castore.v1.BlobService over any :class:`BlobService`."""

    def __init__(self, blobs: BlobService) -> None:
        self.blobs = blobs

    async def Stat(self, request: rpc_blobstore_pb2.StatBlobRequest,
                   context: grpc.aio.ServicerContext) -> rpc_blobstore_pb2.StatBlobResponse:
        try:
            validate_digest(request.digest)
            size = await self.blobs.stat(request.digest)
            if size is None:
                raise NotFoundError("blob", request.digest)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            await _abort(context, exc)
        response = rpc_blobstore_pb2.StatBlobResponse()
        if request.send_chunks:
            response.chunks.add(digest=request.digest, size=size)
        return response

    # Streams by context.write, not by yielding: the generated stubs type only the latter.
    async def Read(  # type: ignore[override]  # streams with context.write
            self, request: rpc_blobstore_pb2.ReadBlobRequest,
            context: grpc.aio.ServicerContext) -> None:
        try:
            validate_digest(request.digest)
            reader = await self.blobs.open_read(request.digest)
        except Exception as exc:  # noqa: BLE001 - _abort gives every error its status
            await _abort(context, exc)
        async with reader:
            # One message read (and encoded) ahead: the store's read of the
            # next chunk (a thread hop, pread and hash for the local store)
            # overlaps gRPC's send of this one.
            ahead = asyncio.ensure_future(_next_message(reader))
            try:
                while (message := await ahead) is not None:
                    ahead = asyncio.ensure_future(_next_message(reader))
                    # Writing here instead of yielding skips the generator
                    # machinery per message; await blocks on flow control.
                    await context.write(message)
            except Exception as exc:  # noqa: BLE001 - _abort gives every error its status
                await _abort(context, exc)
            finally:
                if not ahead.done():
                    ahead.cancel()
                await asyncio.gather(ahead, return_exceptions=True)

    async def Put(self, request_iterator: AsyncIterator[rpc_blobstore_pb2.BlobChunk],
                  context: grpc.aio.ServicerContext) -> rpc_blobstore_pb2.PutBlobResponse:
        writer = self.blobs.open_write()
        try:
            # __aexit__ aborts the writer unless close() ran: on errors, and on
            # CancelledError when the client goes away mid-upload.
            async with writer:
                async for chunk in request_iterator:
                    if chunk.data:
                        await writer.write(chunk.data)
                await _unless_cancelled(context)
                digest = await writer.close()
        except Exception as exc:  # noqa: BLE001 - _abort gives every error its status
            await _abort(context, exc)
        return rpc_blobstore_pb2.PutBlobResponse(digest=digest)


class DirectoryServicer(rpc_directory_pb2_grpc.DirectoryServiceServicer):
    """tvix.castore.v1.DirectoryService over any :class:`DirectoryService`."""

    def __init__(self, directories: DirectoryService) -> None:
        self.directories = directories

    # Streams by context.write, not by yielding: the generated stubs type only the latter.
    async def Get(  # type: ignore[override]  # streams with context.write
            self, request: rpc_directory_pb2.GetDirectoryRequest,
            context: grpc.aio.ServicerContext) -> None:
        try:
            if request.WhichOneof("by_what") != "digest":
                raise ValidationError("get-by-what", "GetDirectoryRequest must carry a digest")
            digest = request.digest
            validate_digest(digest)
            if not request.recursive:
                directory = await self.directories.get(digest)
                if directory is None:
                    raise NotFoundError("directory", digest)
                await context.write(directory_to_proto(directory))
                return
            async for directory in self.directories.get_recursive(digest):
                await context.write(directory_to_proto(directory))
        except Exception as exc:  # noqa: BLE001 - _abort gives every error its status
            await _abort(context, exc)

    async def Put(self, request_iterator: AsyncIterator[castore_pb2.Directory],
                  context: grpc.aio.ServicerContext) -> rpc_directory_pb2.PutDirectoryResponse:
        try:
            putter = self.directories.put_multiple_start()
            async for message in request_iterator:
                await putter.put(directory_from_proto(message))
            await _unless_cancelled(context)
            root = await putter.close()
        except Exception as exc:  # noqa: BLE001 - _abort gives every error its status
            await _abort(context, exc)
        return rpc_directory_pb2.PutDirectoryResponse(root_digest=root)


def _blob_handler(servicer: BlobServicer) -> grpc.GenericRpcHandler:
    """BlobService with the fast BlobChunk codec (see grpc_wire); Stat as generated."""
    stat = rpc_blobstore_pb2
    return grpc.method_handlers_generic_handler(BLOB_SERVICE, {
        "Stat": grpc.unary_unary_rpc_method_handler(
            servicer.Stat, request_deserializer=stat.StatBlobRequest.FromString,
            response_serializer=stat.StatBlobResponse.SerializeToString),
        "Read": grpc.unary_stream_rpc_method_handler(
            servicer.Read, request_deserializer=stat.ReadBlobRequest.FromString,
            response_serializer=encode_chunk),
        "Put": grpc.stream_unary_rpc_method_handler(
            servicer.Put, request_deserializer=decode_chunk_view,
            response_serializer=stat.PutBlobResponse.SerializeToString),
    })


def add_castore_servicers(server: grpc.aio.Server, castore: Castore) -> None:
    """Serve ``castore``'s blobs and directories on ``server``."""
    server.add_generic_rpc_handlers((_blob_handler(BlobServicer(castore.blobs)),))
    rpc_directory_pb2_grpc.add_DirectoryServiceServicer_to_server(
        DirectoryServicer(castore.directories), server)


async def start_castore_server(castore: Castore, listen: Sequence[str]
                               ) -> tuple[grpc.aio.Server, list[int]]:
    """A started server for ``castore`` on each gRPC listen address.

    Addresses are as grpc spells them: ``unix:///abs/path`` or ``host:port``
    (port 0 picks one). Returns the server and the bound port of each address
    (for unix sockets grpc reports 1). Stop it with ``await server.stop(grace)``.
    """
    tune_malloc()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_castore_servicers(server, castore)
    ports = []
    for address in listen:
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise CastoreError(f"cannot listen on {address}: {exc}") from exc
        if port == 0:
            raise CastoreError(f"cannot listen on {address}")
        ports.append(port)
    await server.start()
    return server, ports


# --- python -m stages.grpc.castore_server: a bare castore server --------------

async def _serve(args: argparse.Namespace) -> None:
    castore = open_castore(args.blob_service_addr, args.directory_service_addr)
    server, ports = await start_castore_server(castore, args.listen)
    print(" ".join(str(p) for p in ports), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=2.0)
        await castore.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a castore until SIGINT/SIGTERM; print the bound ports on one line.

    For tests and benchmarks; ``ocibuild serve`` is the real server.
    """
    parser = argparse.ArgumentParser(prog="python -m stages.grpc.castore_server")
    parser.add_argument("--listen", action="append", required=True,
                        help="unix:///abs/path or host:port (repeatable)")
    parser.add_argument("--blob-service-addr", default=None)
    parser.add_argument("--directory-service-addr", default=None)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except CastoreError as exc:
        print(f"grpc_server: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

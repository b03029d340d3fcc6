"""The castore over gRPC: conformance of every RPC, the client, copy_node.

Real grpc.aio servers in this process, on a unix socket in a temp dir and on
127.0.0.1:0, over memory:// and local stores. Raw calls through the
generated stubs check the wire contract of PROTOCOL.md (status codes,
ordering, chunking); the client is checked for its translation of those
into castore errors and for never hanging. The store contract of
test_local_store.py runs again against the gRPC backend (``grpc`` ids).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import blake3
import grpc
import pytest

from stages.castore.addresses import Castore, open_castore
from stages.castore.copy import copy_node
from stages.castore.errors import CorruptionError, NotFoundError, StoreError, ValidationError
from stages.castore.local import LocalStore
from stages.castore.memory import MemoryBlobService
from stages.castore.nar import nar_bytes
from stages.castore.nodes import (
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
    directory_to_proto,
)
from stages.castore.services import BlobReader
from stages.grpc.castore_client import GrpcBlobService, GrpcDirectoryService
from stages.grpc.castore_server import CHUNK, start_castore_server
from stages.grpc.channels import GrpcOptions, channel_for, parse_address
from stages.proto import (
    castore_pb2,
    rpc_blobstore_pb2,
    rpc_blobstore_pb2_grpc,
    rpc_directory_pb2,
    rpc_directory_pb2_grpc,
)


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 31 + seed) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


class Served:
    """A server over a backing castore, its addresses, and clients."""

    def __init__(self, backing: Castore, server: grpc.aio.Server, unix: str, tcp: str) -> None:
        self.backing = backing
        self.server = server
        self.unix = unix
        self.tcp = tcp
        self.channel = channel_for(unix)
        self.blobs = rpc_blobstore_pb2_grpc.BlobServiceStub(self.channel)
        self.dirs = rpc_directory_pb2_grpc.DirectoryServiceStub(self.channel)

    def client(self, address: str | None = None, **options: float) -> Castore:
        address = address or self.unix
        opts = GrpcOptions(**options)
        return Castore(GrpcBlobService(address, opts), GrpcDirectoryService(address, opts))


@pytest.fixture
def sockdir():
    # Short: unix socket paths are limited to 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="gcs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _serve(backing: Castore, sockdir: Path):
    server, ports = await start_castore_server(
        backing, [f"unix://{sockdir}/castore.sock", "127.0.0.1:0"])
    served = Served(backing, server, f"grpc+unix://{sockdir}/castore.sock",
                    f"grpc+http://127.0.0.1:{ports[1]}")
    try:
        yield served
    finally:
        await served.channel.close()
        await server.stop(None)


@pytest.fixture(params=["memory", "local"])
async def served(request: pytest.FixtureRequest, sockdir: Path, tmp_path: Path):
    if request.param == "memory":
        backing = open_castore("memory://", "memory://")
    else:
        backing = open_castore(f"local://{tmp_path}/store", f"local://{tmp_path}/store")
    async for s in _serve(backing, sockdir):
        yield s
    if request.param == "local":
        backing.blobs.store.close()


@pytest.fixture
async def served_local(sockdir: Path, tmp_path: Path):
    backing = open_castore(f"local://{tmp_path}/store", f"local://{tmp_path}/store")
    async for s in _serve(backing, sockdir):
        yield s
    backing.blobs.store.close()


@pytest.fixture(params=["grpc+unix", "grpc+http"])
async def castore(request: pytest.FixtureRequest, sockdir: Path):
    """The store contract's fixture: a gRPC client of a memory store."""
    async for s in _serve(open_castore("memory://", "memory://"), sockdir):
        client = s.client(s.unix if request.param == "grpc+unix" else s.tcp)
        yield client
        await client.aclose()


async def _put_raw(served: Served, pieces: list[bytes]) -> bytes:
    async def messages():
        for piece in pieces:
            yield rpc_blobstore_pb2.BlobChunk(data=piece)
    response = await served.blobs.Put(messages())
    return response.digest


async def _read_raw(served: Served, digest: bytes) -> list[bytes]:
    call = served.blobs.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=digest))
    return [m.data async for m in call]


# --- BlobService on the wire ------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5],
                         ids=["empty", "1B", "chunk-1", "chunk", "chunk+1", "3chunks+5"])
async def test_blob_read_chunks(served: Served, size: int) -> None:
    data = pattern(size, seed=size % 97)
    digest = await _put_raw(served, [data[i:i + 65536] for i in range(0, size, 65536)])
    assert digest == b3(data)
    parts = await _read_raw(served, digest)
    assert b"".join(parts) == data
    assert all(0 < len(p) <= CHUNK for p in parts)
    assert len(parts) == -(-size // CHUNK)  # ceil: full chunks, no empty messages


async def test_blob_put_odd_chunking_and_empty_messages(served: Served) -> None:
    data = pattern(CHUNK * 2 + 3, seed=1)
    pieces = [b"", data[:1], b"", data[1:CHUNK * 2], data[CHUNK * 2:], b""]
    assert await _put_raw(served, pieces) == b3(data)
    assert await _put_raw(served, []) == b3(b"")
    assert await served.backing.blobs.get(b3(data)) == data


async def test_blob_stat(served: Served) -> None:
    data = pattern(1000)
    digest = await served.backing.blobs.put(data)
    bare = await served.blobs.Stat(rpc_blobstore_pb2.StatBlobRequest(digest=digest))
    assert list(bare.chunks) == []  # no chunk list unless asked
    full = await served.blobs.Stat(
        rpc_blobstore_pb2.StatBlobRequest(digest=digest, send_chunks=True))
    assert [(c.digest, c.size) for c in full.chunks] == [(digest, 1000)]


@pytest.mark.parametrize("rpc", ["stat", "read"])
async def test_blob_errors(served: Served, rpc: str) -> None:
    missing = b3(b"never stored")
    for digest, code in ((missing, grpc.StatusCode.NOT_FOUND),
                         (b"\x01" * 31, grpc.StatusCode.INVALID_ARGUMENT),
                         (b"", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if rpc == "stat":
                await served.blobs.Stat(rpc_blobstore_pb2.StatBlobRequest(digest=digest))
            else:
                await _read_raw(served, digest)
        assert info.value.code() == code
        if code == grpc.StatusCode.NOT_FOUND:
            assert missing.hex() in info.value.details()
        else:
            assert "digest-length" in info.value.details()


async def test_aborted_upload_leaves_no_blob(served: Served) -> None:
    data = pattern(3 * CHUNK, seed=9)
    client = served.client()
    for _ in range(5):  # it must hold every time, not by luck of timing
        writer = client.blobs.open_write()
        await writer.write(data[:2 * CHUNK])
        await writer.abort()
    await asyncio.sleep(0.1)
    for digest in (b3(data[:CHUNK]), b3(data[:2 * CHUNK])):
        assert await served.backing.blobs.stat(digest) is None
    # the connection is fine afterwards
    assert await client.blobs.put(data) == b3(data)
    await client.aclose()


async def test_malformed_chunk_fails_the_upload(served: Served) -> None:
    call = served.channel.stream_unary("/tvix.castore.v1.BlobService/Put")()
    await call.write(rpc_blobstore_pb2.BlobChunk(data=b"abc").SerializeToString())
    await call.write(b"\x0a\x05")  # claims 5 bytes, has none
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    assert await served.backing.blobs.stat(b3(b"abc")) is None


async def test_corrupt_blob_on_the_server(served_local: Served) -> None:
    store: LocalStore = served_local.backing.blobs.store
    data = pattern(3 * CHUNK + 17, seed=4)
    digest = store.put_blob(data)
    pack, offset, _ = store.locate(digest)
    with open(store.pack_path(pack), "r+b") as f:
        f.seek(offset + len(data) - 5)
        f.write(b"XXXXX")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _read_raw(served_local, digest)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert digest.hex() in info.value.details()
    # the stream never carried the whole (bad) blob
    received = []
    call = served_local.blobs.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=digest))
    with pytest.raises(grpc.aio.AioRpcError):
        async for message in call:
            received.append(message.data)
    assert sum(map(len, received)) < len(data)
    client = served_local.client()
    with pytest.raises(CorruptionError, match=digest.hex()):
        await client.blobs.get(digest)
    await client.aclose()


class _LyingReader(BlobReader):
    """Sends other bytes than the blob's (a server that does not verify)."""

    def __init__(self, digest: bytes, data: bytes) -> None:
        self.digest, self.size, self._data = digest, len(data), data

    async def read(self, n: int = CHUNK) -> bytes:
        out, self._data = self._data[:n], self._data[n:]
        return out

    async def pread(self, offset: int, n: int) -> bytes:
        raise NotImplementedError

    async def verify(self) -> None:
        pass


class _LyingBlobs(MemoryBlobService):
    async def open_read(self, digest: bytes) -> BlobReader:
        data = self.blobs[digest]
        return _LyingReader(digest, data[:-1] + bytes([data[-1] ^ 1]))


async def test_client_detects_bad_bytes(sockdir: Path) -> None:
    backing = Castore(_LyingBlobs(), open_castore("memory://", "memory://").directories)
    data = pattern(2 * CHUNK + 1, seed=2)
    digest = await backing.blobs.put(data)
    async for s in _serve(backing, sockdir):
        client = s.client()
        reader = await client.blobs.open_read(digest)
        got = 0
        with pytest.raises(CorruptionError, match=digest.hex()):
            while chunk := await reader.read():
                got += len(chunk)
        assert got < len(data)  # the last chunk was never handed out
        await reader.aclose()
        await client.aclose()


# --- DirectoryService on the wire ---------------------------------------------------

def _file(name: bytes, content: bytes) -> FileNode:
    return FileNode(name=name, digest=b3(content), size=len(content))


def _diamond() -> dict[str, Directory]:
    """root -> a, b; a -> shared; b -> shared, c; c -> empty."""
    empty = Directory()
    shared = Directory(files=[_file(b"s", b"shared")])
    c = Directory(directories=[empty.as_node(b"e")])
    a = Directory(directories=[shared.as_node(b"s")])
    b = Directory(directories=[c.as_node(b"c"), shared.as_node(b"s")],
                  symlinks=[SymlinkNode(name=b"z", target=b"../a")])
    root = Directory(directories=[a.as_node(b"a"), b.as_node(b"b")])
    return {"empty": empty, "shared": shared, "c": c, "a": a, "b": b, "root": root}


async def _put_dirs(served: Served, dirs: list[Directory]) -> bytes:
    async def messages():
        for d in dirs:
            yield directory_to_proto(d)
    return (await served.dirs.Put(messages())).root_digest


async def test_directory_put_and_recursive_get_bfs(served: Served) -> None:
    t = _diamond()
    order = [t["empty"], t["shared"], t["c"], t["a"], t["b"], t["root"]]
    assert await _put_dirs(served, order) == t["root"].digest
    call = served.dirs.Get(rpc_directory_pb2.GetDirectoryRequest(
        digest=t["root"].digest, recursive=True))
    got = [m.SerializeToString(deterministic=True) async for m in call]
    # Breadth first by hand: root; a, b (root's order); shared (a's), c (b's;
    # shared already sent); empty (c's).
    expected = [t[k].canonical_bytes for k in ("root", "a", "b", "shared", "c", "empty")]
    assert got == expected
    single = served.dirs.Get(rpc_directory_pb2.GetDirectoryRequest(digest=t["b"].digest))
    assert [m.SerializeToString(deterministic=True) async for m in single] == [
        t["b"].canonical_bytes]
    client = served.client()
    assert [d async for d in client.directories.get_recursive(t["c"].digest)] == [
        t["c"], t["empty"]]
    await client.aclose()


@pytest.mark.parametrize("case", ["root-first", "size", "disconnected", "empty", "bad-name"])
async def test_directory_put_rules(served: Served, case: str) -> None:
    t = _diamond()
    rule = {"root-first": "put-order", "size": "directory-size",
            "disconnected": "put-disconnected", "empty": "put-empty",
            "bad-name": "names-sorted"}[case]
    if case == "root-first":
        upload = [t["a"], t["shared"]]
    elif case == "size":
        upload = [t["shared"], Directory(directories=[
            DirectoryNode(name=b"s", digest=t["shared"].digest, size=5)])]
    elif case == "disconnected":
        upload = [t["empty"], t["shared"], t["a"]]
    elif case == "empty":
        upload = []
    if case == "bad-name":
        message = castore_pb2.Directory(files=[
            castore_pb2.FileNode(name=b"b", digest=b3(b""), size=0),
            castore_pb2.FileNode(name=b"a", digest=b3(b""), size=0)])

        async def messages():
            yield message
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await served.dirs.Put(messages())
    else:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _put_dirs(served, upload)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(rule + ":")
    # the client raises the same rule as a ValidationError
    if case != "bad-name":
        client = served.client()
        with pytest.raises(ValidationError, match=rule) as verr:
            await client.directories.put_tree(upload)
        assert verr.value.rule == rule
        await client.aclose()
    for d in t.values():
        assert await served.backing.directories.get(d.digest) is None


async def test_directory_get_errors(served: Served) -> None:
    missing = b3(b"no directory")
    for recursive in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in served.dirs.Get(rpc_directory_pb2.GetDirectoryRequest(
                    digest=missing, recursive=recursive)):
                pass
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert missing.hex() in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in served.dirs.Get(rpc_directory_pb2.GetDirectoryRequest(
                    digest=b"\0" * 20, recursive=recursive)):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in served.dirs.Get(rpc_directory_pb2.GetDirectoryRequest()):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- the client: addresses, deadlines -------------------------------------------------

@pytest.mark.parametrize("address,fragment", [
    ("grpc+unix://relative/sock", "absolute"),
    ("grpc+unix:///", "socket, not a directory"),
    ("grpc+http://127.0.0.1", "missing port"),
    ("grpc+http://:80", "missing host"),
    ("grpc+http://host:99999", "port"),
    ("grpc+https://host:443/path", "no path"),
    ("grpc+http://host:1?x=1", "no query"),
    ("grpc+ftp://host:1", "not a gRPC castore address"),
], ids=["relative-unix", "unix-dir", "no-port", "no-host", "bad-port", "path", "query",
        "scheme"])
def test_bad_addresses(address: str, fragment: str) -> None:
    with pytest.raises(StoreError, match=fragment) as info:
        parse_address(address)
    assert address in str(info.value)


def test_addresses_parse() -> None:
    assert parse_address("grpc+unix:///run/c.sock").target == "unix:///run/c.sock"
    assert parse_address("grpc+http://[::1]:5000").target == "[::1]:5000"
    assert parse_address("grpc+https://example.org:443").tls


async def test_open_castore_knows_the_grpc_schemes(served: Served) -> None:
    client = open_castore(served.unix, served.tcp)
    assert isinstance(client.blobs, GrpcBlobService)
    assert isinstance(client.directories, GrpcDirectoryService)
    digest = await client.blobs.put(b"via open_castore")
    assert await served.backing.blobs.get(digest) == b"via open_castore"
    await client.aclose()


async def test_unreachable_server_is_a_clear_error_within_the_deadline(sockdir: Path) -> None:
    # A TCP port nobody listens on (bound then closed), and a missing socket.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"grpc+http://127.0.0.1:{port}", f"grpc+unix://{sockdir}/none.sock"):
        blobs = GrpcBlobService(address, GrpcOptions(connect_timeout=1.0))
        start = time.monotonic()
        with pytest.raises(StoreError) as info:
            await blobs.stat(b3(b"x"))
        assert time.monotonic() - start < 3.0
        assert address in str(info.value)
        await blobs.aclose()


class _StallingBlobs(MemoryBlobService):
    async def open_read(self, digest: bytes) -> BlobReader:
        reader = await super().open_read(digest)

        async def stall(n: int = CHUNK) -> bytes:
            await asyncio.sleep(3600)
            return b""
        reader.read = stall  # type: ignore[method-assign]  # a reader that never answers
        return reader


async def test_stalled_stream_times_out(sockdir: Path) -> None:
    backing = Castore(_StallingBlobs(), open_castore("memory://", "memory://").directories)
    digest = await backing.blobs.put(b"never sent")
    async for s in _serve(backing, sockdir):
        client = s.client(idle_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(StoreError, match="no answer|no message"):
            await client.blobs.get(digest)
        assert time.monotonic() - start < 3.0
        await client.aclose()


async def test_client_translates_errors(served: Served) -> None:
    client = served.client()
    missing = b3(b"missing")
    assert await client.blobs.stat(missing) is None
    with pytest.raises(NotFoundError, match=missing.hex()):
        await client.blobs.open_read(missing)
    assert await client.directories.get(missing) is None
    with pytest.raises(ValidationError, match="digest-length"):
        await client.directories.get(b"short")
    await client.aclose()


async def test_parallel_uploads_verify(served: Served) -> None:
    client = served.client()
    blobs = [pattern(CHUNK + 1000 * i, seed=i) for i in range(20)]
    digests = await asyncio.gather(*(client.blobs.put(b) for b in blobs))
    assert list(digests) == [b3(b) for b in blobs]
    for b, d in zip(blobs, digests):
        assert await served.backing.blobs.get(d) == b
    await client.aclose()


# --- copy_node ---------------------------------------------------------------------

async def test_copy_node_to_a_remote_store(served: Served) -> None:
    src = open_castore("memory://", "memory://")
    t = _diamond()
    content = {b"shared": b"shared"}
    for data in content.values():
        await src.blobs.put(data)
    big = pattern(2 * CHUNK + 3, seed=8)
    await src.blobs.put(big)
    top = Directory(directories=[t["root"].as_node(b"r")],
                    files=[FileNode(name=b"big", digest=b3(big), size=len(big))])
    order = [t["empty"], t["shared"], t["c"], t["a"], t["b"], t["root"], top]
    await src.directories.put_tree(order)
    node = top.as_node(b"top")
    client = served.client()
    copied = await copy_node(src, client, node)
    blob_bytes = len(big) + len(b"shared")
    assert copied == blob_bytes + sum(len(d.canonical_bytes) for d in order)
    assert await nar_bytes(client, node) == await nar_bytes(src, node)
    assert await copy_node(src, client, node) == 0  # nothing left to copy
    single = FileNode(name=b"f", digest=b3(big), size=len(big))
    assert await copy_node(src, client, single) == 0
    await client.aclose()


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details=f"{code.name} for the test")


async def test_idempotent_calls_and_stream_opens_retry_only_unavailable() -> None:
    # The retry policy on its own: a server that is UNAVAILABLE a set number
    # of times cannot be staged on demand, so the calls fail as gRPC would.
    from stages.grpc.castore_client import _Connection

    conn = _Connection("grpc+unix:///nonexistent.sock",
                       GrpcOptions(retries=2, backoff=0.001))
    tries = []

    def flaky(failures: int, code=grpc.StatusCode.UNAVAILABLE):
        async def attempt() -> str:
            tries.append(code)
            if len(tries) <= failures:
                raise _rpc_error(code)
            return "answer"
        return attempt

    assert await conn._retrying(flaky(2), "blob", b"\x01" * 32) == "answer"
    assert len(tries) == 3
    tries.clear()
    with pytest.raises(StoreError):  # retries spent: translated, naming the address
        await conn._retrying(flaky(3), "blob", b"\x01" * 32)
    assert len(tries) == 3
    tries.clear()
    with pytest.raises(NotFoundError):  # not retried
        await conn._retrying(flaky(1, grpc.StatusCode.NOT_FOUND), "blob", b"\x01" * 32)
    assert len(tries) == 1

    class Stream:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        async def read(self) -> str:
            if self.fail:
                raise _rpc_error(grpc.StatusCode.UNAVAILABLE)
            return "first"

    starts = iter([Stream(True), Stream(False)])
    call, first = await conn.open_stream(lambda: next(starts), timeout=5, what="a read",
                                         kind="blob", digest=b"\x01" * 32)
    assert first == "first" and not call.fail

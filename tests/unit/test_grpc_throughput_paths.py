"""The castore's gRPC throughput paths: what was changed for speed still holds
its promises.

- :func:`tune_malloc` really stops the page-fault churn of big, short-lived
  buffers (measured in a child process against the untuned allocator).
- The local store's async writer writes behind the caller in batches: a
  buffer the caller reuses is copied, the batch's error surfaces, an abort or
  a cancellation leaves no blob and no uncommitted pack bytes, and the bytes
  collected while a batch is written stay bounded.
- The server reads one chunk ahead, never two reads at once.
- A failed client-stream write reports the server's status when it has one.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import blake3
import grpc
import pytest

from stages.castore import local
from stages.castore.addresses import Castore, open_castore
from stages.castore.errors import StoreError, ValidationError
from stages.castore.memory import MemoryBlobService
from stages.castore.services import BlobReader
from stages.grpc.castore_client import GrpcBlobService, GrpcDirectoryService, _raise_final_status
from stages.grpc.castore_server import CHUNK, start_castore_server

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 31 + seed) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


# --- tune_malloc ------------------------------------------------------------------

_FAULTS = textwrap.dedent("""
    import resource, sys
    from stages.grpc.wire import tune_malloc
    applied = tune_malloc()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    size, count = int(sys.argv[1]), int(sys.argv[2])
    for _ in range(3):  # warm up: the heap grows once
        bufs = [b"x" * size for _ in range(count)]
        del bufs
    start = faults()
    for _ in range(40):
        # A few big buffers alive at once, then all freed: what a stream of
        # gRPC messages does to the allocator.
        bufs = [b"x" * size for _ in range(count)]
        del bufs
    print(applied, faults() - start)
""")


def _faults(env_default: bool) -> tuple[str, int]:
    env = {"PATH": "/usr/bin:/bin"}
    if env_default:
        env["OCIBUILD_GRPC_MALLOC"] = "default"
    out = subprocess.run([sys.executable, "-c", _FAULTS, str(4 * MIB), "4"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


def test_tune_malloc_stops_refaulting_message_buffers() -> None:
    applied, tuned = _faults(env_default=False)
    default_applied, untuned = _faults(env_default=True)
    assert (applied, default_applied) == ("True", "False")
    # The default allocator gives (some of) the buffers back and faults them
    # in again (how many depends on its state: 12k-100k pages of the 164k
    # allocated here); tuned, they stay mapped.
    assert untuned > 5_000, untuned
    assert tuned < untuned / 10, (tuned, untuned)


# --- the local store's write-behind ----------------------------------------------

@pytest.fixture
def blobs(tmp_path: Path):
    service = open_castore(f"local://{tmp_path}/store", f"local://{tmp_path}/store").blobs
    yield service
    service.store.close()


def _no_uncommitted_bytes(store: local.LocalStore) -> None:
    for pack in store.packs.idle:
        assert pack.pos == pack.committed
        assert Path(pack.path).stat().st_size == pack.committed


async def test_a_reused_bytearray_is_copied_before_the_write_returns(blobs) -> None:
    parts = [pattern(MIB, seed=i) for i in range(5)]
    buffer = bytearray(MIB)
    writer = blobs.open_write()
    async with writer:
        for part in parts:
            buffer[:] = part
            await writer.write(buffer)
            buffer[:] = b"\0" * MIB  # the caller reuses its buffer at once
        digest = await writer.close()
    assert digest == b3(b"".join(parts))
    assert await blobs.get(digest) == b"".join(parts)


async def test_views_of_bytes_are_written_as_given(blobs) -> None:
    data = pattern(7 * MIB + 3, seed=2)
    view = memoryview(data)
    writer = blobs.open_write()
    async with writer:
        for i in range(0, len(data), MIB):
            await writer.write(view[i:i + MIB])
        digest = await writer.close()
    assert digest == b3(data) and await blobs.get(digest) == data


async def test_memory_writer_copies_a_reused_bytearray_and_keeps_views_of_bytes() -> None:
    service = MemoryBlobService()
    data = pattern(3 * MIB + 5, seed=3)
    view = memoryview(data)
    buffer = bytearray(MIB)
    writer = service.open_write()
    async with writer:
        for i in range(0, len(data), MIB):
            part = view[i:i + MIB]
            if i == MIB:  # one part through a buffer the caller reuses at once
                buffer[:len(part)] = part
                await writer.write(memoryview(buffer)[:len(part)])
                buffer[:] = b"\0" * MIB
            else:
                await writer.write(part)
        digest = await writer.close()
    assert digest == b3(data) and service.blobs[digest] == data
    # The same bytes again: the stored value is the first one, untouched.
    stored = service.blobs[digest]
    writer = service.open_write()
    async with writer:
        await writer.write(data)
        assert await writer.close() == digest
    assert service.blobs[digest] is stored


async def test_a_failed_batch_surfaces_and_leaves_nothing(blobs, monkeypatch) -> None:
    writer = blobs.open_write()
    sync = writer._writer
    real = sync.append  # the half of a write that runs in the batch's thread
    calls = 0

    def failing(data):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise StoreError("test", "disk on fire")
        real(data)

    monkeypatch.setattr(sync, "append", failing)
    data = pattern(6 * MIB, seed=3)
    with pytest.raises(StoreError, match="disk on fire"):
        async with writer:
            for i in range(0, len(data), MIB):
                await writer.write(data[i:i + MIB])
            await writer.close()
    assert await blobs.stat(b3(data)) is None
    _no_uncommitted_bytes(blobs.store)


async def test_cancelled_upload_waits_for_its_batch_and_leaves_nothing(blobs, monkeypatch
                                                                      ) -> None:
    writer = blobs.open_write()
    sync = writer._writer
    real = sync.append  # the half of a write that runs in the batch's thread
    in_thread = threading.Event()
    release = threading.Event()

    def slow(data):
        in_thread.set()
        release.wait(10)
        real(data)

    monkeypatch.setattr(sync, "append", slow)
    data = pattern(4 * MIB, seed=5)

    async def upload():
        async with writer:
            for i in range(0, len(data), MIB):
                await writer.write(data[i:i + MIB])
            await asyncio.sleep(10)  # never closes

    task = asyncio.create_task(upload())
    await asyncio.to_thread(in_thread.wait, 10)
    task.cancel()
    # The abort must wait for the batch still in its thread.
    await asyncio.sleep(0.1)
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sync.closed and sync.digest is None
    assert await blobs.stat(b3(data)) is None
    _no_uncommitted_bytes(blobs.store)


async def test_bytes_collected_behind_a_slow_batch_are_bounded(blobs, monkeypatch) -> None:
    writer = blobs.open_write()
    sync = writer._writer
    real = sync.append  # the half of a write that runs in the batch's thread
    release = threading.Event()

    def slow(data):
        release.wait(10)
        real(data)

    monkeypatch.setattr(sync, "append", slow)
    data = pattern(12 * MIB, seed=6)
    view = memoryview(data)
    async with writer:
        await writer.write(view[:MIB])  # the first batch, now stuck in its thread
        collected = 0
        while collected + MIB < local.WRITE_BEHIND:
            await asyncio.wait_for(writer.write(view[MIB + collected:2 * MIB + collected]), 1)
            collected += MIB
        # This one reaches the bound: it has to wait for the stuck batch.
        last = asyncio.create_task(writer.write(view[MIB + collected:2 * MIB + collected]))
        await asyncio.sleep(0.2)
        assert not last.done()
        release.set()
        await last
        written = 2 * MIB + collected
        await writer.write(view[written:])
        digest = await writer.close()
    assert digest == b3(data) and await blobs.get(digest) == data


# --- the server's read-ahead ------------------------------------------------------

class _CountingReader(BlobReader):
    """Serves the blob slowly and records how many reads ran at once."""

    def __init__(self, digest: bytes, data: bytes, stats: dict) -> None:
        self.digest, self.size, self._data, self._stats = digest, len(data), data, stats
        self._active = 0

    async def read(self, n: int = CHUNK) -> bytes:
        self._active += 1
        self._stats["max_active"] = max(self._stats["max_active"], self._active)
        await asyncio.sleep(0.005)
        out, self._data = self._data[:n], self._data[n:]
        self._active -= 1
        self._stats["reads"] += 1
        return out

    async def pread(self, offset: int, n: int) -> bytes:
        raise NotImplementedError

    async def verify(self) -> None:
        pass


class _CountingBlobs(MemoryBlobService):
    def __init__(self) -> None:
        super().__init__()
        self.stats = {"max_active": 0, "reads": 0}

    async def open_read(self, digest: bytes) -> BlobReader:
        return _CountingReader(digest, self.blobs[digest], self.stats)


@pytest.fixture
def sockdir():
    path = Path(tempfile.mkdtemp(prefix="gtp-", dir="/tmp"))  # short: socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_server_reads_one_chunk_ahead_never_two_at_once(sockdir: Path) -> None:
    blobs = _CountingBlobs()
    backing = Castore(blobs, open_castore("memory://", "memory://").directories)
    data = pattern(5 * CHUNK + 7, seed=9)
    digest = await blobs.put(data)
    server, _ = await start_castore_server(backing, [f"unix://{sockdir}/c.sock"])
    address = f"grpc+unix://{sockdir}/c.sock"
    client = Castore(GrpcBlobService(address), GrpcDirectoryService(address))
    try:
        assert await client.blobs.get(digest) == data
    finally:
        await client.aclose()
        await server.stop(None)
    assert blobs.stats["max_active"] == 1
    assert blobs.stats["reads"] == 7  # six chunks and the empty read that ends it


# --- a failed write of a client stream ------------------------------------------------

class _FakeCall:
    def __init__(self, code: grpc.StatusCode | None, details: str = "") -> None:
        self._code, self._details = code, details

    async def code(self) -> grpc.StatusCode:
        if self._code is None:
            await asyncio.sleep(60)  # a status that never comes
        return self._code

    async def details(self) -> str:
        return self._details


def _core_error() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(),
                                grpc.aio.Metadata(), details="Internal error from Core")


async def test_failed_write_reports_the_servers_status() -> None:
    call = _FakeCall(grpc.StatusCode.INVALID_ARGUMENT, "put-order: b before its child")
    with pytest.raises(ValidationError, match="put-order") as info:
        await _raise_final_status(call, _core_error(), "grpc+unix:///x", "directory")
    assert "b before its child" in str(info.value)


async def test_failed_write_without_a_status_reports_the_write() -> None:
    with pytest.raises(StoreError, match="Internal error from Core"):
        await asyncio.wait_for(
            _raise_final_status(_FakeCall(None), _core_error(), "grpc+unix:///x"), 5)

"""The castore over gRPC with real processes: a server killed mid-upload, a
256 MiB blob with bounded memory on both ends, parallel large uploads, and
the FUSE mount reading a remote store.

The server runs as ``python -m stages.grpc.castore_server`` over a local
store in a temp dir, on a unix socket; every test stops what it started.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import blake3
import pytest

from stages.castore.addresses import open_castore
from stages.castore.errors import StoreError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="gci-", dir="/tmp"))  # short: socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


class ServerProcess:
    def __init__(self, store: Path, sock: Path) -> None:
        self.address = f"grpc+unix://{sock}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stages.grpc.castore_server", "--listen", f"unix://{sock}",
             "--blob-service-addr", f"local://{store}",
             "--directory-service-addr", f"local://{store}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"castore server exited with {self.proc.returncode}")

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server_factory(workdir: Path):
    started: list[ServerProcess] = []

    def start() -> ServerProcess:
        sock = workdir / "c.sock"
        if sock.exists():
            sock.unlink()  # left by a SIGKILLed server
        server = ServerProcess(workdir / "store", sock)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def pattern_chunks(total: int, seed: int, chunk: int = 1 << 20):
    block = bytes((i * 31 + seed) % 251 for i in range(chunk))
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        yield block[:n] if (start // chunk) % 3 else bytes(reversed(block[:n]))


async def test_server_killed_mid_upload_leaves_no_blob(server_factory) -> None:
    server = server_factory()
    castore = open_castore(server.address, server.address)
    total = 64 << 20
    hasher, prefix = blake3.blake3(), blake3.blake3()
    writer = castore.blobs.open_write()
    sent = 0
    with pytest.raises(StoreError):
        async with writer:
            for chunk in pattern_chunks(total, seed=5):
                hasher.update(chunk)
                if sent < 16 << 20:
                    prefix.update(chunk)
                await writer.write(chunk)
                sent += len(chunk)
                if sent == 16 << 20:
                    server.stop(signal.SIGKILL)
            await writer.close()
    await castore.aclose()
    # Same store, new server: neither the whole blob nor what arrived exists.
    server = server_factory()
    castore = open_castore(server.address, server.address)
    assert await castore.blobs.stat(hasher.digest()) is None
    assert await castore.blobs.stat(prefix.digest()) is None
    digest = await castore.blobs.put(b"the store still works")
    assert await castore.blobs.get(digest) == b"the store still works"
    await castore.aclose()


CLIENT = textwrap.dedent("""
    import asyncio, sys, blake3
    from pathlib import Path
    from stages.castore.addresses import open_castore

    def hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                yield int(line.split()[1])

    async def main(address, total):
        castore = open_castore(address, address)
        await castore.blobs.stat(bytes(32))  # connect, load everything
        Path("/proc/self/clear_refs").write_text("5")
        idle = list(hwm())[1]
        block = bytes((i * 7) % 253 for i in range(1 << 20))
        hasher = blake3.blake3()
        writer = castore.blobs.open_write()
        async with writer:
            for i in range(total >> 20):
                chunk = block[i % 7:] + block[:i % 7]
                hasher.update(chunk)
                await writer.write(chunk)
            digest = await writer.close()
        assert digest == hasher.digest(), "server digest differs"
        reader = await castore.blobs.open_read(digest)
        check, n = blake3.blake3(), 0
        while data := await reader.read():
            check.update(data)
            n += len(data)
        assert n == total and check.digest() == digest
        await castore.aclose()
        print(list(hwm())[0] - idle)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


@pytest.mark.slow
def test_256_mib_blob_streams_with_bounded_memory(server_factory) -> None:
    server = server_factory()
    idle = server.peak_rss_kib()
    result = subprocess.run([sys.executable, "-c", CLIENT, server.address, str(256 << 20)],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    client_growth_mib = int(result.stdout.split()[-1]) / 1024
    server_growth_mib = (server.peak_rss_kib() - idle) / 1024
    assert client_growth_mib < 64, client_growth_mib
    assert server_growth_mib < 96, server_growth_mib


async def test_twenty_parallel_large_uploads_all_verify(server_factory) -> None:
    server = server_factory()
    castore = open_castore(server.address, server.address)

    async def upload(seed: int) -> tuple[bytes, bytes]:
        hasher = blake3.blake3()
        writer = castore.blobs.open_write()
        async with writer:
            for chunk in pattern_chunks((8 << 20) + seed, seed=seed):
                hasher.update(chunk)
                await writer.write(chunk)
            return hasher.digest(), await writer.close()

    results = await asyncio.gather(*(upload(seed) for seed in range(20)))
    for expected, got in results:
        assert got == expected
        async with await castore.blobs.open_read(got) as reader:
            await reader.verify()
    await castore.aclose()


@pytest.mark.fuse
async def test_fuse_mount_reads_a_remote_store(server_factory, workdir: Path) -> None:
    from stages.castore.fuse import MountServer
    from stages.castore.ingest import ingest_path

    tree = workdir / "tree"
    (tree / "sub").mkdir(parents=True)
    big = b"".join(pattern_chunks((3 << 20) + 7, seed=3))
    (tree / "big").write_bytes(big)
    (tree / "sub" / "small").write_text("small file\n")
    os.symlink("sub/small", tree / "link")
    server = server_factory()
    castore = open_castore(server.address, server.address)
    node = await ingest_path(castore, tree)
    await castore.aclose()
    mnt = workdir / "mnt"
    mnt.mkdir()
    async with MountServer(mnt, blob_address=server.address,
                           directory_address=server.address) as mounts:
        root = await mounts.add("k1", [node])
        top = root / "tree"
        got = await asyncio.to_thread((top / "big").read_bytes)
        assert got == big
        assert await asyncio.to_thread((top / "sub" / "small").read_text) == "small file\n"
        assert os.readlink(top / "link") == "sub/small"
        assert sorted(os.listdir(top)) == ["big", "link", "sub"]
    assert not os.path.ismount(mnt)

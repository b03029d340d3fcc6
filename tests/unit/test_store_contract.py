"""The store contract: what every castore backend keeps, run against each of them.

Backends: ``memory://``, ``local://`` (the persistent store), and the gRPC
client over a unix socket and over TCP (``grpc+unix``, ``grpc+http``, each
to an in-process server backed by a memory store). One suite, one fixture
(``castore``, parametrized by backend): a new backend joins by adding a
parameter.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from castore_helpers import b3, pattern
from castore_helpers import file_node as _file
from castore_helpers import tree as _tree

from stages.castore import local
from stages.castore.addresses import Castore, open_castore
from stages.castore.errors import IngestError, NotFoundError, ValidationError
from stages.castore.nodes import EMPTY_DIRECTORY_DIGEST, Directory, DirectoryNode
from stages.grpc.castore_client import GrpcBlobService, GrpcDirectoryService
from stages.grpc.castore_server import start_castore_server


@pytest.fixture(params=["memory", "local", "grpc+unix", "grpc+http"])
async def castore(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "memory":
        yield open_castore("memory://", "memory://")
        return
    if request.param == "local":
        address = f"local://{tmp_path / 'store'}"
        cs = open_castore(address, address)
        yield cs
        cs.blobs.store.close()
        return
    sockdir = Path(tempfile.mkdtemp(prefix="gsc-", dir="/tmp"))  # short: socket path limits
    server, ports = await start_castore_server(
        open_castore("memory://", "memory://"),
        [f"unix://{sockdir}/castore.sock", "127.0.0.1:0"])
    address = (f"grpc+unix://{sockdir}/castore.sock" if request.param == "grpc+unix"
               else f"grpc+http://127.0.0.1:{ports[1]}")
    client = Castore(GrpcBlobService(address), GrpcDirectoryService(address))
    try:
        yield client
    finally:
        await client.aclose()
        await server.stop(None)
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.mark.parametrize("size", [0, 1, 1000, local.SMALL_BLOB, local.SMALL_BLOB + 1, 3 << 20],
                         ids=lambda s: f"{s}B")
async def test_blob_roundtrip(castore: Castore, size: int) -> None:
    data = pattern(size)
    digest = await castore.blobs.put(data)
    assert digest == b3(data)
    assert await castore.blobs.stat(digest) == size
    assert await castore.blobs.has(digest)
    assert await castore.blobs.get(digest) == data


async def test_streamed_write_in_chunks_and_reads(castore: Castore) -> None:
    data = pattern(5 << 20, seed=7)
    writer = castore.blobs.open_write()
    async with writer:
        for i in range(0, len(data), 300_000):
            await writer.write(data[i:i + 300_000])
        digest = await writer.close()
    assert digest == b3(data)
    async with await castore.blobs.open_read(digest) as reader:
        assert reader.size == len(data)
        assert await reader.pread(1_234_567, 1000) == data[1_234_567:1_235_567]
        assert await reader.pread(len(data) - 10, 100) == data[-10:]
        parts = []
        while chunk := await reader.read(777_777):
            parts.append(chunk)
        assert b"".join(parts) == data
        await reader.verify()


async def test_missing_blob(castore: Castore) -> None:
    digest = b3(b"never stored")
    assert await castore.blobs.stat(digest) is None
    with pytest.raises(NotFoundError, match=digest.hex()):
        await castore.blobs.open_read(digest)


async def test_bad_digest_length_is_refused(castore: Castore) -> None:
    with pytest.raises(ValidationError, match="digest-length"):
        await castore.blobs.stat(b"short")


@pytest.mark.parametrize("size", [10, 2 << 20], ids=["small", "streamed"])
async def test_aborted_write_is_invisible(castore: Castore, size: int) -> None:
    data = pattern(size, seed=3)
    writer = castore.blobs.open_write()
    with pytest.raises(RuntimeError):
        async with writer:
            await writer.write(data)
            raise RuntimeError("upload interrupted")
    assert await castore.blobs.stat(b3(data)) is None
    writer = castore.blobs.open_write()
    async with writer:
        await writer.write(data)
        # leaving without close() drops it too
    assert await castore.blobs.stat(b3(data)) is None


async def test_concurrent_writers_from_tasks(castore: Castore) -> None:
    blobs = [pattern(n, seed=n % 200) for n in (0, 5, 70_000, 1_500_000, 2_500_000, 333)]

    async def put_slowly(data: bytes) -> bytes:
        writer = castore.blobs.open_write()
        async with writer:
            for i in range(0, max(len(data), 1), 65536):
                await writer.write(data[i:i + 65536])
                await asyncio.sleep(0)
            return await writer.close()

    digests = await asyncio.gather(*(put_slowly(d) for d in blobs))
    assert digests == [b3(d) for d in blobs]
    for d, data in zip(digests, blobs):
        assert await castore.blobs.get(d) == data


async def test_put_files(castore: Castore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    contents = {f"f{i}".encode(): pattern(i * 9000, seed=i) for i in range(40)}
    contents[b"big"] = pattern(local.SMALL_BLOB * 2 + 5, seed=99)
    contents[b"dup"] = contents[b"f3"]
    for name, data in contents.items():
        (src / name.decode()).write_bytes(data)
    os.chmod(src / "f1", 0o755)
    paths = [os.fsencode(src / n.decode()) for n in contents]
    results = await castore.blobs.put_files(paths)
    assert [r.digest for r in results] == [b3(d) for d in contents.values()]
    assert [r.size for r in results] == [len(d) for d in contents.values()]
    assert results[1].mode & 0o100 and not results[0].mode & 0o100
    for r, data in zip(results, contents.values()):
        assert await castore.blobs.get(r.digest) == data


async def test_put_files_refuses_non_regular(castore: Castore, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "target").write_bytes(b"x")
    os.symlink("target", tmp_path / "link")
    for name in ("fifo", "link"):
        with pytest.raises(IngestError, match=name):
            await castore.blobs.put_files([os.fsencode(tmp_path / name)])


async def test_directory_put_and_get(castore: Castore) -> None:
    dirs, root = _tree()
    assert await castore.directories.put_tree(dirs) == root.digest
    for d in dirs:
        assert await castore.directories.get(d.digest) == d
    # f; a = 1 + leaf (x, l); b = 1 + mid (1 + leaf, 1 + void); c = 1 + void
    assert root.size == 1 + (1 + 2) + (1 + (1 + 2) + (1 + 0)) + (1 + 0)


async def test_recursive_get_is_breadth_first_each_once(castore: Castore) -> None:
    dirs, root = _tree()
    empty, leaf, mid, _ = dirs
    await castore.directories.put_tree(dirs)
    got = [d async for d in castore.directories.get_recursive(root.digest)]
    # root; its children in list order (a=leaf, b=mid, c=empty); leaf and
    # empty are not repeated below mid.
    assert got == [root, leaf, mid, empty]


async def test_empty_directory_digest(castore: Castore) -> None:
    assert await castore.directories.put_tree([Directory()]) == EMPTY_DIRECTORY_DIGEST
    assert await castore.directories.get(EMPTY_DIRECTORY_DIGEST) == Directory()


async def test_directory_upload_rules(castore: Castore) -> None:
    leaf = Directory(files=[_file(b"x", b"x")])
    wrong_size = Directory(directories=[DirectoryNode(name=b"d", digest=leaf.digest, size=7)])
    with pytest.raises(ValidationError, match="directory-size"):
        await castore.directories.put_tree([leaf, wrong_size])
    parent = Directory(directories=[leaf.as_node(b"d")])
    with pytest.raises(ValidationError, match="put-order"):
        await castore.directories.put_tree([parent, leaf])
    stray = Directory(files=[_file(b"stray", b"s")])
    with pytest.raises(ValidationError, match="put-disconnected"):
        await castore.directories.put_tree([stray, leaf, parent])
    with pytest.raises(ValidationError, match="put-empty"):
        await castore.directories.put_tree([])
    # nothing of the refused uploads was stored
    for d in (leaf, parent, stray, wrong_size):
        assert await castore.directories.get(d.digest) is None


async def test_missing_directory(castore: Castore) -> None:
    digest = b3(b"no such directory")
    assert await castore.directories.get(digest) is None
    with pytest.raises(NotFoundError, match=digest.hex()):
        async for _ in castore.directories.get_recursive(digest):
            pass

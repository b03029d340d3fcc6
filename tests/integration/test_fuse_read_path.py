"""The FUSE read path against the kernel: the first open fills the page cache
when asked to (OCIBUILD_FUSE_FILL_MAX) and not otherwise, bad blobs stay
refused although their pages were filled, and cold reads of several files at
once (replies sliced from one pack mapping) each get their own bytes.

Every test mounts under its own tmp_path; the fixtures detach anything left.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import random
import threading
from pathlib import Path

import pytest

from stages.castore.addresses import open_castore
from stages.castore.fuse import MountServer
from stages.castore.ingest import ingest_path
from stages.castore.local import STREAM_CHUNK, open_local_store
from stages.castore.nodes import FileNode

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]

PAGE = os.sysconf("SC_PAGE_SIZE")


async def ingest(address: str, path: Path) -> FileNode:
    castore = open_castore(address, address)
    try:
        node = await ingest_path(castore, path)
    finally:
        await castore.aclose()
    assert isinstance(node, FileNode)
    return node


def resident_pages(fd: int, size: int) -> tuple[int, int]:
    """(resident, total) pages of an open file, by mmap + mincore (reads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap of the mounted file failed")
    try:
        pages = (size + PAGE - 1) // PAGE
        vec = ctypes.create_string_buffer(pages)
        if libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(b & 1 for b in vec.raw), pages
    finally:
        libc.munmap(addr, size)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fill", [True, False], ids=["fill-on", "fill-off"])
async def test_first_open_fills_the_page_cache_only_when_asked(
        tmp_path, mountpoint, store_address, monkeypatch, fill):
    size = 2 * STREAM_CHUNK + 3 * PAGE + 17  # several verify chunks, a partial last page
    data = os.urandom(size)
    (tmp_path / "big").write_bytes(data)
    node = await ingest(store_address, tmp_path / "big")
    monkeypatch.setenv("OCIBUILD_FUSE_FILL_MAX", str(size if fill else 0))
    async with MountServer(mountpoint, blob_address=store_address,
                           directory_address=store_address) as server:
        path = (await server.add("k", [node])) / "big"
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            resident, total = await asyncio.to_thread(resident_pages, fd, size)
            if fill:
                assert resident == total, f"only {resident} of {total} pages filled at open"
            else:
                assert resident == 0, f"{resident} pages cached before any read"
            assert await asyncio.to_thread(os.pread, fd, size + 10, 0) == data
        finally:
            os.close(fd)
        # Dropped pages come back through ordinary read requests; a second
        # open fills nothing (the blob is verified once per server).
        await asyncio.to_thread(drop_cache, path)
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            resident, total = await asyncio.to_thread(resident_pages, fd, size)
            assert resident < total
            assert await asyncio.to_thread(os.pread, fd, size, 0) == data
        finally:
            os.close(fd)


async def test_corrupt_big_blob_stays_refused_after_its_chunks_were_offered(
        tmp_path, mountpoint, store_address, monkeypatch):
    monkeypatch.setenv("OCIBUILD_FUSE_FILL_MAX", str(1 << 40))  # fill before the verdict
    size = 2 * STREAM_CHUNK + 1000
    (tmp_path / "victim").write_bytes(os.urandom(size))
    node = await ingest(store_address, tmp_path / "victim")
    store = open_local_store(tmp_path / "store")
    pack, offset = store.where(node.digest).rsplit("@", 1)
    store.close()
    with open(pack, "r+b") as f:  # past the first chunks: they are offered first
        f.seek(int(offset) + size - 10)
        f.write(b"corruption")
    async with MountServer(mountpoint, blob_address=store_address,
                           directory_address=store_address) as server:
        path = (await server.add("k", [node])) / "victim"
        for _ in range(2):
            with pytest.raises(OSError) as info:
                await asyncio.to_thread(path.read_bytes)
            assert info.value.errno == errno.EIO
        assert node.digest.hex() in server.stderr_tail()


async def test_cold_reads_of_two_files_at_once_get_their_own_bytes(
        tmp_path, mountpoint, store_address):
    size = 12 << 20
    contents = {name: os.urandom(size) for name in ("one", "two")}
    nodes = []
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
        nodes.append(await ingest(store_address, tmp_path / name))
    async with MountServer(mountpoint, blob_address=store_address,
                           directory_address=store_address) as server:
        top = await server.add("k", nodes)
        errors: list[str] = []

        def hammer(name: str, seed: int) -> None:
            data = contents[name]
            rng = random.Random(seed)
            with open(top / name, "rb", buffering=0) as f:
                for round_ in range(3):
                    drop_cache(top / name)
                    for _ in range(40):  # random ranges, up to past the end
                        off = rng.randrange(0, size)
                        n = rng.choice([1, 4096, 100_000, 1 << 20, 3 << 20])
                        if os.pread(f.fileno(), n, off) != data[off:off + n]:
                            errors.append(f"{name}: pread({n}, {off}) round {round_}")
                    drop_cache(top / name)
                    f.seek(0)
                    if f.read() != data:
                        errors.append(f"{name}: sequential read round {round_}")

        threads = [threading.Thread(target=hammer, args=(name, i))
                   for i, name in enumerate(contents)]
        for t in threads:
            t.start()
        await asyncio.to_thread(lambda: [t.join() for t in threads])
        assert errors == []

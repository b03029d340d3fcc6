"""FUSE read throughput and server memory, beside a native page-cache read.

Measures, in one run, over a fresh local store in a temp directory:

- sequential read (1 MiB buffers) of a SIZE file natively from the page cache;
- the same bytes through the mount: first open (includes the once-per-server
  BLAKE3 verification), cold (page cache of the FUSE file dropped with
  fadvise DONTNEED, store pack warm), and warm (served from the page cache
  thanks to keep_cache);
- peak RSS of the mount server above its idle size while reading a 1 GiB file;
- start-up of a mount server (what a process per build would pay) against
  an add() round trip on a running one.

Usage: python -m bench.bench_fuse [--size-mib 512] [--rss-mib 1024] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from stages.castore.fuse import MountServer
from stages.castore.local import open_local_store
from stages.castore.nodes import FileNode

CHUNK = 1 << 20


def _write_blob(store, path: Path, size: int) -> FileNode:
    """A random blob of ``size`` bytes, in the store and as a plain file."""
    writer = store.open_writer()
    block = os.urandom(CHUNK)
    with open(path, "wb") as f:
        for i in range(size // CHUNK):
            data = block[i % 7:] + block[:i % 7]  # vary the blocks a little
            writer.write(data)
            f.write(data)
    digest = writer.close()
    return FileNode(name=path.name.encode(), digest=digest, size=size)


def _read(path: Path) -> float:
    """Seconds to read path sequentially with 1 MiB buffers."""
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing for {pid}")


async def run(size: int, rss_size: int, work: Path) -> dict:
    store_dir = work / "store"
    address = f"local://{store_dir}"
    store = open_local_store(store_dir)
    big = _write_blob(store, work / "big", size)
    huge = _write_blob(store, work / "huge", rss_size)
    store.close()
    os.unlink(work / "huge")
    result: dict = {"size_mib": size >> 20}

    _read(work / "big")
    native = min(_read(work / "big") for _ in range(3))
    result["native_gbps"] = size / native / 1e9

    mnt = work / "mnt"
    mnt.mkdir()
    start = time.perf_counter()
    async with MountServer(mnt, blob_address=address, directory_address=address) as server:
        result["server_start_ms"] = (time.perf_counter() - start) * 1e3
        rounds = []
        for i in range(30):
            t0 = time.perf_counter()
            await server.add(f"k{i}", [])
            rounds.append(time.perf_counter() - t0)
        result["add_roundtrip_ms"] = statistics.median(rounds) * 1e3
        top = await server.add("bench", [big, huge])
        path = top / "big"
        first = await asyncio.to_thread(_read, path)
        result["fuse_first_open_gbps"] = size / first / 1e9
        colds = []
        for _ in range(3):
            _drop(path)
            colds.append(await asyncio.to_thread(_read, path))
        result["fuse_cold_gbps"] = size / statistics.median(colds) / 1e9
        warm = min([await asyncio.to_thread(_read, path) for _ in range(3)])
        result["fuse_warm_gbps"] = size / warm / 1e9

        idle = _rss_kib(server.pid, "VmRSS")
        await asyncio.to_thread(_read, top / "huge")
        peak = _rss_kib(server.pid, "VmHWM")
        result["server_idle_rss_mib"] = idle / 1024
        result["server_peak_above_idle_mib"] = (peak - idle) / 1024
    result["cold_over_native"] = result["fuse_cold_gbps"] / result["native_gbps"]
    result["warm_over_native"] = result["fuse_warm_gbps"] / result["native_gbps"]
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_fuse")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rss-mib", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=None,
                        help="work directory (default: a fresh temp dir, removed after)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fuse-", dir=args.dir) as work:
        result = asyncio.run(run(args.size_mib << 20, args.rss_mib << 20, Path(work)))
    for key, value in result.items():
        print(f"{key:>28}: {value:.3f}" if isinstance(value, float) else f"{key:>28}: {value}")
    ok_speed = max(result["fuse_cold_gbps"], result["fuse_warm_gbps"]) >= 1.5
    ok_rss = result["server_peak_above_idle_mib"] <= 64
    print(f"{'target warm >= 1.5 GB/s':>28}: {'met' if result['fuse_warm_gbps'] >= 1.5 else 'MISSED'}")
    print(f"{'target cold >= 1.5 GB/s':>28}: {'met' if result['fuse_cold_gbps'] >= 1.5 else 'MISSED'}")
    print(f"{'target RSS <= 64 MiB':>28}: {'met' if ok_rss else 'MISSED'}")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "bench_fuse.json").write_text(json.dumps(result, indent=2))
    return 0 if ok_speed and ok_rss else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

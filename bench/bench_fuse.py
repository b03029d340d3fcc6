"""FUSE read throughput and server memory, beside a native page-cache read.

Measures, in one run, over a fresh local store in a temp directory:

- sequential read (1 MiB buffers) of a SIZE file natively from the page cache;
- the same bytes through the mount: first open (the once-per-server BLAKE3
  verification, which also fills the FUSE file's page cache; reported as
  open() time, the read after it, and both together), cold (page cache of the
  FUSE file dropped with fadvise DONTNEED, store pack warm: every byte comes
  through a read request), and warm (served from the page cache thanks to
  keep_cache);
- for the cold read, CPU seconds per GiB spent by the reader thread and by
  the mount server (utime+stime from /proc), to tell which side bounds it;
- peak RSS of the mount server (VmHWM, so over all reads above, including
  file pages mapped while serving) above its size before the first read;
- start-up of a mount server (what a process per build would pay) against
  an add() round trip on a running one;
- what a compiler does to its inputs, per operation, through the mount and
  on a native bind mount of the same tree (``mount --bind``, as Nix's
  sandbox has its inputs): stat of an existing file, stat of a missing name
  (an include path probed in vain), open and read of a small file, and
  listing a directory of 5,000 entries. Each is timed warm (the kernel's
  caches filled by a first pass, as a build's second and later compiler
  runs see them), median of rounds.

The machine's load average is printed at start and end: on the shared 2-core
machine other work moves every number, so compare ratios to native taken in
the same run.

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
    return _read_cpu(path)[0]


def _read_cpu(path: Path) -> tuple[float, float]:
    """Seconds to read path sequentially with 1 MiB buffers, and this thread's CPU."""
    buf = bytearray(CHUNK)
    cpu = time.thread_time()
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - start, time.thread_time() - cpu


def _open_then_read(path: Path) -> tuple[float, float]:
    """Seconds spent in open() and in reading after it."""
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    opened = time.perf_counter()
    try:
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while f.readinto(buf):
                pass
    finally:
        os.close(fd)
    return opened - start, time.perf_counter() - opened


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def _tree(root: Path) -> None:
    """Headers as a compiler meets them, and a big directory."""
    (root / "include").mkdir(parents=True)
    for i in range(500):
        (root / "include" / f"h{i}.h").write_bytes(b"#pragma once\n" + b"x" * (i % 300))
    (root / "big").mkdir()
    for i in range(5000):
        (root / "big" / f"entry-{i:05d}").write_bytes(b"")


def _per_op_us(fn, n: int, rounds: int = 5) -> float:
    fn(n)  # fill the kernel's caches, as earlier compiler runs of a build do
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(n)
        times.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(times)


def _metadata_ops(root: Path) -> dict[str, float]:
    inc, big = root / "include", root / "big"

    def stat_existing(n: int) -> None:
        for i in range(n):
            os.stat(inc / f"h{i % 500}.h")

    def stat_missing(n: int) -> None:
        for i in range(n):
            try:
                os.stat(inc / f"missing{i % 500}.h")
            except FileNotFoundError:
                pass

    def open_read(n: int) -> None:
        for i in range(n):
            with open(inc / f"h{i % 500}.h", "rb") as f:
                f.read()

    def listdir(n: int) -> None:
        for _ in range(n):
            os.listdir(big)

    return {"stat_existing_us": _per_op_us(stat_existing, 5000),
            "stat_missing_us": _per_op_us(stat_missing, 5000),
            "open_read_small_us": _per_op_us(open_read, 2000),
            "readdir_5000_us": _per_op_us(listdir, 20)}


async def _metadata(work: Path, store_address: str) -> dict:
    import subprocess

    from stages.castore.addresses import open_castore
    from stages.castore.ingest import ingest_path

    src = work / "tree"
    _tree(src)
    castore = open_castore(store_address, store_address)
    try:
        node = await ingest_path(castore, src)
    finally:
        await castore.aclose()
    bind = work / "bind"
    bind.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(bind)], check=True)
    try:
        native = _metadata_ops(bind)
    finally:
        subprocess.run(["umount", str(bind)], check=True)
    mnt = work / "mnt-meta"
    mnt.mkdir()
    async with MountServer(mnt, blob_address=store_address,
                           directory_address=store_address) as server:
        # Bound as a build binds its inputs: the walk starts inside the input.
        fuse_bind = work / "fuse-bind"
        fuse_bind.mkdir()
        subprocess.run(["mount", "--bind", str(server.content_path(node)), str(fuse_bind)],
                       check=True)
        try:
            fuse = await asyncio.to_thread(_metadata_ops, fuse_bind)
        finally:
            subprocess.run(["umount", str(fuse_bind)], check=True)
    out: dict = {}
    for op, us in native.items():
        out[f"native_{op}"] = us
        out[f"fuse_{op}"] = fuse[op]
        out[f"{op.removesuffix('_us')}_over_native"] = fuse[op] / us
    return out


async def run(size: int, rss_size: int, work: Path) -> dict:
    store_dir = work / "store"
    address = f"local://{store_dir}"
    store = open_local_store(store_dir)
    big = _write_blob(store, work / "big", size)
    huge = _write_blob(store, work / "huge", rss_size)
    store.close()
    os.unlink(work / "huge")
    result: dict = {"size_mib": size >> 20, "loadavg_start": os.getloadavg()[0]}

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
        idle = _rss_kib(server.pid, "VmRSS")
        open_s, read_s = await asyncio.to_thread(_open_then_read, path)
        result["fuse_first_open_ms"] = open_s * 1e3
        result["fuse_first_read_after_open_gbps"] = size / read_s / 1e9
        result["fuse_first_open_gbps"] = size / (open_s + read_s) / 1e9
        colds, reader_cpu, server_cpu = [], [], []
        for _ in range(3):
            _drop(path)
            before = _cpu_s(server.pid)
            seconds, cpu = await asyncio.to_thread(_read_cpu, path)
            server_cpu.append(_cpu_s(server.pid) - before)
            colds.append(seconds)
            reader_cpu.append(cpu)
        result["fuse_cold_gbps"] = size / statistics.median(colds) / 1e9
        gib = size / (1 << 30)
        result["cold_reader_cpu_s_per_gib"] = statistics.median(reader_cpu) / gib
        result["cold_server_cpu_s_per_gib"] = statistics.median(server_cpu) / gib
        warm = min([await asyncio.to_thread(_read, path) for _ in range(3)])
        result["fuse_warm_gbps"] = size / warm / 1e9

        await asyncio.to_thread(_read, top / "huge")
        peak = _rss_kib(server.pid, "VmHWM")
        result["server_idle_rss_mib"] = idle / 1024
        result["server_peak_above_idle_mib"] = (peak - idle) / 1024
    result.update(await _metadata(work, address))
    result["loadavg_end"] = os.getloadavg()[0]
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
    ops = ("stat_existing", "stat_missing", "open_read_small", "readdir_5000")
    for op in ops:
        ratio = result[f"{op}_over_native"]
        print(f"{'target ' + op + ' <= 2x':>28}: {'met' if ratio <= 2 else 'MISSED'} "
              f"({ratio:.2f}x)")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "bench_fuse.json").write_text(json.dumps(result, indent=2))
    return 0 if ok_speed and ok_rss else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

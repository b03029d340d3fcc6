"""Peak memory of the local store while ingesting and reading a 1 GiB file.

Each scenario runs in a fresh child process. The child imports everything
and opens the store, takes its resident size as "idle" (VmRSS), resets the
peak (``/proc/self/clear_refs`` 5; when that is not allowed the peak since
start counts, which can only overstate), runs the scenario, and reports
VmHWM minus idle. Target: at most 64 MiB above idle.

Scenarios:

- ``ingest``: ``ingest_path`` of the file into a fresh ``local://`` store
  (the bulk put_files path),
- ``write``: the file streamed through ``BlobService.open_write`` in 1 MiB
  writes (the generic writer path),
- ``read``: a sequential, verified ``BlobReader`` over the stored blob,
- ``verify``: ``LocalStore.verify_blob``.

Rerun: ``.venv/bin/python -m bench bench_castore_memory`` or
``.venv/bin/python -m bench.bench_castore_memory --size-mib 1024``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64
SCENARIOS = ("ingest", "read", "verify", "write")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _child(scenario: str, store_dir: Path, path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from stages.castore.addresses import open_castore
    from stages.castore.ingest import ingest_path
    from stages.castore.local import open_local_store

    address = f"local://{store_dir}"
    castore = open_castore(address, address)
    store = open_local_store(store_dir)  # the same store object the services use

    async def run() -> dict:
        digest_file = store_dir / "bench-digest"
        idle = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        start = time.perf_counter()
        if scenario == "ingest":
            node = await ingest_path(castore, path)
            digest_file.write_text(node.digest.hex())
        elif scenario == "write":
            writer = castore.blobs.open_write()
            fd = os.open(path, os.O_RDONLY)
            try:
                async with writer:
                    while chunk := os.read(fd, 1 << 20):
                        await writer.write(chunk)
                    await writer.close()
            finally:
                os.close(fd)
        elif scenario == "read":
            digest = bytes.fromhex(digest_file.read_text())
            async with await castore.blobs.open_read(digest) as reader:
                while await reader.read():
                    pass
        elif scenario == "verify":
            await asyncio.to_thread(store.verify_blob, bytes.fromhex(digest_file.read_text()))
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
        return {"scenario": scenario, "idle_kib": idle, "peak_kib": peak,
                "delta_mib": (peak - idle) / 1024, "seconds": seconds,
                "gb_per_s": path.stat().st_size / seconds / 1e9}

    print(json.dumps(asyncio.run(run())))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_castore_memory")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=args.work))
    results = []
    try:
        path = work / "big"
        block = os.urandom(4 << 20)
        with open(path, "wb") as f:
            for i in range(args.size_mib // 4):
                f.write(i.to_bytes(8, "big") + block[8:])
            os.fsync(f.fileno())  # its writeback must not compete with the scenarios
        store = work / "store"
        for scenario in SCENARIOS:
            if scenario == "write":
                shutil.rmtree(store)  # a fresh store, so the blob is really written again
            proc = subprocess.run([sys.executable, "-m", "bench.bench_castore_memory", "--child",
                                   scenario, str(store), str(path)],
                                  cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{scenario} failed:\n{proc.stderr}", file=sys.stderr)
                return 1
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = 0.0
    print(f"file: {args.size_mib} MiB; peak above idle (limit {LIMIT_MIB} MiB)")
    for r in results:
        worst = max(worst, r["delta_mib"])
        print(f"  {r['scenario']:7s} idle {r['idle_kib'] / 1024:6.1f} MiB  peak "
              f"{r['peak_kib'] / 1024:6.1f} MiB  +{r['delta_mib']:5.1f} MiB  "
              f"{r['seconds']:6.2f} s  {r['gb_per_s']:5.2f} GB/s")
    print(f"  worst +{worst:.1f} MiB: {'met' if worst <= LIMIT_MIB else 'NOT met'}")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "castore_memory.json").write_text(json.dumps(results, indent=2))
    return 0 if worst <= LIMIT_MIB else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Blob upload and download over gRPC on a unix socket, beside the local store.

The server is ``python -m stages.castore.grpc_server`` in its own process
(as ``ocibuild serve`` would be); the client streams one blob of ``--size-mib``
(default 512) through :class:`GrpcBlobService` (upload: ``open_write`` in
1 MiB writes; download: a verified ``open_read``). Beside it, the same blob
through the local store in this process (``LocalBlobService``). Two back
ends on the server side: ``memory://`` (the transport alone) and ``local://``
(what a real server does: pack writes, fdatasync, verify on read).
Target: at least 500 MB/s each way over the socket. Runs after the first
upload a blob the store already has (the bytes still cross and are hashed;
the store then drops them), so ``--runs 1`` gives the cold number.

Rerun: ``.venv/bin/python -m bench grpc_castore`` or
``.venv/bin/python -m bench.bench_grpc_castore --size-mib 512 --runs 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_MBS = 500.0


async def _through(castore, data: bytes, step: int = 1 << 20) -> tuple[float, float]:
    view = memoryview(data)
    start = time.perf_counter()
    writer = castore.blobs.open_write()
    async with writer:
        for i in range(0, len(data), step):
            await writer.write(view[i:i + step])
        digest = await writer.close()
    up = time.perf_counter() - start
    start = time.perf_counter()
    async with await castore.blobs.open_read(digest) as reader:
        while await reader.read(step):
            pass
    down = time.perf_counter() - start
    return len(data) / up / 1e6, len(data) / down / 1e6


def _server(backend: str, sock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.castore.grpc_server", "--listen", f"unix://{sock}",
         "--blob-service-addr", backend, "--directory-service-addr", backend],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if not proc.stdout.readline():
        raise RuntimeError("castore server did not start")
    return proc


async def _run(size: int, runs: int, work: Path) -> dict:
    from stages.castore.addresses import open_castore

    data = os.urandom(size)
    results: dict[str, list[tuple[float, float]]] = {}
    local = f"local://{work}/local"
    cs = open_castore(local, local)
    results["local store (in process)"] = [await _through(cs, data) for _ in range(runs)]
    for name, backend in (("grpc, server on memory://", "memory://"),
                          ("grpc, server on local://", f"local://{work}/remote")):
        sock = work / "c.sock"
        proc = _server(backend, sock)
        try:
            client = open_castore(f"grpc+unix://{sock}", f"grpc+unix://{sock}")
            results[name] = [await _through(client, data) for _ in range(runs)]
            await client.aclose()
        finally:
            proc.terminate()
            proc.wait()
            sock.unlink(missing_ok=True)
    return {name: {"upload_MBps": statistics.median(u for u, _ in r),
                   "download_MBps": statistics.median(d for _, d in r)}
            for name, r in results.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_grpc_castore")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bgc-", dir="/tmp"))
    try:
        table = asyncio.run(_run(args.size_mib << 20, args.runs, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    local = table["local store (in process)"]
    print(f"blob of {args.size_mib} MiB, median of {args.runs} runs, MB/s:")
    print(f"{'':28s} {'upload':>9s} {'download':>9s} {'up/local':>9s} {'down/local':>10s}")
    ok = True
    for name, row in table.items():
        print(f"{name:28s} {row['upload_MBps']:9.0f} {row['download_MBps']:9.0f} "
              f"{row['upload_MBps'] / local['upload_MBps']:9.2f} "
              f"{row['download_MBps'] / local['download_MBps']:10.2f}")
        if name.startswith("grpc"):
            ok &= row["upload_MBps"] >= TARGET_MBS and row["download_MBps"] >= TARGET_MBS
    print(f"target >= {TARGET_MBS:.0f} MB/s each way over the socket: "
          f"{'met' if ok else 'NOT met'}")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "grpc_castore.json").write_text(json.dumps(
        {"size_mib": args.size_mib, "runs": args.runs, "results": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

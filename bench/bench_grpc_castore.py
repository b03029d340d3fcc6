"""Blob upload and download over gRPC on a unix socket, beside the local store.

The server is ``python -m stages.grpc.castore_server`` in its own process
(as ``ocibuild serve`` would be); the client streams one blob of ``--size-mib``
(default 512) through :class:`GrpcBlobService` (upload: ``open_write`` in
``--write-mib`` writes, 4 by default; download: a verified ``open_read``).
Beside it, the same blob through the local store in this process
(``LocalBlobService``), and the bare transport: grpc.aio moving messages of
raw bytes (no hashing, no store) in a server process of its own, the ceiling
for anything built on it. Two back ends on the castore server: ``memory://``
(the transport plus hashing) and ``local://`` (what a real server does: pack
writes, fdatasync, verify on read).

Target: at least 500 MB/s each way over the socket. Runs after the first
upload a blob the store already has (the bytes still cross and are hashed;
the store then drops them), so ``--runs 1`` gives the cold number.

Besides MB/s (wall time, noisy on a shared machine) it reports CPU seconds
per GiB moved, of the client process and of the server process (all their
threads: user + system), which are steadier; and the load average at the
start and the end.

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
GIB = 1 << 30
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) of a process; ours if None."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class _Meter:
    """Wall time and CPU of this process and of a server process over a block."""

    def __init__(self, server_pid: int | None, size: int) -> None:
        self.server_pid = server_pid
        self.size = size

    def __enter__(self) -> _Meter:
        self.t0 = time.perf_counter()
        self.c0 = _cpu(None)
        self.s0 = _cpu(self.server_pid) if self.server_pid else 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.client = _cpu(None) - self.c0
        self.server = (_cpu(self.server_pid) - self.s0) if self.server_pid else 0.0

    def row(self) -> dict:
        per_gib = GIB / self.size
        return {"MBps": self.size / self.wall / 1e6,
                "client_cpu_s_per_GiB": self.client * per_gib,
                "server_cpu_s_per_GiB": self.server * per_gib}


async def _through(castore, data: bytes, step: int, server_pid: int | None) -> dict:
    view = memoryview(data)
    with _Meter(server_pid, len(data)) as up:
        writer = castore.blobs.open_write()
        async with writer:
            for i in range(0, len(data), step):
                await writer.write(view[i:i + step])
            digest = await writer.close()
    with _Meter(server_pid, len(data)) as down:
        async with await castore.blobs.open_read(digest) as reader:
            while await reader.read(step):
                pass
    return {"upload": up.row(), "download": down.row()}


# --- the bare transport: raw bytes both ways, no hashing, no store ------------

_BARE_SERVER = r"""
import asyncio, sys, grpc
from stages.grpc.wire import SERVER_OPTIONS, tune_malloc

async def put(it, context):
    n = 0
    async for m in it:
        n += len(m)
    return n.to_bytes(8, "big")

async def read(request, context):
    size, chunk = int.from_bytes(request[:8], "big"), int.from_bytes(request[8:], "big")
    block = b"\0" * chunk
    for i in range(0, size, chunk):
        await context.write(block[:min(chunk, size - i)])

async def main():
    tune_malloc()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bare", {
        "Put": grpc.stream_unary_rpc_method_handler(put),
        "Read": grpc.unary_stream_rpc_method_handler(read)}),))
    server.add_insecure_port(sys.argv[1])
    await server.start()
    print("1", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


async def _bare(sock: Path, data: bytes, chunk: int, server_pid: int) -> dict:
    import grpc

    from stages.grpc.wire import CHANNEL_OPTIONS, tune_malloc

    tune_malloc()
    async with grpc.aio.insecure_channel(f"unix://{sock}", options=CHANNEL_OPTIONS) as ch:
        await ch.channel_ready()
        view = memoryview(data)
        put = ch.stream_unary("/bare/Put")
        read = ch.unary_stream("/bare/Read")
        with _Meter(server_pid, len(data)) as up:
            call = put()
            for i in range(0, len(data), chunk):
                await call.write(bytes(view[i:i + chunk]))
            await call.done_writing()
            assert int.from_bytes(await call, "big") == len(data)
        with _Meter(server_pid, len(data)) as down:
            got = 0
            async for m in read(len(data).to_bytes(8, "big") + chunk.to_bytes(8, "big")):
                got += len(m)
            assert got == len(data)
    return {"upload": up.row(), "download": down.row()}


def _start(argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if not proc.stdout.readline():
        proc.wait()
        raise RuntimeError(f"server {argv[:2]} did not start (exit {proc.returncode})")
    return proc


def _castore_server(backend: str, sock: Path) -> subprocess.Popen:
    return _start(["-m", "stages.grpc.castore_server", "--listen", f"unix://{sock}",
                   "--blob-service-addr", backend, "--directory-service-addr", backend])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _run(size: int, runs: int, step: int, work: Path, only: set[str]) -> dict:
    from stages.castore.addresses import open_castore
    from stages.grpc.wire import CHUNK

    data = os.urandom(size)
    results: dict[str, list[dict]] = {}
    if not only or "local" in only:
        local = f"local://{work}/local"
        cs = open_castore(local, local)
        results["local store (in process)"] = [
            await _through(cs, data, step, None) for _ in range(runs)]
    sock = work / "c.sock"
    if not only or "bare" in only:
        proc = _start(["-c", _BARE_SERVER, f"unix://{sock}"])
        try:
            results[f"bare grpc.aio, {CHUNK >> 20} MiB msgs"] = [
                await _bare(sock, data, CHUNK, proc.pid) for _ in range(runs)]
        finally:
            _stop(proc)
            sock.unlink(missing_ok=True)
    for key, name, backend in (("memory", "grpc, server on memory://", "memory://"),
                               ("remote", "grpc, server on local://",
                                f"local://{work}/remote")):
        if only and key not in only:
            continue
        proc = _castore_server(backend, sock)
        try:
            client = open_castore(f"grpc+unix://{sock}", f"grpc+unix://{sock}")
            results[name] = [await _through(client, data, step, proc.pid)
                             for _ in range(runs)]
            await client.aclose()
        finally:
            _stop(proc)
            sock.unlink(missing_ok=True)
    table = {}
    for name, rs in results.items():
        table[name] = {direction: {k: statistics.median(r[direction][k] for r in rs)
                                   for k in rs[0][direction]}
                       for direction in ("upload", "download")}
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_grpc_castore")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write-mib", type=int, default=4,
                        help="size of each write/read call of the client (MiB)")
    parser.add_argument("--only", action="append", default=[],
                        choices=["local", "bare", "memory", "remote"],
                        help="run only these rows (repeatable)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bgc-", dir="/tmp"))
    load0 = os.getloadavg()
    try:
        table = asyncio.run(_run(args.size_mib << 20, args.runs, args.write_mib << 20,
                                 work, set(args.only)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    print(f"blob of {args.size_mib} MiB, {args.write_mib} MiB per call, median of "
          f"{args.runs} runs; load average {load0[0]:.2f} -> {load1[0]:.2f} on "
          f"{os.cpu_count()} cores")
    print(f"{'':30s} {'up MB/s':>8s} {'cli s/GiB':>9s} {'srv s/GiB':>9s}  "
          f"{'down MB/s':>9s} {'cli s/GiB':>9s} {'srv s/GiB':>9s}")
    ok = True
    for name, row in table.items():
        up, down = row["upload"], row["download"]
        print(f"{name:30s} {up['MBps']:8.0f} {up['client_cpu_s_per_GiB']:9.2f} "
              f"{up['server_cpu_s_per_GiB']:9.2f}  {down['MBps']:9.0f} "
              f"{down['client_cpu_s_per_GiB']:9.2f} {down['server_cpu_s_per_GiB']:9.2f}")
        if name.startswith("grpc"):
            ok &= up["MBps"] >= TARGET_MBS and down["MBps"] >= TARGET_MBS
    print(f"target >= {TARGET_MBS:.0f} MB/s each way over the socket: "
          f"{'met' if ok else 'NOT met'}")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "grpc_castore.json").write_text(json.dumps(
        {"size_mib": args.size_mib, "runs": args.runs, "write_mib": args.write_mib,
         "loadavg": [load0, load1], "results": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

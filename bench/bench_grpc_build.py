"""Remote build latency over a unix socket, beside the same build run locally.

A trivial build (a static busybox input, ``sh -c 'echo N > out'``), measured
in one run, interleaved so that load drifts hit both columns alike:

- local: ``OciBuildService.do_build`` in this process (service started,
  warm), median of ``--runs``;
- remote: ``GrpcBuildService.do_build`` against ``ocibuild serve`` in a
  subprocess on a unix socket (same kind of local store, inputs already
  there), median of ``--runs``;
- remote + upload check: :func:`stages.grpc.remote.remote_build` (asks the
  server's castore for each input first, nothing to send), median.

Target (issue 6): remote <= 1.3x local. Rerun:
``.venv/bin/python -m bench grpc_build`` or
``.venv/bin/python -m bench.bench_grpc_build --runs 30``. Needs root, runc,
/dev/fuse, /bin/busybox. Results go to bench/results/grpc_build.json.

Caveats: 2 shared cores; the server process competes with this one for
them. Rerun on a quiet machine before drawing conclusions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BB_NAME = "0bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox"
BB = f"/nix/store/{BB_NAME}"


def _request(bb_node, n: int):
    from stages.request import BuildConstraints, BuildRequest, EnvVar

    return BuildRequest(
        inputs=[bb_node], command_args=[f"{BB}/sh", "-c", f"echo {n} > /nix/store/out"],
        working_dir="build", scratch_paths=["build", "nix/store"], inputs_dir="nix/store",
        outputs=["nix/store/out"], environment_vars=[EnvVar(key="PATH", value=BB.encode())],
        constraints=BuildConstraints(system="x86_64-linux"))


def _start_server(base: Path, sock: Path, store: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("BUILD_SERVICE_ADDR", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.cli", "serve", "--listen", f"unix://{sock}",
         "--state-dir", str(base / "server-state"), "--blob-service-addr", store,
         "--directory-service-addr", store, "--jobs", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("ocibuild: serving on"):
        proc.kill()
        raise RuntimeError(f"ocibuild serve did not start (rc {proc.wait()})")
    return proc


async def _measure(base: Path, runs: int, warmup: int) -> dict:
    from stages.castore.addresses import open_castore
    from stages.castore.ingest import ingest_path
    from stages.grpc.build_service import GrpcBuildService
    from stages.grpc.remote import remote_build
    from stages.service import OciBuildService

    bb = base / "inputs" / BB_NAME
    bb.mkdir(parents=True)
    shutil.copy2("/bin/busybox", bb / "busybox")
    (bb / "sh").symlink_to("busybox")
    store = f"local://{base}/store"
    castore = open_castore(store, store)
    try:
        bb_node = await ingest_path(castore, bb)
    finally:
        await castore.aclose()

    sock = base / "serve.sock"
    address = f"grpc+unix://{sock}"
    server = await asyncio.to_thread(_start_server, base, sock, store)
    local_t: list[float] = []
    remote_t: list[float] = []
    upload_t: list[float] = []
    try:
        async with OciBuildService(base / "local-state", blob_address=store,
                                   directory_address=store, jobs=2) as svc:
            client = GrpcBuildService(address)
            client_store = open_castore(store, store)
            remote_store = open_castore(address, address)
            try:
                n = 0
                for i in range(warmup + runs):
                    for kind, column in (("local", local_t), ("remote", remote_t),
                                         ("upload", upload_t)):
                        n += 1
                        req = _request(bb_node, n)
                        start = time.perf_counter()
                        if kind == "local":
                            await svc.do_build(req)
                        elif kind == "remote":
                            await client.do_build(req)
                        else:
                            await remote_build(req, local=client_store, remote_build=client,
                                               remote_castore=remote_store, fetch_outputs=False)
                        if i >= warmup:
                            column.append(time.perf_counter() - start)
            finally:
                await client.aclose()
                await remote_store.aclose()
                await client_store.aclose()
    finally:
        server.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(server.wait, 30)
        if rc != 0:
            print(f"warning: ocibuild serve exited {rc}", file=sys.stderr)
    local, remote, upload = (statistics.median(t) for t in (local_t, remote_t, upload_t))
    return {"runs": runs, "local_median_s": local, "remote_median_s": remote,
            "remote_with_upload_check_median_s": upload, "ratio_remote_local": remote / local,
            "ratio_upload_local": upload / local, "target_ratio": 1.3}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_grpc_build", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="ocibuild-bench-grpc-build-"))
    os.chmod(base, 0o711)
    try:
        result = asyncio.run(_measure(base, args.runs, args.warmup))
    finally:
        for mnt in base.glob("*state/instances/*/mnt"):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    print(f"trivial build, median of {result['runs']}:")
    print(f"  local  (OciBuildService.do_build, in-process) {result['local_median_s'] * 1e3:7.1f} ms")
    print(f"  remote (GrpcBuildService over unix socket)    {result['remote_median_s'] * 1e3:7.1f} ms"
          f"  {result['ratio_remote_local']:.2f}x local (target <= 1.3x)")
    print(f"  remote_build (+ input check on the server)    "
          f"{result['remote_with_upload_check_median_s'] * 1e3:7.1f} ms"
          f"  {result['ratio_upload_local']:.2f}x local")
    out = REPO / "bench" / "results" / "grpc_build.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ratio_remote_local"] <= 1.3 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

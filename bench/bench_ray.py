"""Ray's cost per build: 50 trivial derivations through Ray beside the local service, same run.

A cluster on this machine (:class:`stages.cluster.local.LocalCluster`:
separate raylets, each ``ocibuild`` = 2) and a shared castore
(``ocibuild serve`` on loopback, ``local://`` behind it). Each round
instantiates new derivations (a fresh nonce: everything really builds)
whose builder is a static busybox ``echo $i > $out``, and builds them with
:func:`stages.nix.build.build_derivations` at jobs 2, timed in-process from
the first build to the last registration (the services are started before
the clock starts; their start is reported apart):

- ``local``: an :class:`~stages.service.OciBuildService` on this machine,
  over the same shared castore (so the store's own cost is in both);
- ``ray-1``: :class:`~stages.cluster.service.RayBuildService` over one node;
- ``ray-2``: the same over two nodes.

Local and Ray alternate within each round; medians of ``--runs``. Reported:
the added wall time per build, ``(ray - local) / drvs`` (goal: at most
5 ms at jobs 2), and Ray's start (connect, one actor per node, their
services up).

Rerun: ``.venv/bin/python -m bench ray`` or
``.venv/bin/python -m bench.bench_ray --runs 5 --drvs 50``.
Results go to bench/results/ray.json.

Caveats: 2 shared cores, both nodes on the same machine (two nodes add
slots here, not cores: on real machines, see README). Outputs and .drv
files made by a run are deleted from the Nix store afterwards.
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

from bench.bench_nix import EXPR, NIX_ENV, _delete, _instantiate

REPO = Path(__file__).resolve().parent.parent
GOAL_MS = 5.0


async def _timed(drvs: list[str], service, castore, pathinfo, runs_dir: Path) -> float:
    from stages.nix.build import build_derivations

    start = time.perf_counter()
    results = await build_derivations(drvs, service=service, pathinfo=pathinfo, jobs=2,
                                      castore=castore, runs_dir=runs_dir)
    took = time.perf_counter() - start
    bad = [r.error for r in results.values() if not r.ok]
    if bad:
        raise SystemExit(f"builds failed: {bad[:3]}")
    return took


async def _measure(work: Path, store: str, runs: int, n: int, made: list[str]) -> dict:
    from stages.castore.addresses import open_castore
    from stages.cluster.service import RayBuildService
    from stages.nix.pathinfo import PathInfoDB
    from stages.service import OciBuildService

    castore = open_castore(store, store)
    local = OciBuildService(work / "local-state", blob_address=store, directory_address=store,
                            jobs=2)
    began = time.perf_counter()
    ray = RayBuildService("ray://auto", blob_address=store, directory_address=store)
    await ray.start()
    ray_start = time.perf_counter() - began
    out: dict = {"ray_start_s": ray_start, "local_s": [], "ray_s": []}
    try:
        async with local:
            with PathInfoDB(work / "pathinfo.sqlite") as pi:
                warm = _instantiate(work, 2)
                made += warm
                await _timed(warm, local, castore, pi, work / "runs")  # imports busybox
                warm = _instantiate(work, 4)
                made += warm
                await _timed(warm, ray, castore, pi, work / "runs")  # every node's cache
                for run in range(runs):
                    a, b = _instantiate(work, n), _instantiate(work, n)
                    made += a + b
                    order = [("local", a), ("ray", b)] if run % 2 == 0 else [("ray", b),
                                                                            ("local", a)]
                    for who, drvs in order:
                        svc = local if who == "local" else ray
                        out[f"{who}_s"].append(await _timed(drvs, svc, castore, pi,
                                                            work / "runs"))
                    print(f"  run {run}: local {out['local_s'][-1]:.2f} s, "
                          f"ray {out['ray_s'][-1]:.2f} s", flush=True)
        out["nodes"] = {k[:12]: {"built": v["built"], "fetched": v["fetched"],
                                 "seconds": {s: round(t, 2) for s, t in v["seconds"].items()}}
                        for k, v in (await ray.stats()).items()}
    finally:
        await ray.aclose()
        await castore.aclose()
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_ray")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--drvs", type=int, default=50)
    args = ap.parse_args(argv)
    if shutil.which("nix-build") is None or not (REPO / ".nix" / "nix.conf").exists():
        print("skipped: nix-build or .nix/nix.conf missing (make nix-setup)")
        return 0
    try:
        import ray  # noqa: F401
    except ImportError:
        print("skipped: ray is not installed (pip install 'ocibuild[ray]')")
        return 0
    from stages.cluster.local import LocalCluster, free_port

    work = Path(tempfile.mkdtemp(prefix="ocb-bray-", dir="/tmp"))  # short: Ray's sockets
    work.chmod(0o711)
    made: list[str] = []
    cluster = LocalCluster(work, nodes=2, jobs=2)
    port = free_port()
    shared = f"local://{work}/shared"
    serve = subprocess.Popen(
        [sys.executable, "-m", "stages.cli", "serve", "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(work / "serve-state"), "--blob-service-addr", shared,
         "--directory-service-addr", shared, "--no-prune"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=NIX_ENV)
    result: dict = {"drvs": args.drvs, "runs": args.runs, "goal_ms_per_build": GOAL_MS}
    try:
        assert serve.stdout is not None and "serving on" in serve.stdout.readline()
        store = f"grpc+http://127.0.0.1:{port}"
        (work / "bbdir").mkdir()
        shutil.copy2("/bin/busybox", work / "bbdir" / "busybox")
        (work / "drvs.nix").write_text(EXPR)
        os.environ.update(cluster.env)
        os.environ.update(NIX_ENV)
        ok = True
        for nodes in (1, 2):
            cluster.start_node(nodes - 1)
            print(f"ray-{nodes}: {nodes} node(s) of 2 slots", flush=True)
            m = asyncio.run(_measure(work, store, args.runs, args.drvs, made))
            local_m, ray_m = statistics.median(m["local_s"]), statistics.median(m["ray_s"])
            added = (ray_m - local_m) / args.drvs * 1000
            m.update(local_median_s=local_m, ray_median_s=ray_m, added_ms_per_build=added)
            result[f"ray-{nodes}"] = m
            ok &= added <= GOAL_MS
            print(f"{args.drvs} trivial derivations, jobs 2, {nodes} node(s): local "
                  f"{local_m:.2f} s, ray {ray_m:.2f} s: {added:+.1f} ms per build "
                  f"(goal <= {GOAL_MS:g} ms); ray start {m['ray_start_s']:.2f} s; "
                  f"per node {m['nodes']}", flush=True)
        out = REPO / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / "ray.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0 if ok else 1
    finally:
        cluster.stop()
        serve.terminate()
        serve.wait(30)
        if made:
            _delete(made)
        for line in Path("/proc/mounts").read_text().splitlines():  # after a failure
            if str(work) in line.split()[1]:
                subprocess.run(["umount", "-l", line.split()[1]], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

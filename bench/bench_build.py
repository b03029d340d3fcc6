"""Build latency and throughput: ocibuild beside its bare runtime (``runc run``, ``bwrap``) and ``nix-build``.

``--runtime runc|bwrap|both`` (``oci`` is runc): each runtime's builds beside
the same bundles run by that runtime alone (bare bwrap: the bundle's
config.json rendered as the bwrap runtime renders it, run by ``setpriv``
and ``bwrap``, without the service's launcher and cgroup). Targets with
bwrap: warm latency <= 3x bare bwrap, batch <= 1.3x.

A trivial build: one small input (a directory with a static busybox and a
data file), one output; the builder is that busybox running
``sh -c 'echo $N > out'``. Measured in one process, in one run:

1. Warm latency: ``OciBuildService.do_build`` of the build (service started,
   a few warm-up builds done), median of ``--runs``; beside it a bare
   ``runc run`` of an equivalent bundle (made once with
   :func:`stages.bundle.write_bundle`: the same kind of config.json, rootfs
   and scratch, the input a plain directory instead of FUSE), median of
   ``--runs``; and ``nix-build`` of one new trivial derivation (eval +
   sandboxed build). Target: ocibuild <= 2x bare runc.
2. Throughput: ``--builds`` independent builds with ``jobs=2`` as one graph
   (``svc.run_builds``, what ``ocibuild build --jobs 2 REQUEST...`` does),
   ``--rounds`` times, each round followed at once by the same number of
   bare ``runc run`` of prepared bundles, two at a time; the ratio is the
   median of the rounds' ratios (pairs measured side by side are less at
   the mercy of this shared machine than two separate medians). Beside them,
   once: the builds as concurrent ``do_build`` calls (a run each), and
   ``nix-build`` of as many new derivations with ``--max-jobs 2``.
   Target: ocibuild <= 1.3x bare runc.
3. Where the time goes: per-stage wall time from the runs' stage outcomes
   (``StageOutcome.started/ended``), the scheduler's share (build wall time
   minus the stages), process CPU per build, and a cProfile of warm builds
   (top functions by own time).

Rerun: ``.venv/bin/python -m bench build`` (all of it) or
``.venv/bin/python -m bench.bench_build --runs 30 --builds 50 --rounds 3
[--no-nix] [--no-profile]``. Needs root, runc, /dev/fuse, /bin/busybox; nix-build
with the repo's .nix/nix.conf for the Nix column. Results go to
bench/results/build.json.

Caveats: the machine has 2 cores shared with other work; medians are noisy
under load, rerun on a quiet machine before drawing conclusions. Nix
derivations get a fresh nonce each run (else nix-build returns at once);
their outputs stay in /nix/store until garbage-collected.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NIX_ENV = dict(os.environ, NIX_CONF_DIR=str(REPO / ".nix"), NIX_REMOTE="local")
STAGES = ("validate", "spec", "bundle", "mount", "run", "ingest", "teardown")


def _request(tools, n: int):
    from stages.request import BuildConstraints, BuildRequest, EnvVar

    return BuildRequest(
        inputs=[tools],
        command_args=["/nix/store/tools/busybox", "sh", "-c", "echo $N > out"],
        working_dir="build", scratch_paths=["build"], inputs_dir="nix/store",
        outputs=["build/out"],
        environment_vars=[EnvVar(key="N", value=str(n).encode())],
        constraints=BuildConstraints(system="x86_64-linux"))


def _make_tools(work: Path) -> Path:
    tools = work / "tools"
    tools.mkdir(mode=0o755)
    shutil.copy2("/bin/busybox", tools / "busybox")
    (tools / "data").write_text("a small input\n")
    return tools


# --- bare runc -------------------------------------------------------------------


def _bare_bundles(work: Path, tools_dir: Path, tools_node, count: int) -> list[Path]:
    """Bundles as the service writes them, the input bound from a plain directory."""
    from stages.bundle import write_bundle
    from stages.oci.idmap import load_idmap

    idmap = load_idmap()
    root = work / "bare"
    root.mkdir(mode=0o711)
    out = []
    for i in range(count):
        layout = write_bundle(root / f"b{i}", _request(tools_node, i), idmap=idmap,
                              input_paths={b"tools": tools_dir})
        out.append(layout.root)
    return out


def _bare_run(runc_root: Path, bundle: Path) -> float:
    cid = "bench-" + secrets.token_hex(6)
    start = time.perf_counter()
    proc = subprocess.run(["runc", "--root", str(runc_root), "run", "--bundle", str(bundle), cid],
                          stdin=subprocess.DEVNULL, capture_output=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"bare runc run failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return took


def _bare_bwrap_run(bundle: Path) -> float:
    """The bundle's config.json as bwrap runs it (the same rendering as the
    bwrap runtime's, seccomp included), as the build user's host ids: bwrap
    alone, without the service's launcher and cgroup."""
    from stages.oci.bwrap import bwrap_argv, compile_seccomp
    from stages.oci.idmap import BUILD_GID, BUILD_UID, load_idmap

    config = json.loads((bundle / "config.json").read_text())
    idmap = load_idmap()
    bpf = bundle / "seccomp.bpf"
    if not bpf.exists():
        bpf.write_bytes(compile_seccomp(config["linux"]["seccomp"]))
    fd = os.open(bpf, os.O_RDONLY)
    try:
        argv = ["setpriv", f"--reuid={idmap.host_uid(BUILD_UID)}",
                f"--regid={idmap.host_gid(BUILD_GID)}", "--clear-groups", "--",
                *bwrap_argv(config, bundle, seccomp_fd=fd)]
        start = time.perf_counter()
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, pass_fds=(fd,))
        took = time.perf_counter() - start
    finally:
        os.close(fd)
    if proc.returncode != 0:
        raise RuntimeError(f"bare bwrap failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return took


def _bare_latency(runc_root: Path, bundle: Path, runs: int) -> list[float]:
    _bare_run(runc_root, bundle)  # warm-up
    return [_bare_run(runc_root, bundle) for _ in range(runs)]


def _bare_batch(runc_root: Path | None, bundles: list[Path], jobs: int,
                runtime: str = "runc") -> float:
    """Every bundle by the bare runtime, ``jobs`` at a time (bwrap needs no
    ``runc_root``)."""
    if runtime == "bwrap":
        run = _bare_bwrap_run
    else:
        assert runc_root is not None
        run = lambda b: _bare_run(runc_root, b)
    start = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(run, bundles))
    return time.perf_counter() - start


# --- nix-build ---------------------------------------------------------------------

NIX_EXPR = """{ nonce, count }:
let bbd = builtins.path { path = ./bbdir; name = "busybox"; };
    mk = i: derivation {
      name = "t-${nonce}-${i}";
      system = builtins.currentSystem;
      builder = "${bbd}/busybox";
      args = [ "sh" "-c" "echo ${i} > $out" ];
    };
in map mk (builtins.genList toString (builtins.fromJSON count))
"""


def _nix_setup(work: Path) -> Path:
    d = work / "nix"
    (d / "bbdir").mkdir(parents=True)
    shutil.copy2("/bin/busybox", d / "bbdir" / "busybox")
    (d / "default.nix").write_text(NIX_EXPR)
    return d


def _nix_build(d: Path, count: int, jobs: int) -> float:
    nonce = secrets.token_hex(6)
    start = time.perf_counter()
    proc = subprocess.run(["nix-build", str(d / "default.nix"), "--no-out-link",
                           "--max-jobs", str(jobs), "--argstr", "nonce", nonce,
                           "--argstr", "count", str(count)],
                          env=NIX_ENV, capture_output=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"nix-build failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    lines = proc.stdout.split()
    if len(lines) != count:
        raise RuntimeError(f"nix-build built {len(lines)} outputs, expected {count}")
    return took


# --- ocibuild ----------------------------------------------------------------------


def _stage_times(runs_dir: Path, run_dirs: list[Path]) -> dict[str, list[float]]:
    """Per-stage wall times, the scheduler's share, and each build's span, in ms."""
    from pipeline import load_run

    out: dict[str, list[float]] = {s: [] for s in (*STAGES, "between stages", "span")}
    for d in run_dirs:
        run = load_run(d)
        spans = []
        total = 0.0
        for name, o in run.stages.items():
            stage = name.split("/")[-1]
            if o.duration is None:
                continue
            out[stage].append(o.duration * 1000)
            total += o.duration
            spans.append((o.started, o.ended))
        if spans:
            span = max(e for _, e in spans) - min(s for s, _ in spans)
            out["span"].append(span * 1000)
            out["between stages"].append((span - total) * 1000)
    return out


async def _ocibuild(work: Path, tools_node, store: str, args, bare=None,
                    runtime: str = "runc") -> dict:
    from stages.service import OciBuildService

    res: dict = {}
    async with OciBuildService(work / f"state-{runtime}", blob_address=store,
                               directory_address=store, jobs=args.jobs, runtime=runtime) as svc:
        runs_dir = svc.runs_dir
        for i in range(3):  # warm-up
            await svc.do_build(_request(tools_node, i))
        before = set(runs_dir.iterdir())
        lat, cpu = [], []
        for i in range(args.runs):
            c0, t0 = time.process_time(), time.perf_counter()
            await svc.do_build(_request(tools_node, 1000 + i))
            lat.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        res["latency"] = lat
        res["cpu_per_build"] = cpu
        res["stages"] = _stage_times(runs_dir, sorted(set(runs_dir.iterdir()) - before))

        res["batch_graph"] = []
        for r in range(args.rounds):
            reqs = [_request(tools_node, 2000 + 100 * r + i) for i in range(args.builds)]
            t0 = time.perf_counter()
            run, specs = await svc.run_builds(reqs)
            res["batch_graph"].append(time.perf_counter() - t0)
            if run.status.value != "finished":
                raise RuntimeError(f"the batch run ended {run.status.value}: {run.run_dir}")
            res["batch_graph_stages"] = _stage_times(runs_dir, [run.run_dir])
            await svc.host.drain()  # the last bundles' deletion: not the next round's
            if bare is not None:
                res.setdefault("bare_batch", []).append(await asyncio.to_thread(bare))

        reqs = [_request(tools_node, 3000 + i) for i in range(args.builds)]
        t0 = time.perf_counter()
        await asyncio.gather(*(svc.do_build(r) for r in reqs))
        res["batch_do_build"] = time.perf_counter() - t0

        if args.profile:
            prof = cProfile.Profile()
            c0, t0 = time.process_time(), time.perf_counter()
            prof.enable()
            for i in range(args.profile):
                await svc.do_build(_request(tools_node, 4000 + i))
            prof.disable()
            wall, cpu_p = time.perf_counter() - t0, time.process_time() - c0
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
            ours = io.StringIO()
            # cumtime of a coroutine counts its CPU between awaits, not its waits.
            pstats.Stats(prof, stream=ours).sort_stats("cumulative").print_stats(
                str(REPO) + "/(stages|pipeline)/", 20)
            res["profile"] = {"builds": args.profile, "wall": wall, "cpu": cpu_p,
                              "top": s.getvalue(), "ours": ours.getvalue()}
    return res


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_build")
    parser.add_argument("--runs", type=int, default=30, help="latency samples (default 30)")
    parser.add_argument("--builds", type=int, default=50, help="builds per batch (default 50)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="batches of ocibuild, each followed by one of bare runc (default 3)")
    parser.add_argument("--profile", type=int, default=10,
                        help="builds under cProfile (0: none; default 10)")
    parser.add_argument("--no-profile", dest="profile", action="store_const", const=0)
    parser.add_argument("--no-nix", action="store_true", help="skip the nix-build columns")
    parser.add_argument("--runtime", choices=["oci", "runc", "bwrap", "both"], default="both",
                        help="runc (oci) and/or bwrap, each beside its bare runtime "
                             "(default both)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_build: needs root (runc with user namespaces, FUSE)", file=sys.stderr)
        return 1
    args.runtimes = {"oci": ["runc"], "runc": ["runc"], "bwrap": ["bwrap"],
                     "both": ["runc", "bwrap"]}[args.runtime]
    for tool in (*args.runtimes, *(() if args.no_nix else ("nix-build",))):
        if shutil.which(tool) is None:
            print(f"bench_build: {tool} is missing (make install)", file=sys.stderr)
            return 1
    use_nix = not args.no_nix and (REPO / ".nix" / "nix.conf").exists()
    if not args.no_nix and not use_nix:
        print("bench_build: .nix/nix.conf missing (make nix-setup); skipping nix-build")

    work = Path(tempfile.mkdtemp(prefix="bench-build-"))
    work.chmod(0o711)
    try:
        return asyncio.run(_main(work, args, use_nix))
    finally:
        from stages.castore.fuse.mounts import cleanup_stale_mounts

        cleanup_stale_mounts(work)
        shutil.rmtree(work, ignore_errors=True)


#: Targets per runtime: warm latency and batch time, each / its bare runtime.
TARGETS = {"runc": (2.0, 1.3), "bwrap": (3.0, 1.3)}


async def _main(work: Path, args: argparse.Namespace, use_nix: bool) -> int:
    from stages.castore import ingest_path, open_castore

    tools_dir = _make_tools(work)
    store = f"local://{work}/store"
    castore = open_castore(store, store)
    try:
        tools_node = await ingest_path(castore, tools_dir)
    finally:
        await castore.aclose()

    runc_root = work / "runc-root"
    runc_root.mkdir(mode=0o700)
    bundles = await asyncio.to_thread(_bare_bundles, work, tools_dir, tools_node, args.builds)
    nix_lat: list[float] = []
    nix_batch = float("nan")
    if use_nix:
        print("nix-build ...", flush=True)
        d = _nix_setup(work)
        _nix_build(d, 1, 1)  # warm-up: busybox into the store
        nix_lat = [_nix_build(d, 1, 1) for _ in range(min(args.runs, 10))]
        nix_batch = _nix_build(d, args.builds, args.jobs)
    results: dict = {"runs": args.runs, "builds": args.builds, "jobs": args.jobs,
                     "rounds": args.rounds, "nix": {"latency_ms": _med(nix_lat) * 1000,
                                                    "batch_s": nix_batch}}
    for runtime in args.runtimes:
        print(f"\n=== {runtime}: {args.runs} warm builds, then {args.rounds} rounds of "
              f"{args.builds} builds with jobs={args.jobs}, each followed by {args.builds} "
              f"bare {runtime} runs ...", flush=True)
        ours = await _ocibuild(work, tools_node, store, args, runtime=runtime,
                               bare=lambda rt=runtime: _bare_batch(runc_root, bundles,
                                                                   args.jobs, rt))
        bare_one = ((lambda: _bare_bwrap_run(bundles[0])) if runtime == "bwrap"
                    else (lambda: _bare_run(runc_root, bundles[0])))
        bare_one()  # warm-up
        bare_lat = [await asyncio.to_thread(bare_one) for _ in range(args.runs)]
        results[runtime] = _report(runtime, args, ours, bare_lat, nix_lat, nix_batch)

    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "build.json").write_text(json.dumps(results, indent=2))
    return 0


def _report(runtime: str, args: argparse.Namespace, ours: dict, bare_lat: list[float],
            nix_lat: list[float], nix_batch: float) -> dict:
    bare = f"bare {runtime}"
    bare_batches = ours["bare_batch"]
    bare_batch = _med(bare_batches)
    round_ratios = [o / b for o, b in zip(ours["batch_graph"], bare_batches)]
    lat = {"ocibuild": _med(ours["latency"]) * 1000, bare: _med(bare_lat) * 1000,
           "nix-build": _med(nix_lat) * 1000}
    batch = {"ocibuild (one graph)": _med(ours["batch_graph"]),
             "ocibuild (do_build x N)": ours["batch_do_build"],
             bare: bare_batch, "nix-build": nix_batch}
    r_lat = lat["ocibuild"] / lat[bare]
    r_batch = _med(round_ratios)
    t_lat, t_batch = TARGETS[runtime]

    print()
    print(f"warm latency with {runtime}, median of {args.runs} (ms)")
    print(f"  {'':26}{'ms':>9}{'/ ' + bare:>13}")
    for k, v in lat.items():
        print(f"  {k:26}{v:9.1f}{v / lat[bare]:12.2f}x")
    print(f"  target ocibuild <= {t_lat:g}x {bare}: {'met' if r_lat <= t_lat else 'NOT met'} "
          f"({r_lat:.2f}x)")
    print()
    print(f"{args.builds} builds, {args.jobs} at a time (s; medians of {args.rounds} rounds)")
    print(f"  {'':26}{'s':>9}{'/ ' + bare:>13}{'per build ms':>14}")
    for k, v in batch.items():
        print(f"  {k:26}{v:9.2f}{v / bare_batch:12.2f}x{v / args.builds * 1000:14.1f}")
    print(f"  rounds (one graph / {bare} right after): " + ", ".join(
        f"{o:.2f}/{b:.2f} s = {o / b:.2f}x" for o, b in zip(ours["batch_graph"], bare_batches)))
    print(f"  target ocibuild <= {t_batch:g}x {bare}: "
          f"{'met' if r_batch <= t_batch else 'NOT met'} ({r_batch:.2f}x, the median of the "
          f"rounds' ratios)")
    print()
    print("where a warm build's time goes (median ms per stage; latency runs)")
    st = ours["stages"]
    for k in (*STAGES, "between stages", "span"):
        print(f"  {k:16}{_med(st[k]):8.1f}")
    print(f"  {'do_build wall':16}{lat['ocibuild']:8.1f}  (outside the graph: "
          f"{lat['ocibuild'] - _med(st['span']):.1f})")
    print(f"  {'process CPU':16}{_med(ours['cpu_per_build']) * 1000:8.1f}")
    print(f"  {bare:16}{lat[bare]:8.1f}")
    bst = ours["batch_graph_stages"]
    print("batch as one graph: median stage ms: " + ", ".join(
        f"{k} {_med(bst[k]):.1f}" for k in STAGES))
    if "profile" in ours:
        p = ours["profile"]
        print()
        print(f"cProfile of {p['builds']} warm builds: wall {p['wall'] / p['builds'] * 1000:.1f} "
              f"ms/build, CPU {p['cpu'] / p['builds'] * 1000:.1f} ms/build; top by own time:")
        print("\n".join(line for line in p["top"].splitlines()[:30] if line.strip()))
        print("ocibuild's own functions by cumulative CPU:")
        print("\n".join(line for line in p["ours"].splitlines() if "/work/" in line
                        or "ncalls" in line))
    return {"round_ratios": round_ratios, "batch_graph_s": ours["batch_graph"],
            "bare_batch_s": bare_batches, "latency_ms": lat, "batch_s": batch,
            "ratios": {"latency": r_lat, "batch": r_batch},
            "targets": {"latency": t_lat, "batch": t_batch},
            "samples": {"ocibuild": ours["latency"], "bare": bare_lat, "nix": nix_lat,
                        "cpu_per_build": ours["cpu_per_build"]},
            "stages_ms": {k: _med(v) for k, v in ours["stages"].items()},
            "batch_stages_ms": {k: _med(v) for k, v in bst.items()}}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

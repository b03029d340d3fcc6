"""50 independent trivial derivations: ``ocibuild nix build --jobs 2`` beside ``nix-build --max-jobs 2``.

Each run instantiates ``--drvs`` new derivations (a fresh nonce, so both
tools really build) whose builder is a static busybox from the store running
``echo $i > $out``; instantiation is not timed. Then, timed as whole
commands (process start included, as a user meets them):

- ``nix-build --no-out-link --max-jobs 2 DRV...`` (NIX_CONF_DIR=.nix,
  NIX_REMOTE=local, sandbox on);
- ``ocibuild nix build --jobs 2 DRV...`` over a local store and state
  directory kept for the whole benchmark (the busybox input is imported by a
  warm-up run, as it would be after a first build), with each runtime of
  ``--runtime`` (runc, bwrap, or both, side by side).

Each tool builds derivations of its own; the order turns from run to run;
medians of ``--runs``. Targets: with runc <= 2.0x nix-build (runc's own
cost puts the best near 1.45x); with bwrap <= 0.7x (ahead of Nix).

With bwrap, each run also times the floor under any bwrap runtime: as many
bare bwrap sandboxes, two at a time, each a bundle as the service writes it
rendered as the runtime renders it (seccomp included), run by setpriv and
bwrap alone: no store, no Python between them (bench_build's bare bwrap
batch). ``floor ratio`` is that time over nix-build's.

``--profile`` adds one in-process run of
:func:`stages.nix.build.build_derivations` under cProfile, and prints the
busiest functions and the wall time per stage kind (summed over builds).

Rerun: ``.venv/bin/python -m bench nix`` or
``.venv/bin/python -m bench.bench_nix --runs 5 --drvs 50 [--runtime both] [--profile]``.
Results go to bench/results/nix.json.

Caveats: 2 shared cores; rerun on a quiet machine. Outputs and .drv files
made by a run are deleted from the Nix store afterwards.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NIX_ENV = dict(os.environ, NIX_CONF_DIR=str(REPO / ".nix"), NIX_REMOTE="local")

EXPR = """
{ nonce, n }:
let bbd = builtins.path { path = ./bbdir; name = "busybox"; };
in builtins.genList (i: derivation {
  name = "bench-${toString i}-${nonce}";
  system = builtins.currentSystem;
  builder = "${bbd}/busybox";
  args = [ "sh" "-c" "echo ${toString i} > $out" ];
}) (builtins.fromJSON n)
"""


def _sh(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, env=NIX_ENV,
                          **kw)


def _instantiate(work: Path, n: int) -> list[str]:
    out = _sh("nix-instantiate", "--argstr", "nonce", secrets.token_hex(5), "--argstr", "n",
              str(n), str(work / "drvs.nix")).stdout
    return out.split()


def _outputs(drvs: list[str]) -> list[str]:
    return _sh("nix-store", "-q", "--outputs", *drvs).stdout.split()


def _delete(drvs: list[str]) -> None:
    paths = [p for p in _outputs(drvs) if os.path.exists(p)]
    subprocess.run(["nix-store", "--delete", *paths, *drvs], capture_output=True, env=NIX_ENV)


LABELS = {"nix": "nix-build", "floor": "bare bwrap"}

#: Per runtime: its --build-service-addr scheme, and the target ratio to nix-build.
RUNTIMES = {"runc": ("oci", 2.0), "bwrap": ("bwrap", 0.7)}


def _ocibuild(work: Path, drvs: list[str], runtime: str = "runc") -> list[str]:
    store = f"local://{work}/store"
    return [sys.executable, "-m", "stages.cli", "nix", "build", "--jobs", "2",
            "--build-service-addr", f"{RUNTIMES[runtime][0]}://{work / 'state'}",
            "--blob-service-addr", store, "--directory-service-addr", store, *drvs]


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=NIX_ENV, cwd=REPO)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return took


def _profile(work: Path, drvs: list[str], runtime: str = "runc") -> dict:
    sys.path.insert(0, str(REPO))
    from stages.nix.build import build_derivations
    from stages.nix.pathinfo import open_pathinfo
    from stages.service import OciBuildService

    store = f"local://{work}/store"
    stage_time: dict[str, float] = {}

    async def go() -> float:
        async with OciBuildService(work / "state", blob_address=store,
                                   directory_address=store, jobs=2, runtime=runtime) as svc:
            with open_pathinfo(store) as pi:
                start = time.perf_counter()
                res = await build_derivations(drvs, service=svc, pathinfo=pi, jobs=2)
                took = time.perf_counter() - start
        assert all(r.ok for r in res.values()), [r.error for r in res.values() if not r.ok]
        from pipeline import load_run

        run_dir = max((work / "state" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
        for name, o in load_run(run_dir).stages.items():
            if o.started is not None and o.ended is not None:
                kind = name.rsplit("/", 1)[-1]
                stage_time[kind] = stage_time.get(kind, 0.0) + o.ended - o.started
        return took

    prof = cProfile.Profile()
    prof.enable()
    took = asyncio.run(go())
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
    return {"wall_s": took, "stage_wall_sum_s": stage_time, "top": out.getvalue()}


def _floor_bundles(work: Path, count: int) -> list[Path]:
    """``count`` bundles for bare bwrap runs (bench_build's), in ``work``."""
    from bench.bench_build import _bare_bundles, _make_tools
    from stages.castore import ingest_path, open_castore

    work.mkdir(mode=0o711)
    tools_dir = _make_tools(work)
    store = f"local://{work}/store"

    async def ingest():
        castore = open_castore(store, store)
        try:
            return await ingest_path(castore, tools_dir)
        finally:
            await castore.aclose()

    return _bare_bundles(work, tools_dir, asyncio.run(ingest()), count)


def _floor(bundles: list[Path]) -> float:
    """Bare bwrap of every bundle, two at a time (the builds' --jobs)."""
    from bench.bench_build import _bare_batch

    return _bare_batch(None, bundles, 2, "bwrap")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_nix")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--drvs", type=int, default=50)
    ap.add_argument("--runtime", choices=["oci", "runc", "bwrap", "both"], default="both",
                    help="which runtime ocibuild builds with (oci is runc; default: both, "
                         "side by side)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if shutil.which("nix-build") is None or not (REPO / ".nix" / "nix.conf").exists():
        print("skipped: nix-build or .nix/nix.conf missing (make nix-setup)")
        return 0
    runtimes = (list(RUNTIMES) if args.runtime == "both" else
                ["runc" if args.runtime == "oci" else args.runtime])

    work = Path(tempfile.mkdtemp(prefix="ocibuild-bench-nix-"))
    work.chmod(0o711)
    made: list[str] = []
    try:
        (work / "bbdir").mkdir()
        shutil.copy2("/bin/busybox", work / "bbdir" / "busybox")
        (work / "drvs.nix").write_text(EXPR)
        warm = _instantiate(work, 2)
        made += warm
        _time(_ocibuild(work, warm))  # imports busybox into the store, starts everything once
        _time(["nix-build", "--no-out-link", *warm])
        floor = "bwrap" in runtimes
        bundles = _floor_bundles(work / "floor", args.drvs) if floor else []
        times: dict[str, list[float]] = {"nix": [], **{rt: [] for rt in runtimes}}
        if floor:
            times["floor"] = []
        for run in range(args.runs):
            # Each tool its own new derivations; the order turns every run.
            todo = list(times)
            shift = run % len(todo)
            for who in todo[shift:] + todo[:shift]:
                if who == "floor":
                    times[who].append(_floor(bundles))
                    continue
                drvs = _instantiate(work, args.drvs)
                made += drvs
                cmd = (["nix-build", "--no-out-link", "--max-jobs", "2", *drvs] if who == "nix"
                       else _ocibuild(work, drvs, who))
                times[who].append(_time(cmd))
            print(f"run {run}: " + ", ".join(f"{LABELS.get(w, w)} {t[-1]:.2f} s"
                                             for w, t in times.items()), flush=True)
        nix_m = statistics.median(times["nix"])
        result: dict = {"drvs": args.drvs, "runs": args.runs, "nix_build_s": times["nix"],
                        "nix_median_s": nix_m}
        if floor:
            floor_m = statistics.median(times["floor"])
            result["bare_bwrap"] = {"s": times["floor"], "median_s": floor_m,
                                    "ratio": floor_m / nix_m}
            print(f"{args.drvs} bare bwrap sandboxes, two at a time: {floor_m:.2f} s, "
                  f"floor ratio {floor_m / nix_m:.2f}x nix-build")
        ok = True
        for rt in runtimes:
            median = statistics.median(times[rt])
            ratio, target = median / nix_m, RUNTIMES[rt][1]
            ok &= ratio <= target
            result[rt] = {"ocibuild_s": times[rt], "median_s": median, "ratio": ratio,
                          "target": target}
            print(f"{args.drvs} trivial derivations, jobs 2: nix-build {nix_m:.2f} s, "
                  f"ocibuild with {rt} {median:.2f} s, ratio {ratio:.2f}x "
                  f"(target <= {target}x)")
        if args.profile:
            drvs = _instantiate(work, args.drvs)
            made += drvs
            prof = _profile(work, drvs, runtimes[-1])
            result["profile"] = prof
            print(f"profiled run: {prof['wall_s']:.2f} s; stage wall time summed over builds:")
            for kind, t in sorted(prof["stage_wall_sum_s"].items(), key=lambda kv: -kv[1]):
                print(f"  {kind:10s} {t:7.2f} s")
            print(prof["top"])
        out = REPO / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / "nix.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0 if ok else 1
    finally:
        if made:
            _delete(made)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

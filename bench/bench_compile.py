"""A real compile: Brotli's library and tool, ``ocibuild nix build`` beside ``nix-build``.

The derivations of tests/real_compile (Brotli 1.1.0 from its upstream
sources, ``zig cc`` from the ziglang wheel as a 340 MB input source, a
static busybox as the shell): 31 compiler runs and an archive for the
library, a compile and link for the tool. Each round instantiates both
with a fresh nonce, so both tools really build, and times as whole commands:

- ``nix-build --no-out-link CLI_DRV`` (NIX_CONF_DIR=.nix, sandbox on, one
  job: the library, then the tool);
- ``ocibuild nix build CLI_DRV`` over a store and state directory kept for
  the whole benchmark (the toolchain and sources imported by a warm-up round,
  as Nix has them in its store after the first instantiation).

The two alternate (Nix first on even rounds); medians of ``--runs``. Goal:
ocibuild <= 1.05x nix-build. Where the time goes: ``--profile`` prints the
wall time per stage kind of one more ocibuild round.

Rerun: ``.venv/bin/python -m bench compile`` or
``.venv/bin/python -m bench.bench_compile --runs 3``. Results go to
bench/results/compile.json. Everything a run adds to the Nix store is
deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
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
GOAL = 1.05


def _sh(*args: str, cwd: Path) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, env=NIX_ENV, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"{args[:3]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def _instantiate(work: Path) -> str:
    return _sh("nix-instantiate", "--argstr", "nonce", secrets.token_hex(5), "-A", "cli",
               str(work / "tree" / "brotli.nix"), cwd=work).strip()


def _ocibuild(work: Path, drv: str) -> list[str]:
    store = f"local://{work}/store"
    return [sys.executable, "-m", "stages.cli", "nix", "build", "--jobs", "2",
            "--state-dir", str(work / "state"), "--blob-service-addr", store,
            "--directory-service-addr", store, drv]


def _time(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    _sh(*cmd, cwd=cwd)
    return time.perf_counter() - start


def _closure(drvs: list[str], work: Path) -> list[str]:
    """The outputs of ``drvs`` and their input derivations, then the .drv files."""
    paths = _sh("nix-store", "-qR", *drvs, cwd=work).split()
    outs = _sh("nix-store", "-q", "--outputs", *[p for p in paths if p.endswith(".drv")],
               cwd=work).split()
    return [p for p in outs if os.path.exists(p)] + paths


def _stage_times(work: Path) -> dict[str, float]:
    sys.path.insert(0, str(REPO))
    from pipeline import load_run

    run_dir = max((work / "state" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    out: dict[str, float] = {}
    for name, o in load_run(run_dir).stages.items():
        if o.started is not None and o.ended is not None:
            kind = name.rsplit("/", 1)[-1]
            out[kind] = out.get(kind, 0.0) + o.ended - o.started
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_compile")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if shutil.which("nix-build") is None or not (REPO / ".nix" / "nix.conf").exists():
        print("skipped: nix-build or .nix/nix.conf missing (make nix-setup)")
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    from real_compile import prepare

    work = Path(tempfile.mkdtemp(prefix="ocibuild-bench-compile-", dir="/var/tmp"))
    work.chmod(0o711)
    made: list[str] = []
    try:
        prepare(work / "tree")
        warm = _instantiate(work)
        made.append(warm)
        _time(_ocibuild(work, warm), work)  # imports the toolchain and sources once
        nix_t: list[float] = []
        oci_t: list[float] = []
        for run in range(args.runs):
            a, b = _instantiate(work), _instantiate(work)
            made += [a, b]
            order = [("nix", a), ("oci", b)] if run % 2 == 0 else [("oci", b), ("nix", a)]
            for who, drv in order:
                if who == "nix":
                    nix_t.append(_time(["nix-build", "--no-out-link", drv], work))
                else:
                    oci_t.append(_time(_ocibuild(work, drv), work))
            print(f"run {run}: nix-build {nix_t[-1]:.2f} s, ocibuild {oci_t[-1]:.2f} s",
                  flush=True)
        nix_m, oci_m = statistics.median(nix_t), statistics.median(oci_t)
        ratio = oci_m / nix_m
        result: dict = {"runs": args.runs, "nix_build_s": nix_t, "ocibuild_s": oci_t,
                        "nix_median_s": nix_m, "ocibuild_median_s": oci_m, "ratio": ratio,
                        "goal": GOAL}
        print(f"Brotli library and tool (zig cc): nix-build {nix_m:.2f} s, ocibuild "
              f"{oci_m:.2f} s, ratio {ratio:.2f}x (goal <= {GOAL}x)")
        if args.profile:
            drv = _instantiate(work)
            made.append(drv)
            _time(_ocibuild(work, drv), work)
            result["stage_wall_sum_s"] = _stage_times(work)
            print("one more ocibuild round, wall time per stage kind (summed over builds):")
            for kind, t in sorted(result["stage_wall_sum_s"].items(), key=lambda kv: -kv[1]):
                print(f"  {kind:10s} {t:7.2f} s")
        out = REPO / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / "compile.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0 if ratio <= GOAL else 1
    finally:
        if made:
            subprocess.run(["nix-store", "--delete", *_closure(made, work)],
                           capture_output=True, env=NIX_ENV)
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

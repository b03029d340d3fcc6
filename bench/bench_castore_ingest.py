"""Ingest of a Python stdlib copy into a fresh local store, beside the references.

For each run: a fresh ``cp -a`` of the tree (plus a unique marker file, so
``nix-store --add`` cannot find it already present), then, on that copy:

- ``b3sum`` over every file (the floor: hashing with nothing stored),
- ``ocibuild``: ``ingest_path`` into a new ``local://`` store, in a child
  process (its own timing of the ingest call, and the child's wall time),
- ``nix-store --add`` (NIX_CONF_DIR=.nix, NIX_REMOTE=local); the added path is
  deleted again afterwards.

A warm-up read of the copy runs first so all three see a warm page cache.
Prints medians, the per-run ocibuild/nix ratios and their median (the figure
held against the target: ocibuild <= 0.5x nix-store), and the other ratios
from medians. The machine is shared: rerun when it is quiet.

Rerun: ``.venv/bin/python -m bench bench_castore_ingest`` or
``.venv/bin/python -m bench.bench_castore_ingest --runs 3 --tree DIR``.
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
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TREES = [Path("/root/.pyenv/versions/3.11.7/lib/python3.11"),
                 Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}."
                 f"{sys.version_info.minor}",
                 Path("/usr/lib/python3.11")]


def _nix_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("NIX_CONF_DIR", str(REPO / ".nix"))
    env.setdefault("NIX_REMOTE", "local")
    return env


def _files(tree: Path) -> list[str]:
    out = []
    for dirpath, _dirs, names in os.walk(tree):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append(p)
    return out


def _timed(cmd: list[str], **kw: Any) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, **kw)
    return time.perf_counter() - start, proc


def _b3sum(tree: Path) -> float:
    files = _files(tree)
    start = time.perf_counter()
    # b3sum gets the file list in big argument batches, like xargs would.
    for i in range(0, len(files), 4000):
        subprocess.run(["b3sum", "--", *files[i:i + 4000]], check=True,
                       stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _ocibuild(tree: Path, store: Path) -> tuple[float, float]:
    wall, proc = _timed([sys.executable, "-m", "bench.bench_castore_ingest", "--child",
                         str(store), str(tree)], cwd=REPO)
    return float(proc.stdout.decode().split()[-1]), wall


def _nix_add(tree: Path) -> float:
    env = _nix_env()
    seconds, proc = _timed(["nix-store", "--add", str(tree)], env=env)
    path = proc.stdout.decode().strip()
    subprocess.run(["nix-store", "--delete", path], env=env, capture_output=True)
    return seconds


def _child(store: Path, tree: Path) -> None:
    sys.path.insert(0, str(REPO))
    from stages.castore.addresses import open_castore
    from stages.castore.ingest import ingest_path

    async def go() -> float:
        castore = open_castore(f"local://{store}", f"local://{store}")
        start = time.perf_counter()
        await ingest_path(castore, tree)
        return time.perf_counter() - start

    print(f"{asyncio.run(go()):.4f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_castore_ingest")
    parser.add_argument("--tree", type=Path,
                        default=next((t for t in DEFAULT_TREES if t.is_dir()), None))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    if args.tree is None or not args.tree.is_dir():
        print(f"no source tree: {args.tree}", file=sys.stderr)
        return 1
    for tool in ("b3sum", "nix-store"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing (make install)", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.work))
    results: dict[str, list[float]] = {"b3sum": [], "ocibuild": [], "ocibuild_wall": [],
                                       "nix_store_add": []}
    try:
        for run in range(args.runs):
            tree = work / f"tree{run}"
            subprocess.run(["cp", "-a", str(args.tree), str(tree)], check=True)
            (tree / f"bench-marker-{uuid.uuid4().hex}").write_text("fresh copy\n")
            _b3sum(tree)  # warm-up: every file read once
            results["b3sum"].append(_b3sum(tree))
            ingest, wall = _ocibuild(tree, work / f"store{run}")
            results["ocibuild"].append(ingest)
            results["ocibuild_wall"].append(wall)
            results["nix_store_add"].append(_nix_add(tree))
            print(f"run {run}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in results.items()),
                  flush=True)
            shutil.rmtree(tree)
            shutil.rmtree(work / f"store{run}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    files = len(_files(args.tree))
    print(f"tree {args.tree}: {files} files; medians of {args.runs} runs")
    for k, v in med.items():
        print(f"  {k:15s} {v:7.2f} s")
    # Per-run ratios (tools measured back to back on the same copy) are less
    # exposed to a busy machine than ratios of medians.
    per_run = [o / n for o, n in zip(results["ocibuild"], results["nix_store_add"])]
    print("  ocibuild/nix per run: " + ", ".join(f"{r:.2f}x" for r in per_run))
    ratios = {"ocibuild/nix": statistics.median(per_run),
              "ocibuild_wall/nix": med["ocibuild_wall"] / med["nix_store_add"],
              "b3sum/nix": med["b3sum"] / med["nix_store_add"],
              "ocibuild/b3sum": med["ocibuild"] / med["b3sum"]}
    for k, v in ratios.items():
        print(f"  {k:18s} {v:5.2f}x")
    print(f"  target ocibuild/nix <= 0.50x: {'met' if ratios['ocibuild/nix'] <= 0.5 else 'NOT met'}")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "castore_ingest.json").write_text(json.dumps(
        {"tree": str(args.tree), "files": files, "runs": results, "medians": med,
         "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

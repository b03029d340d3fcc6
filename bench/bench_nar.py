"""NAR export from a local store, beside `nix-store --dump` of the same tree.

The tree is ingested once into a fresh ``local://`` store (not timed). Then,
each run, with a warm page cache:

- ``ocibuild``: ``nar_hash_and_size`` of the root node (the NAR rendered from
  the store, blobs read and verified, sha256 over the stream);
- ``nix-store --dump TREE | sha256sum`` (Nix reading the tree straight from
  the filesystem and hashing it).

Both must give the same hash. Prints medians, NAR throughput and the ratio.

Rerun: ``.venv/bin/python -m bench bench_nar`` or
``.venv/bin/python -m bench.bench_nar --runs 3 --tree DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TREE = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"


async def _ours(store: str, tree: Path, runs: int) -> tuple[list[float], str, int, int]:
    from stages.castore import format_nar_hash, ingest_path, nar_hash_and_size, open_castore

    castore = open_castore(store, store)
    try:
        node = await ingest_path(castore, tree)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            digest, size = await nar_hash_and_size(castore, node)
            times.append(time.perf_counter() - start)
        return times, format_nar_hash(digest), size, node.size
    finally:
        await castore.aclose()


def _nix(tree: Path, runs: int) -> tuple[list[float], str]:
    from stages.castore.nixbase32 import encode

    env = dict(os.environ, NIX_CONF_DIR=str(REPO / ".nix"), NIX_REMOTE="local")
    times = []
    digest = ""
    for _ in range(runs):
        start = time.perf_counter()
        dump = subprocess.Popen(["nix-store", "--dump", str(tree)], stdout=subprocess.PIPE, env=env)
        out = subprocess.run(["sha256sum"], stdin=dump.stdout, capture_output=True, text=True,
                             check=True).stdout
        dump.stdout.close()
        if dump.wait() != 0:
            raise SystemExit("nix-store --dump failed")
        times.append(time.perf_counter() - start)
        digest = "sha256:" + encode(bytes.fromhex(out.split()[0]))
    return times, digest


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_nar", description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=DEFAULT_TREE)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if shutil.which("nix-store") is None:
        print("nix-store is missing; run make install")
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-nar-") as tmp:
        store = f"local://{tmp}/store"
        ours, our_hash, nar_size, entries = asyncio.run(_ours(store, args.tree, args.runs))
        nix, nix_hash = _nix(args.tree, args.runs)
    ok = our_hash == nix_hash
    o, n = statistics.median(ours), statistics.median(nix)
    print(f"tree: {args.tree} ({entries} entries, NAR {nar_size / 1e6:.1f} MB), runs: {args.runs}")
    print(f"ocibuild nar_hash_and_size (from store): {o:.3f} s  ({nar_size / o / 1e9:.2f} GB/s)")
    print(f"nix-store --dump | sha256sum (from fs):  {n:.3f} s  ({nar_size / n / 1e9:.2f} GB/s)")
    print(f"ratio ocibuild / nix: {o / n:.2f}x")
    print(f"hashes {'agree' if ok else 'DIFFER'}: {our_hash}" + ("" if ok else f" vs {nix_hash}"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

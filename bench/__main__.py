"""Run every benchmark module in bench/ (or those named on the command line).

Each ``bench/bench_*.py`` module has a ``main(argv)`` that measures ocibuild
beside the reference tool in the same run and prints ratios. Results are also
written as JSON under bench/results/ (not committed).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import bench


def main(argv: list[str]) -> int:
    wanted = set(argv)
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__)
                   if m.name.startswith("bench_"))
    failed = 0
    for name in names:
        if wanted and name not in wanted and name.removeprefix("bench_") not in wanted:
            continue
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"bench.{name}")
        rc = module.main([])
        print(f"--- {name}: {'ok' if not rc else 'FAILED'} in {time.perf_counter() - start:.1f} s")
        failed += bool(rc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

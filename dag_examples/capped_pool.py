"""A capped resource and cleanup: eight downloads through at most two connections.

Run: ``.venv/bin/python dag_examples/capped_pool.py [RUN_ROOT]``

What it shows:

- A stage-local resource (``connection``, kind ``net``) acquired around each
  download; ``Caps(kinds={"net": 2})`` lets at most two be open at once, and
  ``Caps(running=4)`` caps running stages overall.
- A shared resource (``cache``) acquired by the first stage that names it,
  used by the later ones, and released once the last user (``index``) is done.
- Every ``open``/``close`` line printed pairs up, in reverse order per stage;
  the statistics at the end show the caps' high-water marks.

RUN_ROOT defaults to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import Caps, Graph, Resource, Runner, Stage, to_text

LOG: list[str] = []


@contextlib.asynccontextmanager
async def connection(ctx):
    LOG.append(f"open  connection for {ctx.name}")
    try:
        yield f"conn-{ctx.name}"
    finally:
        LOG.append(f"close connection for {ctx.name}")


@contextlib.asynccontextmanager
async def cache(ctx):
    store: dict[str, int] = {}
    LOG.append(f"open  cache (first user: {ctx.name})")
    try:
        yield store
    finally:
        LOG.append(f"close cache ({len(store)} entries)")


async def download(ctx):
    await asyncio.sleep(0.01)  # the network
    size = 100 + len(ctx.name)
    ctx.resources["cache"][ctx.name] = size
    ctx.log(f"got {size} bytes over {ctx.resources['connection']}")
    return size


async def index(ctx):
    return {"total": sum(ctx.results[f"download{i}"] for i in range(8)),
            "cached": len(ctx.resources["cache"])}


def make_graph() -> Graph:
    conn = Resource(name="connection", factory=connection, kind="net")
    stages = [Stage(name=f"download{i}", fn=download, resources=[conn, "cache"])
              for i in range(8)]
    stages.append(Stage(name="index", fn=index, deps=[s.name for s in stages],
                        resources=["cache"]))
    return Graph(stages=stages, resources=[Resource(name="cache", factory=cache)],
                 version="1")


async def amain(run_root: Path) -> int:
    runner = Runner(make_graph(), run_root=run_root, caps=Caps(running=4, kinds={"net": 2}))
    run = await runner.run()
    print("\n".join(LOG))
    print(to_text(runner.graph, run), end="")
    stats = runner.statistics()
    print(f"index: {run.results['index']}")
    print(f"most connections open at once: {stats['net'].max_borrowed} (cap 2); "
          f"most stages running at once: {stats['running'].max_borrowed} (cap 4)")
    print(f"run directory: {run.run_dir}")
    return 0 if run.status.value == "finished" else 1


def main(argv: list[str]) -> int:
    if argv:
        return asyncio.run(amain(Path(argv[0])))
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(amain(Path(tmp)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

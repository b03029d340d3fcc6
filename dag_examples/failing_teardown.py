"""A failing stage whose teardown still runs, and sees what happened.

Run: ``.venv/bin/python dag_examples/failing_teardown.py [RUN_ROOT]``

A small build-shaped pipeline: ``prepare`` makes a work directory (a shared
resource, like a mount), ``compile`` fails, ``package`` is abandoned because
it depends on ``compile``, ``docs`` (independent) still finishes, and
``teardown`` (``always=True``) runs anyway: it reads the outcomes of its
dependencies and reports them. The work directory is removed whatever
happened. Events go to a JSON-lines log in the run directory.

Exit status: 0 when the run behaved as described (it is meant to fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import (
    Graph,
    JsonLinesLog,
    Resource,
    Runner,
    Stage,
    StageState,
    to_text,
)


@contextlib.asynccontextmanager
async def workdir(ctx):
    path = Path(tempfile.mkdtemp(prefix="example-work-"))
    print(f"made work directory {path}")
    try:
        yield path
    finally:
        shutil.rmtree(path)
        print(f"removed work directory {path}")


async def prepare(ctx):
    (ctx.resources["work"] / "main.c").write_text("int main(void) { return 0 }\n")
    return "main.c"


async def compile_(ctx):
    source = ctx.resources["work"] / ctx.results["prepare"]
    ctx.log(f"compiling {source.name}")
    raise RuntimeError(f"{source.name}:1: expected ';' before '}}' token")


async def package(ctx):
    return "never reached"


async def docs(ctx):
    return "docs built"


async def teardown(ctx):
    for name, outcome in sorted(ctx.outcomes.items()):
        print(f"teardown sees {name}: {outcome.state.value}"
              + (f" ({outcome.error})" if outcome.error else ""))
    return {n: o.state.value for n, o in ctx.outcomes.items()}


def make_graph() -> Graph:
    return Graph(
        stages=[
            Stage(name="prepare", fn=prepare, resources=["work"]),
            Stage(name="compile", fn=compile_, deps=["prepare"], resources=["work"]),
            Stage(name="package", fn=package, deps=["compile"], resources=["work"]),
            Stage(name="docs", fn=docs),
            Stage(name="teardown", fn=teardown, deps=["package", "docs"], always=True),
        ],
        resources=[Resource(name="work", factory=workdir, kind="disk")],
        version="1")


async def amain(run_root: Path) -> int:
    log = JsonLinesLog(run_root / "events.jsonl")
    runner = Runner(make_graph(), run_root=run_root, subscribers=[log])
    run = await runner.run()
    print(to_text(runner.graph, run), end="")
    print(f"events: {run_root / 'events.jsonl'}")
    expected = {"prepare": StageState.FINISHED, "compile": StageState.FAILED,
                "package": StageState.ABANDONED, "docs": StageState.FINISHED,
                "teardown": StageState.FINISHED}
    return 0 if run.states() == expected else 1


def main(argv: list[str]) -> int:
    if argv:
        return asyncio.run(amain(Path(argv[0])))
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(amain(Path(tmp)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

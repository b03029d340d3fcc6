"""Stop after a stage, look around, draw it, then resume: a walkthrough.

Run: ``.venv/bin/python dag_examples/stop_and_resume.py [OUT_DIR]``

1. Runs ``fetch -> parse -> analyze -> report`` (plus ``lint`` beside
   ``analyze``) with ``stop_after="parse"``: only ``fetch`` and ``parse`` run;
   the run directory holds their results (``journal.jsonl``, ``state.json``).
2. Draws the stopped run to ``stopped.svg`` (Graphviz): finished stages
   green, the rest grey.
3. Resumes the run: ``fetch`` and ``parse`` are reused (their results
   reloaded from disk, their functions not called again), the rest runs.
   Draws ``finished.svg``.
4. Resumes again from ``analyze``: it and ``report`` re-run, the rest is
   reused.
5. Tries to resume with a changed graph (a new ``version``) and shows the
   refusal.

OUT_DIR (run directory and pictures) defaults to a temporary directory.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import (
    Graph,
    ResumeMismatch,
    Runner,
    Stage,
    render_image,
    resume,
    to_text,
)

CALLS: Counter[str] = Counter()


async def fetch(ctx):
    CALLS["fetch"] += 1
    return ["alpha 3", "beta 5", "gamma 8"]


async def parse(ctx):
    CALLS["parse"] += 1
    return {name: int(n) for name, n in (line.split() for line in ctx.results["fetch"])}


async def analyze(ctx):
    CALLS["analyze"] += 1
    values = ctx.results["parse"]
    return {"sum": sum(values.values()), "max": max(values, key=values.get)}


async def lint(ctx):
    CALLS["lint"] += 1
    return [k for k in ctx.results["parse"] if len(k) > 4]


async def report(ctx):
    CALLS["report"] += 1
    a = ctx.results["analyze"]
    return f"sum={a['sum']} max={a['max']} long names={ctx.results['lint']}"


def make_graph(version: str = "1") -> Graph:
    return Graph(stages=[
        Stage(name="fetch", fn=fetch),
        Stage(name="parse", fn=parse, deps=["fetch"]),
        Stage(name="analyze", fn=analyze, deps=["parse"]),
        Stage(name="lint", fn=lint, deps=["parse"]),
        Stage(name="report", fn=report, deps=["analyze", "lint"]),
    ], version=version)


async def amain(out: Path) -> int:
    graph = make_graph()
    stopped = await Runner(graph, run_root=out / "runs").run(stop_after="parse")
    print(f"1. stopped after parse ({stopped.status.value}) in {stopped.run_dir}")
    print(to_text(graph, stopped), end="")
    print(f"2. drew {render_image(graph, out / 'stopped.svg', stopped)}")
    finished = await resume(stopped.run_dir, graph)
    print(f"3. resumed: {finished.status.value}; report: {finished.results['report']}")
    print(to_text(graph, finished), end="")
    print(f"   drew {render_image(graph, out / 'finished.svg', finished)}")
    again = await resume(stopped.run_dir, graph, from_stage="analyze")
    print(f"4. resumed from analyze: {again.status.value}")
    print(to_text(graph, again), end="")
    print(f"   calls per stage: {dict(sorted(CALLS.items()))}")
    try:
        await resume(stopped.run_dir, make_graph(version="2"))
        print("5. resumed a changed graph?!")
        return 1
    except ResumeMismatch as exc:
        print(f"5. refused: {exc}")
    ok = CALLS == Counter(fetch=1, parse=1, analyze=2, lint=1, report=2)
    return 0 if ok and finished.status.value == "finished" else 1


def main(argv: list[str]) -> int:
    if argv:
        return asyncio.run(amain(Path(argv[0])))
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(amain(Path(tmp)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

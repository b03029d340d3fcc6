"""Word counts of a few texts, a graph meant for the command line only.

There is no ``__main__`` here: run it with ``python -m pipeline`` (or
``pipeline-run``) from this directory::

    python -m pipeline run word_counts.py:graph --caps reader=2
    python -m pipeline runs
    python -m pipeline show RUN --format timeline -o timeline.svg
    python -m pipeline why RUN total

Each ``count_<name>`` stage holds a ``reader`` (at most two at once with
``--caps reader=2``) while it counts one text; ``total`` adds them up, and
``publish`` writes ``word_counts.json`` in the current directory. Set
``WORD_COUNTS_FAIL=<name>`` to make that text's count fail, then see
``why`` name it, unset it and ``resume``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

from pipeline import Graph, Resource, Stage

TEXTS = {
    "fox": "the quick brown fox jumps over the lazy dog",
    "sea": "the sea the sea the endless sea",
    "rain": "rain on the roof and rain on the road",
}


@contextlib.asynccontextmanager
async def reader(ctx):
    ctx.log("reader taken")
    yield
    ctx.log("reader given back")


def counter(name: str):
    async def count(ctx) -> int:
        if os.environ.get("WORD_COUNTS_FAIL") == name:
            raise RuntimeError(f"cannot read {name}")
        await asyncio.sleep(0.05)  # reading takes a while
        return len(TEXTS[name].split())

    return count


async def total(ctx) -> int:
    return sum(ctx.results[f"count_{name}"] for name in TEXTS)


async def publish(ctx) -> str:
    counts = {name: ctx.results[f"count_{name}"] for name in TEXTS}
    with open("word_counts.json", "w") as f:
        json.dump({**counts, "total": ctx.results["total"]}, f, sort_keys=True)
    return "word_counts.json"


def graph() -> Graph:
    counts = [Stage(name=f"count_{name}", fn=counter(name),
                    resources=[Resource(name=f"reader_{name}", kind="reader", factory=reader)],
                    description=f"count the words of {name}")
              for name in TEXTS]
    return Graph(stages=[*counts,
                         Stage(name="total", fn=total, deps=[s.name for s in counts]),
                         Stage(name="publish", fn=publish, deps=["total"])])

"""A graph as one stage of another (pipeline.as_stage): results by path, its own
caps, failures named by path, resume inside, digests, drawings."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from pipeline import (
    Caps,
    Graph,
    Resource,
    Stage,
    as_stage,
    load_run,
    run_sync,
    to_dot,
    to_mermaid,
    to_text,
)


def inner_graph(work: Path, *, extra: str = "") -> Graph:
    held = {"now": 0, "most": 0}

    @contextlib.asynccontextmanager
    async def slot(ctx):
        held["now"] += 1
        held["most"] = max(held["most"], held["now"])
        try:
            yield
        finally:
            held["now"] -= 1

    async def a(ctx):
        (work / "a-runs").open("a").write("a\n")
        await asyncio.sleep(0.02)
        return 20

    async def side(ctx):
        await asyncio.sleep(0.02)
        return held["most"]

    async def b(ctx):
        if not (work / "mended").exists():
            raise RuntimeError("b is broken")
        return ctx.results["a"] + 1 + len(extra)

    return Graph(stages=[
        Stage(name="a", fn=a, resources=[Resource(name="s1", kind="slot", factory=slot)]),
        Stage(name="side", fn=side, resources=[Resource(name="s2", kind="slot", factory=slot)]),
        Stage(name="b", fn=b, deps=["a", "side"]),
    ])


def outer_graph(work: Path, inner: Graph) -> Graph:
    async def prep(ctx):
        return "prepared"

    async def use(ctx):
        return {"b": ctx.results["sub"]["b"], "most": ctx.results["sub"]["side"]}

    return Graph(stages=[
        Stage(name="prep", fn=prep),
        as_stage(inner, "sub", deps=["prep"], caps=Caps(kinds={"slot": 1})),
        Stage(name="use", fn=use, deps=["sub"]),
    ])


def test_results_by_path_own_caps_and_resume_inside(tmp_path: Path) -> None:
    graph = outer_graph(tmp_path, inner_graph(tmp_path))
    first = run_sync(graph, run_root=tmp_path / "runs", check=False)
    assert first.status.value == "failed"
    assert "inner stage sub/b failed" in (first.stages["sub"].error or "")
    assert "b is broken" in (first.stages["sub"].error or "")
    inner_dir = first.run_dir / "subgraphs" / "sub"
    inner = load_run(inner_dir)
    assert inner.stages["a"].state.value == "finished"
    assert inner.stages["b"].state.value == "failed"

    (tmp_path / "mended").touch()
    second = run_sync(graph, resume_dir=first.run_dir)
    assert second.stages["use"].result == {"b": 21, "most": 1}  # the inner cap: one slot
    # The inner run was resumed: a ran once, in the first attempt only.
    assert (tmp_path / "a-runs").read_text() == "a\n"
    assert load_run(inner_dir).stages["b"].state.value == "finished"


def test_the_inner_graph_is_part_of_the_digest(tmp_path: Path) -> None:
    one = outer_graph(tmp_path, inner_graph(tmp_path))
    same = outer_graph(tmp_path, inner_graph(tmp_path))
    other = outer_graph(tmp_path, Graph(stages=[*inner_graph(tmp_path).stages,
                                                Stage(name="more", fn=asyncio.sleep)]))
    assert one.digest == same.digest != other.digest


def test_drawn_as_a_cluster_and_a_subgraph(tmp_path: Path) -> None:
    graph = outer_graph(tmp_path, inner_graph(tmp_path))
    dot = to_dot(graph)
    assert 'subgraph "cluster_sub"' in dot
    assert '"prep" -> "sub/a";' in dot and '"prep" -> "sub/side";' in dot
    assert '"sub/b" -> "use";' in dot and '"sub/a" -> "sub/b";' in dot
    mermaid = to_mermaid(graph)
    assert 'subgraph s1 ["sub"]' in mermaid and "s1 --> s2" in mermaid
    text = to_text(graph)
    inner_lines = [line for line in text.splitlines() if line.startswith("    | ")]
    assert len(inner_lines) == 3 and "<- a, side" in inner_lines[-1]


def test_show_of_a_run_draws_its_subgraph_from_the_run_directory(tmp_path: Path) -> None:
    from pipeline.cli import _shape_of

    (tmp_path / "mended").touch()
    run = run_sync(outer_graph(tmp_path, inner_graph(tmp_path)), run_root=tmp_path / "runs")
    shape = _shape_of(run.run_dir)
    assert shape["sub"].subgraph is not None
    assert sorted(shape["sub"].subgraph.names) == ["a", "b", "side"]
    saved = json.loads((run.run_dir / "graph.json").read_text())
    assert any("subgraph" in s for s in saved["definition"]["stages"])


def test_a_cancelled_outer_run_cancels_the_inner_one(tmp_path: Path) -> None:
    from pipeline import Runner

    started = asyncio.Event()

    async def forever(ctx):
        started.set()
        await asyncio.sleep(3600)

    inner = Graph(stages=[Stage(name="wait", fn=forever)])
    outer = Graph(stages=[as_stage(inner, "sub")])

    async def main():
        runner = Runner(outer, run_root=tmp_path / "runs")
        task = asyncio.ensure_future(runner.run())
        await asyncio.wait_for(started.wait(), 10)
        runner.cancel("test")
        return await asyncio.wait_for(task, 10)

    run = asyncio.run(main())
    assert run.stages["sub"].state.value == "cancelled"
    inner_run = load_run(run.run_dir / "subgraphs" / "sub")
    assert inner_run.stages["wait"].state.value in ("cancelled", "running") or pytest.fail(
        str(inner_run.stages))

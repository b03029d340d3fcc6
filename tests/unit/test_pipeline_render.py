"""Rendering: DOT, Mermaid and text, and SVG/PNG through the real Graphviz ``dot``."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET

import pytest

from pipeline import (
    STATE_COLORS,
    Graph,
    PipelineError,
    Resource,
    Runner,
    Stage,
    StageState,
    render_image,
    to_dot,
    to_mermaid,
    to_text,
)


async def ok(ctx):
    return 1


async def bad(ctx):
    raise RuntimeError("broken on purpose")


def graph() -> Graph:
    return Graph(
        stages=[Stage(name="fetch", fn=ok),
                Stage(name="build", fn=bad, deps=["fetch"], resources=[
                    "pool", Resource(name="tmp", factory=contextlib.nullcontext, kind="disk")]),
                Stage(name="ship", fn=ok, deps=["build"]),
                Stage(name='we"ird/name', fn=ok, deps=["fetch"]),
                Stage(name="clean", fn=ok, deps=["ship"], always=True)],
        resources=[Resource(name="pool", factory=contextlib.nullcontext, kind="workers")])


@pytest.fixture(scope="module")
def ran():
    import asyncio
    g = graph()
    return g, asyncio.run(Runner(g).run())


def test_dot_has_every_stage_edge_resource_and_state_color(ran):
    g, run = ran
    dot = to_dot(g, run)
    for name in ("fetch", "build", "ship", "clean"):
        assert f'"{name}" [' in dot
    assert '"we\\"ird/name" [' in dot
    assert '"fetch" -> "build";' in dot and '"ship" -> "clean";' in dot
    assert '"resource:pool" -> "build"' in dot and "pool (workers)" in dot
    assert "tmp (disk)" in dot
    assert STATE_COLORS[StageState.FAILED] in dot and STATE_COLORS[StageState.ABANDONED] in dot
    assert "peripheries=2" in dot  # the always stage
    plain = to_dot(g)
    assert "fillcolor=\"#" not in plain.split("edge [")[1]


def test_mermaid(ran):
    g, run = ran
    text = to_mermaid(g, run)
    assert text.startswith("flowchart TD")
    ids = {name: f"s{i}" for i, name in enumerate(g.names)}
    assert f"{ids['fetch']} --> {ids['build']}" in text
    assert f"class {ids['build']} failed" in text
    assert "classDef failed fill:" in text
    assert "#quot;" in text  # the quote in a name is escaped
    assert f"r0 -.- {ids['build']}" in text


def test_text(ran):
    g, run = ran
    text = to_text(g, run)
    lines = text.splitlines()
    assert lines[0].startswith("+ fetch")
    build_line = next(x for x in lines if x.startswith("x build"))
    assert "<- fetch" in build_line and "[pool, tmp:disk]" in build_line
    assert "broken on purpose" in text
    assert any(x.startswith("- ship") for x in lines)
    assert "(always)" in text and lines[-1].startswith("run failed:")
    assert "failed 1" in lines[-1] and "abandoned 1" in lines[-1]


def test_svg_and_png_through_graphviz(ran, tmp_path):
    g, run = ran
    svg = render_image(g, tmp_path / "g.svg", run)
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    texts = {t.text for t in root.iter() if t.tag.endswith("text")}
    assert {"fetch", "build", "ship", "clean"} <= texts
    fills = {e.get("fill") for e in root.iter() if e.get("fill")}
    assert STATE_COLORS[StageState.FAILED] in fills
    png = render_image(g, tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PipelineError, match="format 'gif'"):
        render_image(g, tmp_path / "g.gif")

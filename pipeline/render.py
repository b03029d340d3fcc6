"""Drawings of a graph, or of a run: DOT, Mermaid, SVG/PNG (Graphviz) and terminal text.

Stages are boxes colored by state (when a :class:`~pipeline.state.Run` is
given), ``always`` stages have a double border, shared resources are
ellipses joined to the stages that use them by dashed edges, and stage-local
resources are listed in the stage's label.

Caveats:

- SVG/PNG need Graphviz's ``dot`` on PATH (Debian package ``graphviz``);
  :func:`render_image` raises :class:`~pipeline.errors.PipelineError` naming
  what is missing.
- Mermaid node ids are generated (``s0``, ``s1``...); names are labels.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from pipeline.definition import Graph
from pipeline.errors import PipelineError
from pipeline.state import Run, StageState

__all__ = ["STATE_COLORS", "render_image", "to_dot", "to_mermaid", "to_text"]

STATE_COLORS: Mapping[StageState, str] = {
    StageState.PENDING: "#eeeeee",
    StageState.QUEUED: "#fff3b0",
    StageState.RUNNING: "#ffd166",
    StageState.FINISHED: "#8ecf8e",
    StageState.REUSED: "#b5e3b5",
    StageState.FAILED: "#f28b82",
    StageState.ABANDONED: "#cfcfcf",
    StageState.CANCELLED: "#f7c59f",
}

_SYMBOLS: Mapping[StageState, str] = {
    StageState.PENDING: ".",
    StageState.QUEUED: "~",
    StageState.RUNNING: ">",
    StageState.FINISHED: "+",
    StageState.REUSED: "=",
    StageState.FAILED: "x",
    StageState.ABANDONED: "-",
    StageState.CANCELLED: "!",
}


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return json.dumps(text)


def _states(graph: Graph, run: Run | None) -> dict[str, StageState]:
    if run is None:
        return {}
    return {n: o.state for n, o in run.stages.items() if n in graph}


def to_dot(graph: Graph, run: Run | None = None, *, title: str | None = None) -> str:
    """Graphviz DOT source for the graph, colored by the run's states if given."""
    states = _states(graph, run)
    lines = ["digraph pipeline {", '  rankdir="TB";',
             ('  node [shape=box, style="rounded,filled", fontname="Helvetica", '
              'fillcolor="#ffffff"];'), '  edge [color="#555555"];']
    if title:
        lines.append(f"  label={_q(title)}; labelloc=t;")
    for stage in graph:
        label = stage.name
        local = [f"{r.name} ({r.kind})" for r in stage.local_resources]
        if local:
            label += "\n[" + ", ".join(local) + "]"
        state = states.get(stage.name)
        if state is not None:
            label += f"\n{state.value}"
        attrs_ = [f"label={_q(label)}"]
        if state is not None:
            attrs_.append(f"fillcolor={_q(STATE_COLORS[state])}")
        if stage.always:
            attrs_.append("peripheries=2")
        lines.append(f"  {_q(stage.name)} [{', '.join(attrs_)}];")
    for stage in graph:
        for dep in stage.deps:
            lines.append(f"  {_q(dep)} -> {_q(stage.name)};")
    for res in graph.resources:
        rid = _q("resource:" + res.name)
        lines.append(f"  {rid} [shape=ellipse, style=dashed, "
                     f"label={_q(f'{res.name} ({res.kind})')}];")
        for user in graph.users(res.name):
            lines.append(f"  {rid} -> {_q(user)} [style=dashed, arrowhead=none];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(graph: Graph, run: Run | None = None) -> str:
    """Mermaid ``flowchart`` source, with a class per state."""
    states = _states(graph, run)
    ids = {name: f"s{i}" for i, name in enumerate(graph.names)}
    out = ["flowchart TD"]
    for stage in graph:
        label = stage.name
        if stage.local_resources:
            label += "<br/>[" + ", ".join(r.name for r in stage.local_resources) + "]"
        if stage.name in states:
            label += f"<br/>{states[stage.name].value}"
        text = label.replace('"', "#quot;")
        shape = f'[["{text}"]]' if stage.always else f'["{text}"]'
        out.append(f"  {ids[stage.name]}{shape}")
    for stage in graph:
        for dep in stage.deps:
            out.append(f"  {ids[dep]} --> {ids[stage.name]}")
    for i, res in enumerate(graph.resources):
        rid = f"r{i}"
        out.append(f'  {rid}(["{res.name} ({res.kind})"])')
        for user in graph.users(res.name):
            out.append(f"  {rid} -.- {ids[user]}")
    used = sorted(set(states.values()), key=lambda s: s.value)
    for state in used:
        out.append(f"  classDef {state.value} fill:{STATE_COLORS[state]}")
    for name, state in states.items():
        out.append(f"  class {ids[name]} {state.value}")
    return "\n".join(out) + "\n"


def to_text(graph: Graph, run: Run | None = None) -> str:
    """A compact listing for terminals: one line per stage, in order.

    ``+ name  <- deps  [resources]  (state, 1.2 s)``; the first character is
    the state (``+`` finished, ``=`` reused, ``x`` failed, ``-`` abandoned,
    ``!`` cancelled, ``.`` pending).
    """
    lines = []
    width = max((len(n) for n in graph.names), default=0)
    for stage in graph:
        outcome = run.stages.get(stage.name) if run is not None else None
        mark = _SYMBOLS[outcome.state] if outcome is not None else " "
        text = f"{mark} {stage.name:<{width}}"
        if stage.deps:
            text += "  <- " + ", ".join(stage.deps)
        res = [r if isinstance(r, str) else f"{r.name}:{r.kind}" for r in stage.resources]
        if res:
            text += "  [" + ", ".join(res) + "]"
        if stage.always:
            text += "  (always)"
        if outcome is not None:
            info = outcome.state.value
            if outcome.duration is not None:
                info += f", {outcome.duration:.3g} s"
            text += f"  ({info})"
            if outcome.error and outcome.state is StageState.FAILED:
                text += f"\n    {outcome.error}"
        lines.append(text.rstrip())
    if run is not None:
        lines.append(f"run {run.status.value}: " + ", ".join(
            f"{k} {v}" for k, v in sorted(_count(run).items())))
    return "\n".join(lines) + "\n"


def _count(run: Run) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in run.stages.values():
        counts[o.state.value] = counts.get(o.state.value, 0) + 1
    return counts


def render_image(graph: Graph, path: str | Path, run: Run | None = None, *,
                 format: str | None = None, timeout: float = 60.0) -> Path:
    """Write an SVG or PNG (by ``format`` or the file suffix) through Graphviz ``dot``."""
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in ("svg", "png"):
        raise PipelineError(f"{path}: cannot render format {fmt!r}; use .svg or .png")
    dot = shutil.which("dot")
    if dot is None:
        raise PipelineError("Graphviz 'dot' is not on PATH (Debian package graphviz); "
                            "use to_dot() or to_mermaid() instead")
    try:
        proc = subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=to_dot(graph, run),
                              text=True, capture_output=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise PipelineError(f"Graphviz dot took more than {timeout} s rendering {path}") from exc
    if proc.returncode != 0:
        raise PipelineError(f"Graphviz dot failed rendering {path} "
                            f"(exit {proc.returncode}): {proc.stderr.strip()}")
    return path

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
from typing import Any

from pipeline.definition import Graph
from pipeline.errors import PipelineError
from pipeline.state import Run, StageState

__all__ = ["STATE_COLORS", "render_image", "to_dot", "to_mermaid", "to_text", "to_timeline"]

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
    lines += _dot_stages(graph, states, "", "  ")
    lines += _dot_edges(graph, "")
    for res in graph.resources:
        rid = _q("resource:" + res.name)
        lines.append(f"  {rid} [shape=ellipse, style=dashed, "
                     f"label={_q(f'{res.name} ({res.kind})')}];")
        for user in graph.users(res.name):
            lines.append(f"  {rid} -> {_q(user)} [style=dashed, arrowhead=none];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _ends(graph: Graph, prefix: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per stage: the node ids its incoming and its outgoing edges attach to (a
    sub-graph stage's inner roots and leaves, recursively)."""
    heads: dict[str, list[str]] = {}
    tails: dict[str, list[str]] = {}
    for stage in graph:
        node = prefix + stage.name
        sub = stage.subgraph
        if sub is None:
            heads[stage.name] = tails[stage.name] = [node]
            continue
        inner_heads, inner_tails = _ends(sub, node + "/")
        used = {d for s in sub for d in s.deps}
        heads[stage.name] = [h for s in sub if not s.deps for h in inner_heads[s.name]]
        tails[stage.name] = [t for s in sub if s.name not in used for t in inner_tails[s.name]]
    return heads, tails


def _dot_stages(graph: Graph, states: Mapping[str, StageState], prefix: str,
                indent: str) -> list[str]:
    lines = []
    for stage in graph:
        node = prefix + stage.name
        state = states.get(stage.name) if not prefix else None
        if stage.subgraph is not None:
            label = stage.name + (f" ({state.value})" if state is not None else "")
            lines.append(f"{indent}subgraph {_q('cluster_' + node)} {{")
            lines.append(f"{indent}  label={_q(label)}; style=\"rounded,dashed\";")
            if state is not None:
                lines.append(f"{indent}  bgcolor={_q(STATE_COLORS[state])};")
            lines += _dot_stages(stage.subgraph, {}, node + "/", indent + "  ")
            lines += _dot_edges(stage.subgraph, node + "/", indent + "  ")
            lines.append(f"{indent}}}")
            continue
        label = stage.name
        local = [f"{r.name} ({r.kind})" for r in stage.local_resources]
        if local:
            label += "\n[" + ", ".join(local) + "]"
        if state is not None:
            label += f"\n{state.value}"
        attrs_ = [f"label={_q(label)}"]
        if state is not None:
            attrs_.append(f"fillcolor={_q(STATE_COLORS[state])}")
        if stage.always:
            attrs_.append("peripheries=2")
        lines.append(f"{indent}{_q(node)} [{', '.join(attrs_)}];")
    return lines


def _dot_edges(graph: Graph, prefix: str, indent: str = "  ") -> list[str]:
    heads, tails = _ends(graph, prefix)
    return [f"{indent}{_q(a)} -> {_q(b)};" for stage in graph for dep in stage.deps
            for a in tails[dep] for b in heads[stage.name]]


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
        if stage.subgraph is not None:
            out += _mermaid_subgraph(stage.subgraph, ids[stage.name], text, "  ")
            continue
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


def _mermaid_subgraph(graph: Graph, sid: str, label: str, indent: str) -> list[str]:
    """A sub-graph stage as a Mermaid subgraph (edges to it attach to the box)."""
    ids = {name: f"{sid}_{i}" for i, name in enumerate(graph.names)}
    out = [f'{indent}subgraph {sid} ["{label}"]']
    for stage in graph:
        text = stage.name.replace('"', "#quot;")
        if stage.subgraph is not None:
            out += _mermaid_subgraph(stage.subgraph, ids[stage.name], text, indent + "  ")
        else:
            out.append(f'{indent}  {ids[stage.name]}["{text}"]')
    for stage in graph:
        for dep in stage.deps:
            out.append(f"{indent}  {ids[dep]} --> {ids[stage.name]}")
    out.append(f"{indent}end")
    return out


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
        if stage.subgraph is not None:
            inner = to_text(stage.subgraph).rstrip("\n").splitlines()
            lines += ["    | " + line for line in inner]
    if run is not None:
        lines.append(f"run {run.status.value}: " + ", ".join(
            f"{k} {v}" for k, v in sorted(run.state_counts().items())))
    return "\n".join(lines) + "\n"


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


# --- a run as a timeline -------------------------------------------------------------

_ROW = 18
_LABEL = 220
_CHART = 640


def _kinds_of(definition: Mapping[str, Any]) -> dict[str, list[str]]:
    """Stage name -> the kinds of the resources it holds (from a graph definition)."""
    shared = {r["name"]: r.get("kind", r["name"]) for r in definition.get("resources", [])}
    out: dict[str, list[str]] = {}
    for s in definition.get("stages", []):
        kinds = []
        for r in s.get("resources", []):
            kinds.append(shared.get(r, r) if isinstance(r, str) else r.get("kind", r["name"]))
        out[s["name"]] = kinds
    return out


def to_timeline(definition: Mapping[str, Any], run: Run) -> str:
    """An SVG Gantt chart of a run: a bar per stage that ran (start to end, its
    state's colour, its attempts), and under it each resource kind's
    occupancy over time (how many of its stages held one). ``definition`` is
    the graph's canonical definition (a run directory's graph.json)."""
    from xml.sax.saxutils import escape

    kinds = _kinds_of(definition)
    order = [s["name"] for s in definition.get("stages", [])]
    timed = {n: o for n, o in run.stages.items() if o.started is not None}
    starts = [o.started for o in timed.values() if o.started is not None]
    ends = [o.ended for o in timed.values() if o.ended is not None]
    t0 = min(starts, default=run.started or 0.0)
    t1 = max([*ends, *starts, run.ended or 0.0, t0 + 1e-3])
    span = t1 - t0

    def x(t: float) -> float:
        return _LABEL + (t - t0) / span * _CHART

    # Stages in order of their start (then the graph's), those that never ran last.
    rows = sorted(order, key=lambda n: (timed[n].started if n in timed else float("inf"),
                                        order.index(n)))
    kind_names = sorted({k for n in timed for k in kinds.get(n, [])})
    height = 40 + _ROW * len(rows) + 30 + 50 * len(kind_names) + 20
    width = _LABEL + _CHART + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<title>run {escape(run.run_dir.name if run.run_dir else "")}: '
           f'{run.status.value}, {span:.3f} s</title>',
           f'<text x="4" y="14" font-weight="bold">run '
           f'{escape(run.run_dir.name if run.run_dir else "")}: {run.status.value}, '
           f'{span:.3f} s</text>']
    for i in range(6):  # the time axis
        t = span * i / 5
        px = _LABEL + _CHART * i / 5
        out.append(f'<line x1="{px:.1f}" y1="22" x2="{px:.1f}" y2="{height - 20}" '
                   f'stroke="#dddddd"/>')
        out.append(f'<text x="{px:.1f}" y="32" text-anchor="middle">{t:.3g} s</text>')
    y = 40
    for name in rows:
        o = run.stages.get(name)
        label = escape(name if len(name) <= 34 else "…" + name[-33:])
        out.append(f'<text x="4" y="{y + 12}">{label}</text>')
        if o is not None and o.started is not None:
            end = o.ended if o.ended is not None else t1
            w = max(x(end) - x(o.started), 1.0)
            tries = f", {o.attempts} attempts" if o.attempts > 1 else ""
            out.append(f'<rect class="stage" data-stage="{escape(name)}" '
                       f'x="{x(o.started):.1f}" y="{y + 2}" width="{w:.1f}" '
                       f'height="{_ROW - 4}" fill="{STATE_COLORS[o.state]}" '
                       f'stroke="#555555"><title>{escape(name)}: {o.state.value}, '
                       f'{end - o.started:.3f} s{tries}</title></rect>')
            if o.attempts > 1:
                out.append(f'<text x="{x(end) + 3:.1f}" y="{y + 12}">×{o.attempts}</text>')
        else:
            state = o.state.value if o is not None else "pending"
            out.append(f'<text x="{_LABEL + 4}" y="{y + 12}" fill="#888888">({state}, '
                       f'not run)</text>')
        y += _ROW
    y += 30
    for kind in kind_names:  # each kind's occupancy: a step line over time
        steps: list[tuple[float, int]] = []
        for n, o in timed.items():
            held = kinds.get(n, []).count(kind)
            if held and o.started is not None:
                steps.append((o.started, held))
                steps.append((o.ended if o.ended is not None else t1, -held))
        steps.sort(key=lambda s: (s[0], s[1]))
        peak, level, points = 0, 0, [(x(t0), 0)]
        for t, d in steps:
            points.append((x(t), level))
            level += d
            points.append((x(t), level))
            peak = max(peak, level)
        points.append((x(t1), level))
        scale = 36 / max(peak, 1)
        path = " ".join(f"{px:.1f},{y + 40 - lv * scale:.1f}" for px, lv in points)
        out.append(f'<text x="4" y="{y + 24}">{escape(kind)} (at most {peak})</text>')
        out.append(f'<polyline class="occupancy" data-kind="{escape(kind)}" points="{path}" '
                   f'fill="none" stroke="#3366cc" stroke-width="1.5"/>')
        out.append(f'<line x1="{_LABEL}" y1="{y + 40}" x2="{_LABEL + _CHART}" y2="{y + 40}" '
                   f'stroke="#999999"/>')
        y += 50
    out.append("</svg>")
    return "\n".join(out) + "\n"

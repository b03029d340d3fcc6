"""``python -m pipeline`` (also ``pipeline-run``): run, resume, draw and question anyone's graphs.

::

    pipeline-run run MODULE:ATTR [--run-root DIR] [--stop-after STAGE]... [--caps KIND=N]...
                     [--progress auto|tty|plain|json]
    pipeline-run runs [--run-root DIR]
    pipeline-run resume RUN [--run-root DIR] [--from STAGE]... [--stop-after STAGE]...
                     [--caps KIND=N]... [--progress ...]
    pipeline-run show RUN|MODULE:ATTR [--run-root DIR]
                     [--format text|dot|mermaid|svg|png|timeline] [-o FILE]
    pipeline-run why RUN STAGE [--run-root DIR]

``MODULE:ATTR`` names a :class:`~pipeline.Graph`, or a function of no
arguments returning one: ``MODULE`` is a module importable from the current
directory (``pkg.mod``) or a Python file (``path/to/graphs.py``). A run
records where its graph came from (``target.json`` in its directory), so
``resume RUN`` and ``show RUN`` find it again; ``resume`` refuses a graph
whose definition changed since (as :func:`pipeline.resume` does). ``show
RUN`` draws any run directory from its ``graph.json`` alone, each stage in
the colour of its state. ``RUN`` is a run id under ``--run-root`` (default
``./pipeline-runs``, or ``$PIPELINE_RUN_ROOT``) or a run directory.

Exit codes: 0 the run finished (or stopped where asked); 1 a stage failed,
or an error, told in one line on stderr; 2 a usage error; 130 cancelled by
SIGINT or SIGTERM (cleanup done).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.caps import Caps
from pipeline.definition import Graph, Stage
from pipeline.errors import PipelineError, RunCancelled, RunFailed
from pipeline.events import JsonProgress, PlainProgress, RichProgress, Subscriber
from pipeline.state import (
    GRAPH,
    JournalState,
    Run,
    RunStatus,
    StageState,
    load_run,
    new_run_dir,
)

__all__ = ["main"]

TARGET_FILE = "target.json"
DEFAULT_RUN_ROOT = "pipeline-runs"


class UsageError(Exception):
    """A mistake of the command line's user: one line, exit 1."""


# -- graphs by name -------------------------------------------------------------------


def load_target(target: str, *, base: Path | None = None) -> Graph:
    """The graph ``MODULE:ATTR`` names (see the module docstring)."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{target!r}: expected MODULE:ATTR (a module or .py file, and the "
                         f"name of a Graph or of a function returning one)")
    root = base or Path.cwd()
    if module_name.endswith(".py"):
        path = (root / module_name).resolve()
        if not path.is_file():
            raise UsageError(f"{target}: no file {path}")
        spec = importlib.util.spec_from_file_location(f"_pipeline_target_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's module failed: say so in one line
            raise UsageError(f"{target}: importing {path} failed: "
                             f"{type(exc).__name__}: {exc}") from exc
    else:
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise UsageError(f"{target}: no module {module_name!r} ({exc})") from exc
        except Exception as exc:  # the user's module failed: say so in one line
            raise UsageError(f"{target}: importing {module_name} failed: "
                             f"{type(exc).__name__}: {exc}") from exc
    value = getattr(module, attr, None)
    if value is None:
        raise UsageError(f"{target}: {module_name} has no attribute {attr!r}")
    if callable(value) and not isinstance(value, Graph):
        try:
            value = value()
        except Exception as exc:  # the user's function failed
            raise UsageError(f"{target}: {attr}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(value, Graph):
        raise UsageError(f"{target}: {attr} is a {type(value).__name__}, not a Graph (or a "
                         f"function returning one)")
    return value


def _record_target(run_dir: Path, target: str) -> None:
    (run_dir / TARGET_FILE).write_text(json.dumps({"target": target,
                                                   "cwd": str(Path.cwd())}) + "\n")


def _recorded_target(run_dir: Path) -> Graph:
    try:
        saved = json.loads((run_dir / TARGET_FILE).read_text())
        target, cwd = str(saved["target"]), Path(saved["cwd"])
    except FileNotFoundError:
        raise UsageError(f"run {run_dir.name} was not started by 'pipeline-run run' (no "
                         f"{TARGET_FILE}): resume it from Python") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{run_dir / TARGET_FILE}: unreadable: {exc}") from None
    return load_target(target, base=cwd)


def _shape_of(run_dir: Path) -> Graph:
    """The graph of a run directory as drawn: its stages, dependencies and
    sub-graphs, from graph.json (the functions are not needed to draw it)."""
    try:
        definition = json.loads((run_dir / GRAPH).read_text())["definition"]
        return _shape(definition)
    except FileNotFoundError:
        raise UsageError(f"{run_dir}: not a run directory (no {GRAPH})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{run_dir / GRAPH}: unreadable: {exc}") from None


async def _nothing(ctx: Any) -> None:
    return None


def _shape(definition: dict[str, Any]) -> Graph:
    return Graph(stages=[
        Stage(name=s["name"], fn=_nothing, deps=s.get("deps", ()),
              always=bool(s.get("always", False)),
              subgraph=_shape(s["subgraph"]) if "subgraph" in s else None)
        for s in definition["stages"]])


def _find_run(args: argparse.Namespace, run: str) -> Path:
    direct = Path(run)
    if direct.is_dir() and (direct / GRAPH).exists():
        return direct
    candidate = _run_root(args) / run
    if candidate.is_dir():
        return candidate
    raise UsageError(f"no run {run!r} in {_run_root(args)} (see 'pipeline-run runs')")


def _run_root(args: argparse.Namespace) -> Path:
    root = args.run_root or os.environ.get("PIPELINE_RUN_ROOT") or DEFAULT_RUN_ROOT
    return Path(root)


# -- options --------------------------------------------------------------------------


def _caps(items: Sequence[str]) -> Caps | None:
    kinds: dict[str, int] = {}
    for item in items:
        kind, sep, value = item.partition("=")
        try:
            number = int(value)
        except ValueError:
            number = 0
        if not sep or not kind or number < 1:
            raise UsageError(f"--caps {item!r}: expected KIND=N with N >= 1")
        kinds[kind] = number
    return Caps(kinds=kinds) if kinds else None


def _subscribers(mode: str) -> list[Subscriber]:
    if mode == "auto":
        mode = "tty" if sys.stderr.isatty() else "plain"
    if mode == "tty":
        return [RichProgress()]
    if mode == "plain":
        return [PlainProgress()]
    return [JsonProgress()]


def _check_names(graph: Graph, names: Sequence[str], flag: str) -> None:
    for name in names:
        if name not in graph:
            raise UsageError(f"{flag} {name!r}: no such stage; stages: "
                             f"{', '.join(sorted(graph.names))}")


# -- commands -------------------------------------------------------------------------


def _finish(run: Run) -> int:
    where = run.run_dir.name if run.run_dir else "(in memory)"
    if run.status is RunStatus.STOPPED:
        print(f"pipeline: run {where} stopped as asked; continue with: pipeline-run resume "
              f"{where}", file=sys.stderr)
        return 0
    if run.status is RunStatus.FINISHED:
        print(f"pipeline: run {where} finished", file=sys.stderr)
        return 0
    failed = run.names(StageState.FAILED)
    print(f"pipeline: run {where} {run.status.value}"
          + (f": {run.stages[failed[0]].error}" if failed else "")
          + f" (why: pipeline-run why {where} STAGE)", file=sys.stderr)
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.sync import run_sync

    graph = load_target(args.target)
    _check_names(graph, args.stop_after, "--stop-after")
    caps = _caps(args.caps)
    run_dir = new_run_dir(_run_root(args))
    _record_target(run_dir, args.target)
    print(f"pipeline: run {run_dir.name} in {run_dir.parent}", file=sys.stderr)
    return _run(lambda: run_sync(graph, run_dir=run_dir, stop_after=args.stop_after or None,
                                 caps=caps, subscribers=_subscribers(args.progress),
                                 check=False))


def cmd_resume(args: argparse.Namespace) -> int:
    from pipeline.sync import run_sync

    run_dir = _find_run(args, args.run)
    graph = _recorded_target(run_dir)
    _check_names(graph, args.from_stage, "--from")
    _check_names(graph, args.stop_after, "--stop-after")
    caps = _caps(args.caps)
    return _run(lambda: run_sync(graph, resume_dir=run_dir, from_stage=args.from_stage or None,
                                 stop_after=args.stop_after or None, caps=caps,
                                 subscribers=_subscribers(args.progress), check=False))


def _run(go: Any) -> int:
    try:
        return _finish(go())
    except RunCancelled as exc:
        print(f"pipeline: cancelled by {exc.signal}; cleaned up", file=sys.stderr)
        return 130
    except RunFailed as exc:  # check=False: only if a caller asked for it
        return _finish(exc.run)


def cmd_runs(args: argparse.Namespace) -> int:
    root = _run_root(args)
    if not root.is_dir():
        print(f"pipeline: no runs in {root}", file=sys.stderr)
        return 0
    for d in sorted(root.iterdir()):
        if not (d / GRAPH).exists():
            continue
        try:
            run = load_run(d)
        except PipelineError as exc:
            print(f"{d.name}  unreadable: {exc}")
            continue
        counts = run.state_counts()
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started or 0))
        target = ""
        if (d / TARGET_FILE).exists():
            try:
                target = "  " + json.loads((d / TARGET_FILE).read_text())["target"]
            except (OSError, ValueError, KeyError):
                target = ""
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"{d.name}  {run.status.value:9}  {when}  {summary}{target}")
    return 0


FORMATS = ("text", "dot", "mermaid", "svg", "png", "timeline")


def cmd_show(args: argparse.Namespace) -> int:
    from pipeline.render import render_image, to_dot, to_mermaid, to_text

    run: Run | None = None
    if ":" in args.what and not Path(args.what).is_dir():
        graph = load_target(args.what)
    else:
        run_dir = _find_run(args, args.what)
        graph = _shape_of(run_dir)
        run = load_run(run_dir)
    fmt = args.format or (Path(args.output).suffix.lstrip(".") if args.output else "text")
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    if fmt == "timeline":
        if run is None or run.run_dir is None:
            raise UsageError("--format timeline draws a run: give RUN, not MODULE:ATTR")
        from pipeline.render import to_timeline

        svg = to_timeline(json.loads((run.run_dir / GRAPH).read_text())["definition"], run)
        if args.output:
            Path(args.output).write_text(svg)
        else:
            sys.stdout.write(svg)
        return 0
    if fmt in ("svg", "png"):
        if not args.output:
            raise UsageError(f"--format {fmt} writes a file: give -o FILE")
        print(render_image(graph, args.output, run, format=fmt))
        return 0
    text = {"text": to_text, "dot": to_dot, "mermaid": to_mermaid}[fmt](graph, run)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def why(graph: Graph, run: Run, stage: str, journal: JournalState | None = None) -> str:
    """One line: what happened to ``stage`` in ``run``, what it waits for while
    the run goes on (``journal``: the run's, for its cap waits), or why it
    did not run."""
    if stage not in graph:
        raise UsageError(f"no stage {stage!r} in this run; stages: "
                         f"{', '.join(sorted(graph.names))}")
    wait = journal.waits.get(stage) if journal is not None else None
    if wait is not None and run.status is RunStatus.RUNNING:
        cap = str(wait["cap"])
        caps = journal.caps if journal is not None else {}
        limit = caps.get("running") if cap == "running" else caps.get("kinds", {}).get(cap)
        since = time.time() - float(wait["time"] or time.time())
        return (f"{stage} waits for cap {cap!r}" + (f" (at most {limit} at once)" if limit
                                                    else "")
                + f", for {since:.1f} s: its dependencies are done")
    outcome = run.stages.get(stage)
    state = outcome.state if outcome is not None else StageState.PENDING
    if state.ok:
        took = outcome.duration if outcome is not None else None
        return f"{stage} {state.value}" + (f" in {took:.2f} s" if took is not None else "")
    if state is StageState.FAILED:
        assert outcome is not None
        return f"{stage} failed: {outcome.error}"
    if state is StageState.CANCELLED:
        return f"{stage} was cancelled (the run was: {run.status.value})"
    if state is StageState.RUNNING:
        return (f"{stage} was running when the run's process ended (the run is "
                f"{run.status.value}); resume runs it again")
    # Not run: find the first dependency, transitively, that did not get through.
    seen: set[str] = set()
    todo = list(graph[stage].deps)
    while todo:
        dep = todo.pop(0)
        if dep in seen:
            continue
        seen.add(dep)
        dep_out = run.stages.get(dep)
        dep_state = dep_out.state if dep_out is not None else StageState.PENDING
        if dep_state is StageState.FAILED:
            assert dep_out is not None
            return f"{stage} did not run: its dependency {dep} failed: {dep_out.error}"
        if dep_state is StageState.CANCELLED:
            return f"{stage} did not run: its dependency {dep} was cancelled"
        if not dep_state.ok:
            todo.extend(graph[dep].deps)
    if run.status is RunStatus.STOPPED:
        return f"{stage} did not run: the run stopped as asked before it (resume continues)"
    if run.status is RunStatus.RUNNING and all(
            (o := run.stages.get(d)) is not None and o.state.ok for d in graph[stage].deps):
        return (f"{stage} has not ended: its dependencies are done and it waits for no cap, "
                f"so it runs now (or the run's process died)")
    if run.status is RunStatus.CANCELLED:
        return f"{stage} did not run: the run was cancelled"
    return f"{stage} did not run ({state.value}; the run is {run.status.value})"


def cmd_why(args: argparse.Namespace) -> int:
    from pipeline.state import read_journal

    run_dir = _find_run(args, args.run)
    print(why(_shape_of(run_dir), load_run(run_dir), args.stage, read_journal(run_dir)))
    return 0


# -- the parser -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline-run", description="Run, resume, draw and question pipeline graphs.",
        epilog="Exit codes: 0 finished or stopped as asked; 1 a stage failed or an error; "
               "2 a usage error; 130 cancelled by a signal.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def root(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run-root", metavar="DIR",
                       help=f"where runs live (default: $PIPELINE_RUN_ROOT or "
                            f"./{DEFAULT_RUN_ROOT})")

    def running(p: argparse.ArgumentParser) -> None:
        p.add_argument("--stop-after", action="append", default=[], metavar="STAGE",
                       help="stop once STAGE is done (repeatable)")
        p.add_argument("--caps", action="append", default=[], metavar="KIND=N",
                       help="at most N resources of KIND at once (repeatable)")
        p.add_argument("--progress", choices=("auto", "tty", "plain", "json"), default="auto",
                       help="how to show stages on stderr (auto: tty on a terminal, else "
                            "plain)")

    p = sub.add_parser("run", help="run a graph in a new run directory")
    p.add_argument("target", metavar="MODULE:ATTR")
    root(p)
    running(p)
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("runs", help="list the runs and their state")
    root(p)
    p.set_defaults(handler=cmd_runs)

    p = sub.add_parser("resume", help="continue a stopped or failed run")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--from", dest="from_stage", action="append", default=[], metavar="STAGE",
                   help="run STAGE and what follows it again (repeatable)")
    root(p)
    running(p)
    p.set_defaults(handler=cmd_resume)

    p = sub.add_parser("show", help="draw a graph, or a run with its stages' states")
    p.add_argument("what", metavar="RUN|MODULE:ATTR")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="text (default), dot, mermaid, svg or png (these two need -o), or "
                        "timeline (a run's Gantt chart with each resource kind's occupancy, "
                        "as SVG)")
    p.add_argument("-o", "--output", metavar="FILE")
    root(p)
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("why", help="why a stage of a run did not run, or what it did")
    p.add_argument("run", metavar="RUN")
    p.add_argument("stage", metavar="STAGE")
    root(p)
    p.set_defaults(handler=cmd_why)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (UsageError, PipelineError) as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pipeline: interrupted", file=sys.stderr)
        return 130

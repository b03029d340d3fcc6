"""Resume: continue a stopped, failed or cancelled run in its own directory.

:func:`plan_resume` reads the journal and decides, without running anything,
which stored results are reused; :func:`resume` then runs the rest with a
:class:`~pipeline.runner.Runner` (the journal gets a new attempt).

Caveats:

- Resume refuses (:class:`~pipeline.errors.ResumeMismatch`) when the graph's
  digest differs from the run's; the error names the stages that changed when
  the run directory still has ``graph.json``.
- A stage whose result was not stored (``NOT_SERIALIZABLE``) re-runs when a
  re-running stage depends on it, and so on upwards.
- Every stage after a re-running one re-runs; after a failure that means the
  ``always`` stages (cleanup) that followed it, which ran then and must run
  again after the stage they clean up after.
- Shared resources are acquired afresh; nothing of the old process survives
  but the journal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.caps import CapacityLimiter, Caps
from pipeline.definition import Graph
from pipeline.errors import DefinitionError, ResumeMismatch
from pipeline.events import Subscriber
from pipeline.runner import Runner
from pipeline.state import GRAPH, Run, StageState, decode_result, read_journal

__all__ = ["plan_resume", "resume"]


def _changed_stages(run_dir: Path, graph: Graph) -> list[str]:
    """Names (and graph-level keys) whose definition differs from the run's graph.json."""
    try:
        old = json.loads((run_dir / GRAPH).read_text())["definition"]
    except (OSError, ValueError, KeyError):
        return []
    new = graph.definition()
    olds = {s["name"]: s for s in old.get("stages", [])}
    news = {s["name"]: s for s in new["stages"]}
    changed = sorted(n for n in olds.keys() | news.keys() if olds.get(n) != news.get(n))
    changed.extend(f"<graph {key}>" for key in ("version", "params", "resources")
                   if old.get(key) != new.get(key))
    return changed


def _add_followers(graph: Graph, rerun: set[str], *, always_only: bool = False) -> None:
    """Add to ``rerun`` every stage after one in it (only ``always`` ones if asked)."""
    for name in graph.names:  # dependencies before their users
        if name not in rerun and (graph[name].always or not always_only) \
                and any(dep in rerun for dep in graph[name].deps):
            rerun.add(name)


def plan_resume(run_dir: str | Path, graph: Graph,
                from_stage: str | Sequence[str] | None = None) -> tuple[dict[str, Any], int]:
    """Which results a resume reuses (decoded), and the next attempt number.

    ``from_stage``: a stage name, or several, to re-run with what follows them.

    Refuses with :class:`ResumeMismatch` when the graph's digest changed.
    """
    run_dir = Path(run_dir)
    js = read_journal(run_dir)
    if js.digest != graph.digest:
        raise ResumeMismatch(run_dir, js.digest, graph.digest, _changed_stages(run_dir, graph))
    starts = (from_stage,) if isinstance(from_stage, str) else tuple(from_stage or ())
    for name in starts:
        if name not in graph:
            raise DefinitionError(f"from_stage names unknown stage {name!r}",
                                  field="from_stage")
    finished = {n: r for n, r in js.records.items()
                if n in graph and r.state in (StageState.FINISHED, StageState.REUSED)}
    rerun = {n for n in graph.names if n not in finished}
    rerun.update(starts)
    # What follows a re-running stage re-runs: after a failure that is only
    # the ``always`` stages (cleanup that ran after the failure must run again
    # after the stage it cleans up after).
    _add_followers(graph, rerun)
    for name in reversed(graph.names):  # users before their dependencies
        if name in rerun:
            for dep in graph[name].deps:
                if dep not in rerun and not finished[dep].serialized:
                    rerun.add(dep)
    # A dependency re-run for its value does its work again: its cleanup too.
    _add_followers(graph, rerun, always_only=True)
    reused = {n: decode_result(graph[n], finished[n].result)
              for n in graph.names if n not in rerun}
    return reused, js.attempt + 1


async def resume(
    run_dir: str | Path,
    graph: Graph,
    *,
    from_stage: str | Sequence[str] | None = None,
    stop_after: str | Sequence[str] | None = None,
    caps: Caps | None = None,
    subscribers: Iterable[Subscriber] = (),
    durability: str = "flush",
    fail_fast: bool = False,
    limiters: Mapping[str, CapacityLimiter] | None = None,
) -> Run:
    """Continue a run in its directory.

    Stages that finished with a stored result are reused, except ``from_stage``
    (one name or several) and everything after it; stages whose results were not serializable re-run
    when a re-running stage needs them. Shared resources are acquired afresh.
    """
    reused, attempt = plan_resume(run_dir, graph, from_stage)
    runner = Runner(graph, run_dir=run_dir, caps=caps, subscribers=subscribers,
                    durability=durability, fail_fast=fail_fast, limiters=limiters)
    return await runner._execute(stop_after=stop_after, reused=reused, attempt=attempt,
                                 from_stage=from_stage)

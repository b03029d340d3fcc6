"""A graph as one stage of another: :func:`as_stage`.

Above the runner and resume (it runs the inner graph with them), so that
the definitions below know nothing of running.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.caps import Caps
from pipeline.definition import Graph, Resource, Stage
from pipeline.errors import PipelineError
from pipeline.events import Event, EventKind
from pipeline.resume import resume
from pipeline.runner import Runner
from pipeline.state import GRAPH, StageState

__all__ = ["as_stage"]

_REPORTED = (EventKind.STAGE_FINISHED, EventKind.STAGE_FAILED, EventKind.STAGE_REUSED,
             EventKind.STAGE_CANCELLED)


def as_stage(inner: Graph, name: str, *, deps: Iterable[str] = (),
             resources: Iterable[Resource | str] = (), caps: Caps | None = None,
             timeout: float | None = None, retries: int = 0,
             description: str = "") -> Stage:
    """``inner`` as one stage of another graph.

    The stage runs the graph to its end, with its own ``caps`` and its own
    shared resources, while it holds ``resources`` of the outer graph. Its
    result maps each inner stage to its result (``ctx.results[name]["inner"]``);
    a failed inner stage fails the stage, naming it (``name/inner``). The
    inner run keeps its directory in the outer one's (``subgraphs/<name>``):
    when the outer run is resumed and this stage runs again, the inner run is
    resumed too, its finished stages reused. The inner graph's digest is part
    of the outer one's. Drawn as a cluster (DOT) or a subgraph (Mermaid).
    """

    async def run_subgraph(ctx: Any) -> dict[str, Any]:
        def forward(event: Event) -> None:
            if event.stage is not None and event.kind in _REPORTED:
                ctx.log(f"{name}/{event.stage}: {event.kind.value.removeprefix('stage_')}")

        sub_dir = ctx.run_dir / "subgraphs" / name if ctx.run_dir is not None else None
        if sub_dir is not None and (sub_dir / GRAPH).exists():
            run = await resume(sub_dir, inner, caps=caps, subscribers=[forward])
        else:
            if sub_dir is not None:
                sub_dir.mkdir(parents=True)
            run = await Runner(inner, run_dir=sub_dir, caps=caps, subscribers=[forward]).run()
        failed = run.names(StageState.FAILED)
        if failed:
            first = run.stages[failed[0]]
            raise PipelineError(f"inner stage {name}/{failed[0]} failed: "
                                f"{first.error or 'failed'}")
        return {n: o.result for n, o in run.stages.items() if o.state.ok}

    return Stage(name=name, fn=run_subgraph, deps=deps, resources=resources, timeout=timeout,
                 retries=retries, version=f"graph:{inner.digest}",
                 description=description or f"the graph of {len(inner.names)} stages",
                 subgraph=inner)

"""Real run records for the tests of pruning: tiny graphs run by the real Runner."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from pipeline import Graph, Runner, Stage, new_run_dir
from stages.context import BuildSpec
from stages.request import BuildConstraints, BuildRequest
from stages.service.runs import build_key, save_specs

__all__ = ["DAY", "age", "make_run"]

DAY = 86400.0


def _request() -> BuildRequest:
    return BuildRequest(command_args=["/bin/sh", "-c", "true"], working_dir="build",
                        scratch_paths=["build"], inputs_dir="nix/store", outputs=["build/out"],
                        constraints=BuildConstraints(system="x86_64-linux"))


def make_run(runs_dir: Path, n_builds: int = 1, *, days: float = 0.0, fail: bool = False,
             builds_json: bool = True, label: str = "") -> Path:
    """A real run of ``n_builds`` tiny builds, last active ``days`` ago."""
    run_dir = new_run_dir(runs_dir, label)
    keys = [build_key(run_dir, i, n_builds) for i in range(n_builds)]
    if builds_json:
        save_specs(run_dir, [BuildSpec(request=_request(), key=k) for k in keys], None)

    async def ok(ctx) -> dict:
        if fail and ctx.name.endswith("run"):
            raise RuntimeError("builder failed")
        return {}

    graphs = []
    for key in keys:
        g = Graph(stages=[Stage(name="validate", fn=ok), Stage(name="run", fn=ok,
                                                               deps=["validate"]),
                          Stage(name="teardown", fn=ok, deps=["run"], always=True)])
        graphs.append(g if n_builds == 1 else g.prefixed(key))
    graph = graphs[0] if n_builds == 1 else Graph.compose(*graphs)
    asyncio.run(Runner(graph, run_dir=run_dir).run())
    age(run_dir, days)
    return run_dir


def age(run_dir: Path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(run_dir / "journal.jsonl", (t, t))
    os.utime(run_dir, (t, t))

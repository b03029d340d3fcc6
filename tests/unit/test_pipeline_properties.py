"""Hypothesis over random DAGs with random failures and cancellations.

Invariants checked against an independent tracker (not the runner's own
bookkeeping): no stage starts before its dependencies end; caps are never
exceeded; every acquired resource is released exactly once; teardown
(``always``) stages always run; the state on disk matches what happened; and
without cancellation, each stage's state is what the failure rules predict.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_tracker import Tracker, build
from strategies import dag_specs

from pipeline import Caps, Runner, RunStatus, StageState, load_run

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def expected_states(spec) -> dict[str, StageState]:
    ok: dict[int, bool] = {}
    out = {}
    for i, deps in enumerate(spec.deps):
        if i in spec.always:
            ok[i] = True
            out[f"s{i}"] = StageState.FINISHED
        elif all(ok[d] for d in deps):
            ok[i] = i not in spec.fail
            out[f"s{i}"] = StageState.FINISHED if ok[i] else StageState.FAILED
        else:
            ok[i] = False
            out[f"s{i}"] = StageState.ABANDONED
    return out


async def run_spec(spec, tracker, caps, cancel_after, run_root):
    graph = build(spec, tracker)
    runner = Runner(graph, caps=caps, run_root=run_root)
    task = asyncio.create_task(runner.run())
    cancelled = False
    if cancel_after is not None:
        await asyncio.sleep(cancel_after)
        if not task.done():
            task.cancel()
            cancelled = True
    try:
        run = await task
    except asyncio.CancelledError:
        assert cancelled
        run = runner.last_run
    return graph, runner, run, cancelled


@SETTINGS
@given(spec=dag_specs(), running=st.sampled_from([None, 1, 2, 3]),
       kind_a=st.sampled_from([1, 2]),
       cancel_after=st.one_of(st.none(), st.sampled_from([0.0, 0.001, 0.002, 0.005])))
def test_random_dags_keep_every_invariant(spec, running, kind_a, cancel_after):
    tracker = Tracker()
    caps = Caps(running=running, kinds={"a": kind_a, "pool": 1})
    root = Path(tempfile.mkdtemp(prefix="pipeline-prop-"))
    try:
        graph, runner, run, cancelled = asyncio.run(
            run_spec(spec, tracker, caps, cancel_after, root))

        start, end = tracker.times("start"), tracker.times("end")
        states = run.states()
        # Dependencies end before their users start (a teardown may run after
        # dependencies that never started).
        for stage in graph:
            if stage.name in start:
                for dep in stage.deps:
                    if dep in start:
                        assert dep in end and end[dep] < start[stage.name], (dep, stage.name)
                    else:
                        assert stage.always and not states[dep].ok, (dep, stage.name)
        # Caps.
        if running is not None:
            assert tracker.max_running <= running
        assert tracker.kind_max.get("a", 0) <= kind_a
        assert tracker.kind_max.get("pool", 0) <= 1
        stats = runner.statistics()
        assert all(s.borrowed_tokens == 0 and s.tasks_waiting == 0 for s in stats.values())
        # Every acquired resource released exactly once.
        acquired = collections.Counter(tracker.acquired)
        released = collections.Counter(tracker.released)
        assert acquired == released
        assert all(n == 1 for n in acquired.values())
        # Teardown always runs.
        for i in spec.always:
            assert states[f"s{i}"] is StageState.FINISHED
        # What the tracker saw matches the states.
        for name, state in states.items():
            if state in (StageState.FINISHED, StageState.FAILED):
                assert name in start and name in end
            if state in (StageState.ABANDONED, StageState.PENDING):
                assert name not in start
        if cancelled and run.status is not RunStatus.FINISHED:
            assert run.status in (RunStatus.CANCELLED, RunStatus.FAILED)
        else:
            # Not cancelled, or the cancel reached the awaiting task only
            # after the last stage had settled (run() still raises
            # CancelledError, with the finished run as last_run): the run
            # is then exactly what it would have been.
            assert states == expected_states(spec)
            assert run.status is (RunStatus.FAILED if any(
                s is StageState.FAILED for s in states.values()) else RunStatus.FINISHED)
        # State on disk matches.
        on_disk = load_run(run.run_dir, graph)
        assert on_disk.states() == states
        assert on_disk.status is run.status
        assert on_disk.results == {n: r for n, r in run.results.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)

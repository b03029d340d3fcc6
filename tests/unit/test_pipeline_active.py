"""The scheduler's pure state machine (pipeline.active.ActivePlan), driven by hand.

No asyncio here: each test tells the plan what happened, as the runner
does, and checks the named sets and what why_pending says. A Hypothesis
test drives random transitions and checks that the sets always partition
the stages.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import Caps, Graph, Resource, Runner, Stage
from pipeline.active import ActivePlan
from pipeline.state import StageState

# a -> b -> d, a -> c -> d, plus teardown (always) after all.
DEPS = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "teardown": ["a", "b", "c", "d"]}


def _plan(**kw: Any) -> ActivePlan:
    return ActivePlan(DEPS, always=["teardown"], **kw)


def _run(plan: ActivePlan, name: str, *, ok: bool = True) -> list[tuple[str, StageState]]:
    plan.started(name)
    if ok:
        plan.finish(name)
    else:
        plan.fail(name)
    return plan.settle(name)


def test_stages_become_ready_as_their_dependencies_settle() -> None:
    plan = _plan()
    assert set(plan.pending) == set(DEPS)
    assert plan.start() == ["a"]
    assert set(plan.ready) == {"a"}
    changes = _run(plan, "a")
    assert sorted(changes) == [("b", StageState.QUEUED), ("c", StageState.QUEUED)]
    _run(plan, "b")
    assert "d" in plan.pending  # still waits for c
    _run(plan, "c")
    assert set(plan.ready) == {"d"}


def test_why_pending_names_the_unsettled_dependencies_and_their_states() -> None:
    plan = _plan()
    plan.start()
    plan.started("a")
    reason = plan.why_pending("d")
    assert reason.pending and reason.state is StageState.PENDING
    assert reason.waits_for == (("b", StageState.PENDING), ("c", StageState.PENDING))
    assert reason.describe() == "waits for dependencies 'b' (pending), 'c' (pending)"
    assert plan.why_pending("b").describe() == "waits for dependency 'a' (running)"


def test_a_failure_abandons_its_users_and_says_why_but_teardown_still_runs() -> None:
    plan = _plan()
    plan.start()
    _run(plan, "a")
    changes = _run(plan, "b", ok=False)
    assert ("d", StageState.ABANDONED) in changes
    assert set(plan.failed) == {"b"} and set(plan.abandoned) == {"d"}
    reason = plan.why_pending("d")
    assert not reason.pending and reason.state is StageState.ABANDONED
    assert "b" in reason.describe(), reason.describe()
    _run(plan, "c")
    assert set(plan.ready) == {"teardown"}  # always: once everything settled


def test_a_ready_stage_waiting_on_a_cap_says_which() -> None:
    plan = _plan()
    plan.start()
    plan.waiting_on("a", "container")
    reason = plan.why_pending("a")
    assert reason.state is StageState.QUEUED and reason.cap == "container"
    assert "container" in reason.describe()
    plan.started("a")
    assert plan.why_pending("a").cap is None


def test_cancel_marks_the_unstarted_cancelled_in_one_path_and_spares_always() -> None:
    plan = _plan()
    plan.start()
    plan.started("a")
    marked, stop = plan.cancel("user")
    assert stop == ["a"]
    assert set(marked) == {"b", "c", "d"}
    assert "teardown" not in plan.cancelled
    assert plan.cancel("again") == ([], [])
    assert plan.cancel_reason == "user"


def test_finished_and_unselected_stages_are_not_pending() -> None:
    plan = _plan(selected=["a", "b"])
    plan.start()
    _run(plan, "a")
    assert plan.why_pending("a").describe() == "not pending: finished"
    out = plan.why_pending("d")
    assert not out.in_run and out.describe().startswith("not in this run")


_NAMES = list(DEPS)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["run", "fail", "cancel"]), st.sampled_from(_NAMES)),
                max_size=30))
def test_the_named_sets_always_partition_the_stages(steps: list[tuple[str, str]]) -> None:
    plan = _plan()
    plan.start()
    for action, _ in steps:
        ready = sorted(plan.ready)
        if action == "cancel":
            marked, stop = plan.cancel("test")
            for name in marked:
                plan.settle(name)
            for name in stop:
                plan.stage_cancelled(name)
                plan.settle(name)
            continue
        if not ready:
            break
        name = ready[0]
        _run(plan, name, ok=action == "run")
        sets = [set(s) for s in plan.sets().values()]
        union = set().union(*sets)
        assert union == set(DEPS)
        assert sum(len(s) for s in sets) == len(DEPS)


async def test_runner_why_pending_reports_a_cap_wait_live(tmp_path) -> None:
    # Two stages of kind "slot" with a cap of one: while the first holds the
    # slot, the second waits on that cap, and why_pending says so.
    release = asyncio.Event()

    @contextlib.asynccontextmanager
    async def slot(_ctx):
        yield

    async def hold(ctx):
        await release.wait()

    graph = Graph(stages=[
        Stage(name="first", fn=hold, resources=[Resource(name="r", kind="slot", factory=slot)]),
        Stage(name="second", fn=hold, resources=[Resource(name="r", kind="slot", factory=slot)]),
    ])
    runner = Runner(graph, run_root=tmp_path, caps=Caps(kinds={"slot": 1}))
    task = asyncio.create_task(runner.run())
    for _ in range(200):
        await asyncio.sleep(0.005)
        texts = {s: runner.why_pending(s) for s in ("first", "second")}
        if any("slot" in t for t in texts.values()):
            break
    assert any("slot" in t and "waits" in t for t in texts.values()), texts
    release.set()
    await task
    assert runner.why_pending("second") == "not pending: finished"

"""A hypothesis state machine that drives the scheduler one decision at a time.

Each stage waits on a gate the test controls; rules let a running stage
finish or fail, or cancel the whole run, and the invariants are checked after
every step (not only at the end): no stage runs before its dependencies are
settled, caps hold, resources are held only by running stages, and the cap
statistics agree with what is running. At teardown every gate is opened and
the end state is checked: each resource released exactly once, teardown
stages finished, the state on disk matching the run.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from pipeline_tracker import Tracker
from strategies import dag_specs

from pipeline import Caps, Graph, Runner, Stage, StageState, load_run


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.root = Path(tempfile.mkdtemp(prefix="pipeline-stateful-"))
        self.tracker = Tracker()
        self.gates: dict[str, asyncio.Future[None]] = {}
        self.task: asyncio.Task | None = None
        self.cancelled = False

    def quiesce(self) -> None:
        async def spin() -> None:
            for _ in range(30):
                await asyncio.sleep(0)
        self.loop.run_until_complete(spin())

    def make_fn(self, name: str):
        tracker = self.tracker

        async def fn(ctx):
            tracker.tick("start", ctx.name)
            tracker.running.add(ctx.name)
            tracker.max_running = max(tracker.max_running, len(tracker.running))
            try:
                gate = self.gates[ctx.name] = asyncio.get_running_loop().create_future()
                await gate
                return ctx.name
            finally:
                tracker.running.discard(ctx.name)
                tracker.tick("end", ctx.name)

        fn.__qualname__ = f"gated_{name}"
        return fn

    @initialize(spec=dag_specs(max_stages=10), running=st.sampled_from([None, 1, 2]),
                kind_a=st.sampled_from([1, 2]))
    def start(self, spec, running, kind_a):
        self.spec = spec
        self.caps = Caps(running=running, kinds={"a": kind_a, "pool": 1})
        stages = []
        for i, deps in enumerate(spec.deps):
            resources = []
            if spec.local_kind[i]:
                resources.append(self.tracker.resource(f"r{i}", kind=spec.local_kind[i]))
            if i % 3 == 0:
                resources.append("pool")
            stages.append(Stage(name=f"s{i}", fn=self.make_fn(f"s{i}"), always=i in spec.always,
                                deps=[f"s{d}" for d in deps], resources=resources))
        self.graph = Graph(stages=stages,
                           resources=[self.tracker.resource("pool", kind="pool")])
        self.runner = Runner(self.graph, caps=self.caps, run_root=self.root)
        self.task = self.loop.create_task(self.runner.run())
        self.quiesce()

    def open_gates(self) -> list[str]:
        return sorted(n for n, g in self.gates.items() if not g.done())

    @precondition(lambda self: self.task is not None)
    @rule(data=st.data())
    def finish_one(self, data):
        names = self.open_gates()
        if names:
            self.gates[data.draw(st.sampled_from(names))].set_result(None)
        self.quiesce()

    @precondition(lambda self: self.task is not None)
    @rule(data=st.data())
    def fail_one(self, data):
        names = self.open_gates()
        if names:
            self.gates[data.draw(st.sampled_from(names))].set_exception(RuntimeError("no"))
        self.quiesce()

    @precondition(lambda self: self.task is not None and not self.cancelled)
    @rule()
    def cancel(self):
        self.cancelled = True
        self.task.cancel()
        self.quiesce()

    @invariant()
    def dependencies_settled_before_start(self):
        if self.task is None:
            return
        start, end = self.tracker.times("start"), self.tracker.times("end")
        for stage in self.graph:
            if stage.name not in start:
                continue
            for dep in stage.deps:
                if dep in start:
                    assert dep in end and end[dep] < start[stage.name]
                else:
                    assert stage.always

    @invariant()
    def caps_hold_and_statistics_agree(self):
        if self.task is None:
            return
        t = self.tracker
        if self.caps.running is not None:
            assert len(t.running) <= self.caps.running
        assert t.kind_now.get("a", 0) <= self.caps.kinds["a"]
        assert t.kind_now.get("pool", 0) <= 1
        stats = self.runner.statistics()
        if not self.task.done():
            # Slots are taken before a stage's resources are entered and its
            # function runs, and given back after: never fewer than in use.
            if self.caps.running is not None:
                assert stats["running"].borrowed_tokens >= len(t.running)
                assert stats["running"].borrowed_tokens <= self.caps.running
            assert t.kind_now.get("a", 0) <= stats["a"].borrowed_tokens <= self.caps.kinds["a"]

    @invariant()
    def local_resources_only_on_running_stages(self):
        if self.task is None:
            return
        held = collections.Counter(self.tracker.acquired) - collections.Counter(
            self.tracker.released)
        for instance in held:
            name, stage = instance.split("@")
            if name != "pool":
                assert stage in self.tracker.running, instance

    def teardown(self):
        try:
            if self.task is None:
                return
            for _ in range(100):
                for name in self.open_gates():
                    self.gates[name].set_result(None)
                self.quiesce()
                if self.task.done():
                    break
            assert self.task.done(), "the run did not end once every gate was open"
            run = self.runner.last_run
            t = self.tracker
            acquired = collections.Counter(t.acquired)
            assert acquired == collections.Counter(t.released)
            assert all(n == 1 for n in acquired.values())
            started = t.times("start")
            for i in self.spec.always:  # teardown ran (the test may have failed it)
                assert f"s{i}" in started
                assert run.stages[f"s{i}"].state in (StageState.FINISHED, StageState.FAILED)
            assert load_run(run.run_dir, self.graph).states() == run.states()
            if not self.cancelled:
                assert not self.task.cancelled()
        finally:
            if self.task is not None and not self.task.done():
                self.task.cancel()
                try:
                    self.loop.run_until_complete(self.task)
                except BaseException:  # noqa: BLE001 - the task's own end is not what is tested
                    pass
            self.loop.close()
            shutil.rmtree(self.root, ignore_errors=True)


SchedulerMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestScheduler = SchedulerMachine.TestCase

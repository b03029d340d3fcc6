"""Running graphs: ordering, caps, failures, teardown, timeouts, retries, resources,
cancellation, persistence, stop and resume, subscribers."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from pipeline_tracker import Tracker

from pipeline import (
    NOT_SERIALIZABLE,
    PICKLE,
    Caps,
    Collector,
    DefinitionError,
    EventKind,
    Graph,
    JsonLinesLog,
    Resource,
    ResumeMismatch,
    RichProgress,
    RunFailed,
    Runner,
    RunStatus,
    SerializationError,
    Stage,
    StageFailed,
    StageState,
    StateError,
    load_run,
    resume,
)


def stage(t: Tracker, name: str, deps=(), **kw):
    fn_kw = {k: kw.pop(k) for k in ("fail", "sleep", "result", "hang") if k in kw}
    return Stage(name=name, deps=deps, fn=kw.pop("fn", None) or t.stage_fn(name, **fn_kw), **kw)


async def test_dependencies_finish_before_users_start():
    t = Tracker()
    g = Graph(stages=[stage(t, "a", sleep=0.01), stage(t, "b", ["a"]), stage(t, "c", ["a"]),
                      stage(t, "d", ["b", "c"])])
    run = await Runner(g).run()
    assert run.status is RunStatus.FINISHED
    start, end = t.times("start"), t.times("end")
    for st in g:
        for dep in st.deps:
            assert end[dep] < start[st.name]
    assert run.results["d"] == "result of d"


async def test_results_reach_users_and_prefix_resolution():
    async def produce(ctx):
        return {"n": 2}

    async def consume(ctx):
        return ctx.results["produce"]["n"] * 10

    inner = Graph(stages=[Stage(name="produce", fn=produce),
                          Stage(name="consume", fn=consume, deps=["produce"])])
    g = Graph.compose(inner.prefixed("x"), inner.prefixed("y"))
    run = await Runner(g).run()
    assert run.results == {"x/produce": {"n": 2}, "y/produce": {"n": 2},
                           "x/consume": 20, "y/consume": 20}


async def test_a_composed_stage_finds_its_resources_by_the_names_it_was_defined_with():
    """[], in and get() of ctx.resources all resolve inside the stage's prefix."""
    from pipeline import Resource

    @contextlib.asynccontextmanager
    async def box(ctx):
        yield f"box of {ctx.name}"

    async def use(ctx):
        return [ctx.resources["box"], "box" in ctx.resources, ctx.resources.get("box"),
                ctx.resources.get("nope", "default"), "nope" in ctx.resources]

    inner = Graph(stages=[Stage(name="use", fn=use, resources=["box"])],
                  resources=[Resource(name="box", factory=box)])
    run = await Runner(Graph.compose(inner.prefixed("x"), inner.prefixed("y"))).run()
    assert run.status is RunStatus.FINISHED, run.stages
    for p in ("x", "y"):
        assert run.results[f"{p}/use"] == [f"box of {p}/use", True, f"box of {p}/use",
                                           "default", False]


async def test_running_cap_and_kind_caps_are_respected():
    t = Tracker()
    stages = [stage(t, f"s{i}", sleep=0.005,
                    resources=[t.resource(f"r{i}", kind="gpu" if i % 2 else "disk")])
              for i in range(10)]
    runner = Runner(Graph(stages=stages), caps=Caps(running=3, kinds={"gpu": 1, "disk": 2}))
    stats_during = []

    async def watch():
        while True:
            stats_during.append(runner.statistics())
            await asyncio.sleep(0.001)

    w = asyncio.create_task(watch())
    run = await runner.run()
    w.cancel()
    assert run.status is RunStatus.FINISHED
    assert t.max_running <= 3 and t.kind_max["gpu"] == 1 and t.kind_max["disk"] <= 2
    assert max(s["running"].borrowed_tokens for s in stats_during) <= 3
    final = runner.statistics()
    assert final["running"].borrowed_tokens == 0 and final["running"].max_borrowed == 3
    assert final["gpu"].max_borrowed == 1 and final["gpu"].total_tokens == 1
    assert sorted(t.acquired) == sorted(t.released) and len(t.acquired) == 10


async def test_runs_sharing_a_limiter_share_its_tokens_not_their_names():
    from pipeline import CapacityLimiter

    held, peak = set(), [0]

    def graph(tag: str) -> Graph:
        @contextlib.asynccontextmanager
        async def box(_ctx):
            held.add(tag)
            peak[0] = max(peak[0], len(held))
            try:
                yield tag
            finally:
                held.discard(tag)

        async def use(ctx):
            await asyncio.sleep(0.01)
            return ctx.resources["box"]

        # The same stage and resource names in every run, as many runs of
        # one graph have: tokens must not be mixed up between them.
        return Graph(stages=[Stage(name="s", fn=use,
                                   resources=[Resource(name="box", kind="box", factory=box)])])

    shared = CapacityLimiter(1, name="box")
    runners = [Runner(graph(f"run{i}"), caps=Caps(kinds={"box": 5}), limiters={"box": shared})
               for i in range(4)]
    runs = await asyncio.gather(*(r.run() for r in runners))
    assert [r.status for r in runs] == [RunStatus.FINISHED] * 4
    assert [r.results["s"] for r in runs] == ["run0", "run1", "run2", "run3"]
    assert peak[0] == 1  # the shared cap, not each run's own 5
    assert shared.borrowed_tokens == 0 and shared.statistics().max_borrowed == 1
    with pytest.raises(DefinitionError, match="CapacityLimiter"):
        Runner(graph("x"), limiters={"box": 1})


async def test_failure_abandons_dependents_and_teardown_sees_it():
    t = Tracker()
    seen = {}

    async def teardown(ctx):
        seen.update({n: o.state for n, o in ctx.outcomes.items()})
        seen["error"] = ctx.outcomes["b"].error
        return "cleaned"

    g = Graph(stages=[stage(t, "a"), stage(t, "b", ["a"], fail=True), stage(t, "c", ["b"]),
                      stage(t, "d", ["c"]), stage(t, "side", ["a"]),
                      Stage(name="teardown", fn=teardown, deps=["b", "d", "side"], always=True)])
    col = Collector()
    run = await Runner(g, subscribers=[col]).run()
    states = run.states()
    assert states == {"a": StageState.FINISHED, "b": StageState.FAILED,
                      "c": StageState.ABANDONED, "d": StageState.ABANDONED,
                      "side": StageState.FINISHED, "teardown": StageState.FINISHED}
    assert seen["b"] is StageState.FAILED and seen["d"] is StageState.ABANDONED
    assert "fails on purpose" in seen["error"]
    assert run.status is RunStatus.FAILED
    assert isinstance(run.stages["b"].exception, StageFailed)
    assert isinstance(run.stages["b"].exception.cause, RuntimeError)
    assert "dependency 'b' failed" in run.stages["c"].error
    assert "c" not in t.times("start")
    assert set(col.stages(EventKind.STAGE_ABANDONED)) == {"c", "d"}
    with pytest.raises(RunFailed, match="'b'"):
        run.check()


async def test_fail_fast_cancels_the_rest_but_runs_teardown():
    t = Tracker()
    g = Graph(stages=[stage(t, "bad", fail=True), stage(t, "slow", hang=True),
                      stage(t, "later", ["slow"]),
                      stage(t, "teardown", ["slow", "bad"], always=True)])
    run = await Runner(g, fail_fast=True).run()
    assert run.states() == {"bad": StageState.FAILED, "slow": StageState.CANCELLED,
                            "later": StageState.CANCELLED, "teardown": StageState.FINISHED}
    assert run.status is RunStatus.FAILED


async def test_timeout_fails_the_stage():
    t = Tracker()
    g = Graph(stages=[stage(t, "slow", hang=True, timeout=0.05,
                            resources=[t.resource("tmp")])])
    run = await Runner(g).run()
    assert run.stages["slow"].state is StageState.FAILED
    assert "timed out after 0.05 s" in run.stages["slow"].error
    assert t.released == ["tmp@slow"]


async def test_retries_then_success_and_exhaustion():
    calls = []

    async def flaky(ctx):
        calls.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("flaky")
        return ctx.attempt

    async def always_bad(ctx):
        raise ValueError("no")

    g = Graph(stages=[Stage(name="flaky", fn=flaky, retries=2, retry_delay=0.001),
                      Stage(name="bad", fn=always_bad, retries=1)])
    col = Collector()
    run = await Runner(g, subscribers=[col]).run()
    assert run.results["flaky"] == 3 and calls == [1, 2, 3]
    assert run.stages["bad"].state is StageState.FAILED and run.stages["bad"].attempts == 2
    assert "after 2 attempts" in run.stages["bad"].error
    assert col.stages(EventKind.STAGE_RETRY) .count("flaky") == 2


async def test_shared_resource_spans_stages_and_is_released_after_last_user():
    t = Tracker()
    seen = []

    async def use(ctx):
        seen.append((ctx.name, ctx.resources["mount"]))
        t.tick("use", ctx.name)

    g = Graph(
        stages=[stage(t, "bundle"),
                Stage(name="mount", fn=use, deps=["bundle"], resources=["mount"]),
                Stage(name="run", fn=use, deps=["mount"], resources=["mount"]),
                Stage(name="ingest", fn=use, deps=["run"], resources=["mount"]),
                stage(t, "report", ["ingest"], sleep=0.01)],
        resources=[t.resource("mount", kind="fuse")])
    run = await Runner(g, caps=Caps(kinds={"fuse": 1})).run()
    assert run.status is RunStatus.FINISHED
    # One acquisition (by the first user, with its context), used by all three.
    assert t.acquired == ["mount@mount"] and t.released == ["mount@mount"]
    assert {v for _n, v in seen} == {"mount@mount"}
    times = t.times("release")
    assert times["mount@mount"] > t.times("use")["ingest"]
    # Released when its last user was done, before the run ended.
    assert times["mount@mount"] < t.times("end")["report"]


async def test_reverse_release_order_and_release_on_failure():
    t = Tracker()
    g = Graph(stages=[stage(t, "x", fail=True,
                            resources=["one", "two", t.resource("local")])],
              resources=[t.resource("one"), t.resource("two")])
    await Runner(g).run()
    assert t.acquired == ["one@x", "two@x", "local@x"]
    assert t.released == ["local@x", "two@x", "one@x"]


async def test_resource_acquire_failure_fails_the_stage_and_names_it():
    t = Tracker()
    g = Graph(stages=[stage(t, "a", resources=[t.resource("bad", fail_acquire=True)]),
                      stage(t, "b", resources=["sh"]), stage(t, "c", resources=["sh"])],
              resources=[t.resource("sh", fail_acquire=True)])
    run = await Runner(g).run()
    assert "resource 'bad'" in run.stages["a"].error
    assert "resource 'sh'" in run.stages["b"].error and "resource 'sh'" in run.stages["c"].error
    assert t.acquired == [] and t.released == []


async def test_release_failure_is_reported():
    t = Tracker()
    g = Graph(stages=[stage(t, "a", resources=["sh"])],
              resources=[t.resource("sh", fail_release=True)])
    run = await Runner(g).run()
    assert run.status is RunStatus.FAILED
    assert any("'sh' failed to release" in e for e in run.errors)


async def test_cancelling_the_awaiting_task_cleans_up_and_reraises(tmp_path):
    t = Tracker()
    g = Graph(stages=[stage(t, "a"),
                      stage(t, "hang", ["a"], hang=True, resources=["sh", t.resource("loc")]),
                      stage(t, "after", ["hang"]),
                      stage(t, "teardown", ["after"], always=True)],
              resources=[t.resource("sh")])
    runner = Runner(g, run_root=tmp_path)
    task = asyncio.create_task(runner.run())
    while "hang" not in t.running:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    run = runner.last_run
    assert run.status is RunStatus.CANCELLED
    assert run.states() == {"a": StageState.FINISHED, "hang": StageState.CANCELLED,
                            "after": StageState.CANCELLED, "teardown": StageState.FINISHED}
    assert sorted(t.acquired) == sorted(t.released) == ["loc@hang", "sh@hang"]
    on_disk = load_run(run.run_dir, g)
    assert on_disk.status is RunStatus.CANCELLED and on_disk.states() == run.states()


async def test_second_cancel_does_not_skip_cleanup():
    t = Tracker()
    release_started = asyncio.Event()

    @contextlib.asynccontextmanager
    async def slow_release(ctx):
        try:
            yield "x"
        finally:
            release_started.set()
            await asyncio.sleep(0.05)
            t.released.append("slow")

    g = Graph(stages=[stage(t, "hang", hang=True, resources=["slow"])],
              resources=[Resource(name="slow", factory=slow_release)])
    runner = Runner(g)
    task = asyncio.create_task(runner.run())
    while "hang" not in t.running:
        await asyncio.sleep(0.001)
    task.cancel()
    await release_started.wait()
    task.cancel()  # a second "Ctrl-C" during cleanup
    with pytest.raises(asyncio.CancelledError):
        await task
    assert t.released == ["slow"]


async def test_stop_after_then_resume(tmp_path):
    t = Tracker()
    g = Graph(stages=[stage(t, "a", result=[1]), stage(t, "b", ["a"], result={"k": "v"}),
                      stage(t, "c", ["b"]), stage(t, "other")])
    run = await Runner(g, run_root=tmp_path).run(stop_after="b")
    assert run.status is RunStatus.STOPPED
    assert run.states()["c"] is StageState.PENDING and "other" not in t.times("start")
    first_starts = len(t.times("start"))
    resumed = await resume(run.run_dir, g)
    assert resumed.status is RunStatus.FINISHED
    assert resumed.states() == {"a": StageState.REUSED, "b": StageState.REUSED,
                                "c": StageState.FINISHED, "other": StageState.FINISHED}
    assert resumed.results["b"] == {"k": "v"} and resumed.attempt == 2
    assert first_starts == 2 and len([e for e in t.log if e[1] == "start"]) == 4
    # Resume from a named stage re-runs it and what follows.
    again = await resume(run.run_dir, g, from_stage="b")
    assert again.states()["a"] is StageState.REUSED
    assert again.states()["b"] is StageState.FINISHED and again.states()["c"] is StageState.FINISHED
    assert again.states()["other"] is StageState.REUSED
    # Several starting points at once.
    both = await resume(run.run_dir, g, from_stage=["c", "other"])
    assert both.states() == {"a": StageState.REUSED, "b": StageState.REUSED,
                             "c": StageState.FINISHED, "other": StageState.FINISHED}
    with pytest.raises(DefinitionError, match="unknown stage 'zz'"):
        await resume(run.run_dir, g, from_stage=["c", "zz"])


async def test_stop_after_several_stages(tmp_path):
    # Two independent chains stopped at the same depth: each stops, nothing
    # past either stop point starts, and resume finishes both.
    t = Tracker()
    g = Graph(stages=[stage(t, "x/a"), stage(t, "x/b", ["x/a"]), stage(t, "x/c", ["x/b"]),
                      stage(t, "y/a"), stage(t, "y/b", ["y/a"]), stage(t, "y/c", ["y/b"])])
    run = await Runner(g, run_root=tmp_path).run(stop_after=["x/b", "y/b"])
    assert run.status is RunStatus.STOPPED
    states = run.states()
    assert {n for n, s in states.items() if s is StageState.FINISHED} == {"x/a", "x/b",
                                                                        "y/a", "y/b"}
    assert states["x/c"] is StageState.PENDING and states["y/c"] is StageState.PENDING
    resumed = await resume(run.run_dir, g)
    assert resumed.states()["x/c"] is StageState.FINISHED
    assert resumed.states()["y/c"] is StageState.FINISHED
    with pytest.raises(DefinitionError, match="unknown stage 'z'"):
        await Runner(g).run(stop_after=["x/b", "z"])
    with pytest.raises(DefinitionError, match="non-empty sequence"):
        await Runner(g).run(stop_after=[])


async def test_resume_reloads_results_for_rerun_stages(tmp_path):
    got = []

    async def a(ctx):
        return {"value": 41}

    async def b(ctx):
        got.append(ctx.results["a"])
        if len(got) == 1:
            raise RuntimeError("first time fails")
        return ctx.results["a"]["value"] + 1

    g = Graph(stages=[Stage(name="a", fn=a), Stage(name="b", fn=b, deps=["a"])])
    run = await Runner(g, run_root=tmp_path).run()
    assert run.status is RunStatus.FAILED
    resumed = await resume(run.run_dir, g)
    assert resumed.results == {"a": {"value": 41}, "b": 42}
    assert resumed.states()["a"] is StageState.REUSED and got == [{"value": 41}] * 2


async def test_cleanup_after_a_failure_runs_again_on_resume(tmp_path):
    # teardown (always) ran after "work" failed; resuming re-runs work, and so
    # teardown must run again after it, not be reused from the failed attempt.
    calls: list[str] = []
    attempts = ["first"]

    async def setup(ctx):
        calls.append("setup")

    async def work(ctx):
        calls.append("work")
        if len(attempts) == 1:
            raise RuntimeError("first time fails")

    async def teardown(ctx):
        calls.append("teardown")

    g = Graph(stages=[Stage(name="setup", fn=setup),
                      Stage(name="work", fn=work, deps=["setup"]),
                      Stage(name="teardown", fn=teardown, deps=["setup", "work"], always=True),
                      Stage(name="apart", fn=setup)])
    run = await Runner(g, run_root=tmp_path).run()
    assert run.states()["teardown"] is StageState.FINISHED and run.status is RunStatus.FAILED
    calls.clear()
    attempts.append("resumed")
    resumed = await resume(run.run_dir, g)
    assert resumed.status is RunStatus.FINISHED
    assert calls == ["work", "teardown"]
    assert resumed.states()["setup"] is StageState.REUSED
    assert resumed.states()["apart"] is StageState.REUSED


async def test_cleanup_of_a_stage_re_run_for_its_value_runs_again(tmp_path):
    calls: list[str] = []
    attempts = ["first"]

    async def make(ctx):
        calls.append("make")
        return object()

    async def use(ctx):
        calls.append("use")
        if len(attempts) == 1:
            raise RuntimeError("first time fails")

    async def drop(ctx):
        calls.append("drop")

    g = Graph(stages=[Stage(name="make", fn=make, codec=NOT_SERIALIZABLE),
                      Stage(name="drop", fn=drop, deps=["make"], always=True),
                      Stage(name="use", fn=use, deps=["make"])])
    run = await Runner(g, run_root=tmp_path).run()
    assert run.status is RunStatus.FAILED
    calls.clear()
    attempts.append("resumed")
    resumed = await resume(run.run_dir, g)
    assert resumed.status is RunStatus.FINISHED
    assert sorted(calls) == ["drop", "make", "use"] and calls[0] == "make"


async def test_non_serializable_results_rerun_on_resume(tmp_path):
    counts = {"obj": 0, "pick": 0}

    class Thing:
        def __init__(self, v):
            self.v = v

    async def obj(ctx):
        counts["obj"] += 1
        return Thing(1)

    async def pick(ctx):
        counts["pick"] += 1
        return {1, 2, 3}

    async def use(ctx):
        return ctx.results["obj"].v + len(ctx.results["pick"])

    g = Graph(stages=[Stage(name="obj", fn=obj, codec=NOT_SERIALIZABLE),
                      Stage(name="pick", fn=pick, codec=PICKLE),
                      Stage(name="use", fn=use, deps=["obj", "pick"])])
    run = await Runner(g, run_root=tmp_path).run()
    assert run.results["use"] == 4
    resumed = await resume(run.run_dir, g, from_stage="use")
    assert resumed.states() == {"obj": StageState.FINISHED, "pick": StageState.REUSED,
                                "use": StageState.FINISHED}
    assert counts == {"obj": 2, "pick": 1} and resumed.results["pick"] == {1, 2, 3}


async def test_unserializable_result_fails_with_clear_error(tmp_path):
    async def bad(ctx):
        return object()

    run = await Runner(Graph(stages=[Stage(name="bad", fn=bad)]), run_root=tmp_path).run()
    err = run.stages["bad"].exception
    assert isinstance(err, SerializationError) and "NOT_SERIALIZABLE" in str(err)


async def test_resume_refuses_changed_graph(tmp_path):
    async def v1(ctx):
        return 1

    async def v2(ctx):
        return 2

    g1 = Graph(stages=[Stage(name="a", fn=v1), Stage(name="b", fn=v1, deps=["a"])])
    run = await Runner(g1, run_root=tmp_path).run()
    g2 = Graph(stages=[Stage(name="a", fn=v1), Stage(name="b", fn=v2, deps=["a"])])
    with pytest.raises(ResumeMismatch, match=r"changed: b\)"):
        await resume(run.run_dir, g2)
    with pytest.raises(ResumeMismatch):
        await resume(run.run_dir, Graph(stages=g1.stages, version="2"))
    with pytest.raises(StateError, match="no such run directory"):
        await resume(tmp_path / "nope", g1)


async def test_journal_survives_torn_tail_and_matches(tmp_path):
    t = Tracker()
    g = Graph(stages=[stage(t, "a"), stage(t, "b", ["a"], fail=True)])
    run = await Runner(g, run_root=tmp_path).run()
    journal = run.run_dir / "journal.jsonl"
    with open(journal, "a") as f:
        f.write('{"type":"stage","name":"b","sta')  # a crash mid-write
    loaded = load_run(run.run_dir, g)
    assert loaded.states() == run.states()
    assert loaded.results == {"a": "result of a"}
    state = json.loads((run.run_dir / "state.json").read_text())
    assert state["stages"]["b"]["state"] == "failed"
    assert json.loads((run.run_dir / "graph.json").read_text())["digest"] == g.digest


async def test_finished_result_is_on_disk_before_dependents_start(tmp_path):
    """A stage's users start only after its result line is written (crash safety)."""
    seen = {}

    async def a(ctx):
        return "A"

    async def b(ctx):
        lines = (ctx.run_dir / "journal.jsonl").read_text().splitlines()
        seen["a"] = [json.loads(x) for x in lines if '"name":"a"' in x]

    g = Graph(stages=[Stage(name="a", fn=a), Stage(name="b", fn=b, deps=["a"])])
    await Runner(g, run_root=tmp_path, durability="fsync").run()
    assert seen["a"][-1]["state"] == "finished" and seen["a"][-1]["result"] == "A"


async def test_events_logs_progress_scratch_and_subscribers(tmp_path):
    async def work(ctx):
        ctx.log("hello", n=1)
        ctx.progress(1, 2)
        (ctx.scratch / "f").write_text("x")
        return str(ctx.scratch)

    def broken(event):
        raise RuntimeError("display broke")

    col = Collector()
    log = JsonLinesLog(tmp_path / "events.jsonl")
    from rich.console import Console
    console = Console(record=True, width=100, force_terminal=False)
    g = Graph(stages=[Stage(name="w", fn=work), Stage(name="x/y", fn=work, deps=["w"])])
    with pytest.warns(UserWarning, match="display broke"):
        run = await Runner(g, run_root=tmp_path / "runs",
                           subscribers=[broken, col, log, RichProgress(console=console)]).run()
    assert run.status is RunStatus.FINISHED
    assert col.kinds("w") == [EventKind.STAGE_QUEUED, EventKind.STAGE_STARTED, EventKind.LOG,
                              EventKind.PROGRESS, EventKind.STAGE_FINISHED]
    assert col.events[0].kind is EventKind.RUN_STARTED
    assert col.events[-1].kind is EventKind.RUN_FINISHED
    assert col.of(EventKind.LOG)[0].data == {"n": 1}
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == [e.kind.value for e in col.events]
    assert run.results["x/y"].endswith("stages/x/y")
    assert (run.run_dir / "stages" / "w" / "f").read_text() == "x"
    assert "w | hello" in console.export_text()


async def test_scratch_without_run_dir_is_temporary():
    paths = []

    async def work(ctx):
        paths.append(ctx.scratch)
        assert ctx.scratch.is_dir()

    await Runner(Graph(stages=[Stage(name="w", fn=work)])).run()
    assert not paths[0].exists()


async def test_results_lookup_errors_name_things():
    async def ask(ctx):
        return ctx.results["nope"]

    async def ask_res(ctx):
        return ctx.resources["nope"]

    run = await Runner(Graph(stages=[Stage(name="a", fn=ask), Stage(name="b", fn=ask_res)])).run()
    assert "unknown stage 'nope'" in run.stages["a"].error
    assert "stage 'b' has no resource 'nope'" in run.stages["b"].error


async def test_bad_arguments_are_refused():
    g = Graph(stages=[Stage(name="a", fn=Tracker().stage_fn("a"))])
    with pytest.raises(Exception, match="stop_after names unknown stage 'zz'"):
        await Runner(g).run(stop_after="zz")
    with pytest.raises(Exception, match="durability"):
        Runner(g, durability="sometimes")
    with pytest.raises(Exception, match="running must be"):
        Caps(running=0)

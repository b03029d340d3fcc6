"""The driver: runs a :class:`~pipeline.definition.Graph` under caps, cleans up, persists.

::

    run = await Runner(graph, run_root=Path("runs"), caps=Caps(running=4),
                       subscribers=[RichProgress()]).run(stop_after=None)
    run = await resume(run.run_dir, graph, from_stage="parse")
    run = run_sync(graph, run_root=Path("runs"))   # + SIGINT/SIGTERM handling

What runs when is decided by :class:`~pipeline.active.ActivePlan`, a pure
state machine; this module is the async part around it: a task per stage the
plan makes ready, the caps, the events, and the journal (group commit: a
stage is settled, and its users released, once its line is written).
:meth:`Runner.why_pending` says what a stage still waits for.

Caveats:

- A failed stage abandons what depends on it; independent stages go on
  (``fail_fast=True`` cancels the rest instead). ``always`` stages run once all
  their dependencies are settled, whatever happened, also during cancellation,
  and are never cancelled by the runner (give them a ``timeout``).
- Cancelling (``Runner.cancel``, cancelling the task awaiting ``run()``, or a
  signal under :func:`~pipeline.sync.run_sync`) cancels running stages, marks
  unstarted ones cancelled, runs ``always`` stages, and releases every
  resource exactly once, in reverse acquisition order. Further cancellations
  of the awaiting task do not interrupt that cleanup; then ``CancelledError``
  is re-raised.
- A stage acquires per-kind slots before the running slot, so the running cap
  cannot deadlock; two kinds acquired in different orders by different stages
  can (stage-local kinds are taken in sorted order). Shared resources are
  held as :mod:`pipeline.shared` describes.
- Stage results are JSON-encoded when the stage finishes; a result the codec
  cannot encode fails the stage with :class:`~pipeline.errors.SerializationError`.
  JSON turns tuples into lists.
- ``KeyboardInterrupt``/``SystemExit`` raised by a stage function fail that
  stage and cancel the run; they are not re-raised.
- ``durability="fsync"`` fsyncs each journal batch on the event loop thread.
- ``limiters`` lends kinds' limiters shared with other runs in the same event
  loop: a service running many graphs caps, say, its containers across all of
  them. Their tokens are borrowed per runner, never mixed up between runs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from pipeline.active import ActivePlan
from pipeline.caps import CapacityLimiter, Caps, LimiterStatistics
from pipeline.context import StageContext
from pipeline.definition import Graph, Resource, Stage
from pipeline.errors import (
    DefinitionError,
    ResourceError,
    SerializationError,
    StageFailed,
)
from pipeline.events import Event, EventKind, Subscriber
from pipeline.shared import SharedResources
from pipeline.state import (
    GRAPH,
    MISSING,
    STATE,
    Journal,
    Run,
    RunStatus,
    StageOutcome,
    StageState,
    atomic_write_json,
    new_run_dir,
)

__all__ = ["Runner", "StageContext"]

_QUEUED = StageState.QUEUED
_ABANDONED = StageState.ABANDONED

_now = time.time


class _Node:
    """What the driver knows of one stage's task (its state is the plan's)."""

    __slots__ = ("attempts", "ended", "error", "exception", "name", "result", "serialized",
                 "shared", "simple", "stage", "started", "task")

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.name = stage.name
        self.result: Any = MISSING
        self.error: str | None = None
        self.exception: BaseException | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.attempts = 0
        self.task: asyncio.Task[None] | None = None
        self.shared = stage.shared_resources
        self.serialized = False
        self.simple = not (stage.resources or stage.timeout is not None or stage.retries)

    def outcome(self, state: StageState) -> StageOutcome:
        return StageOutcome(name=self.name, state=state, result=self.result,
                            error=self.error, exception=self.exception, started=self.started,
                            ended=self.ended, attempts=self.attempts, serialized=self.serialized)


class _Outcomes(Mapping[str, StageOutcome]):
    """``Run.stages`` of a finished run: outcomes made on first access (big runs are cheap)."""

    __slots__ = ("_made", "_nodes", "_plan")

    def __init__(self, nodes: dict[str, _Node], plan: ActivePlan) -> None:
        self._nodes = nodes
        self._plan = plan
        self._made: dict[str, StageOutcome] = {}

    def __getitem__(self, name: str) -> StageOutcome:
        made = self._made.get(name)
        if made is None:
            made = self._made[name] = self._nodes[name].outcome(self._plan.state(name))
        return made

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"<{len(self._nodes)} stage outcomes>"


class Runner:
    """Runs one graph once (``run``), or continues a run directory (see :func:`resume`).

    ``run_root``: a new run directory is made under it per run. ``run_dir``:
    use exactly this directory. Neither: nothing is persisted (``run_id``:
    what the run_started event names then).
    """

    def __init__(
        self,
        graph: Graph,
        *,
        run_root: str | Path | None = None,
        run_dir: str | Path | None = None,
        caps: Caps | None = None,
        subscribers: Iterable[Subscriber] = (),
        durability: str = "flush",
        fail_fast: bool = False,
        limiters: Mapping[str, CapacityLimiter] | None = None,
        run_id: str | None = None,
    ) -> None:
        if not isinstance(graph, Graph):
            raise DefinitionError(f"Runner needs a Graph, not {graph!r}")
        if durability not in ("flush", "fsync"):
            raise DefinitionError(f"durability must be 'flush' or 'fsync', not {durability!r}",
                                  field="durability")
        self.graph = graph
        self.caps = caps or Caps()
        self.fail_fast = fail_fast
        self.durability = durability
        self._run_root = Path(run_root) if run_root is not None else None
        self.run_dir: Path | None = Path(run_dir) if run_dir is not None else None
        # What run_started names when the run has no directory.
        self._run_name = run_id or ""
        self._subs: list[Subscriber] = list(subscribers)
        self.running_limiter = CapacityLimiter(self.caps.running, name="running")
        self._running: CapacityLimiter | None = (
            self.running_limiter if self.caps.running is not None else None)
        self.kind_limiters: dict[str, CapacityLimiter] = {
            k: CapacityLimiter(v, name=k) for k, v in self.caps.kinds.items()}
        for kind, limiter in (limiters or {}).items():
            if not isinstance(limiter, CapacityLimiter):
                raise DefinitionError(f"limiters[{kind!r}] must be a CapacityLimiter, "
                                      f"not {limiter!r}", field="limiters")
            self.kind_limiters[kind] = limiter  # shared: wins over caps.kinds
        # Borrower keys start with this, so runs sharing a limiter never mix.
        self._borrower = id(self)
        self._nodes: dict[str, _Node] = {}
        self._plan: ActivePlan | None = None
        self._errors: list[str] = []
        self._shared = SharedResources(graph.resources, limiters=self.kind_limiters,
                                       borrower=self._borrower, emit=self._emit,
                                       errors=self._errors)
        self._live: set[_Node] = set()
        self._done: asyncio.Future[None] | None = None
        self._early_cancel: str | None = None  # cancel() before the plan existed
        self._journal: Journal | None = None
        self._pending_lines: list[tuple[_Node | None, str]] = []
        self._flush_scheduled = False
        self._tmp_scratch: Path | None = None
        self._used = False
        self.last_run: Run | None = None

    # -- public ---------------------------------------------------------------------

    @property
    def plan(self) -> ActivePlan | None:
        """The run's state machine (named sets, ``why_pending``); None before ``run``. Read only."""
        return self._plan

    def statistics(self) -> dict[str, LimiterStatistics]:
        """Cap statistics: ``"running"`` and one per capped resource kind."""
        out = {"running": self.running_limiter.statistics()}
        out.update({k: lim.statistics() for k, lim in self.kind_limiters.items()})
        return out

    def why_pending(self, stage: str) -> str:
        """One line: what ``stage`` still waits for, or why it is not pending.

        E.g. ``waits for dependency 'bundle' (running)``, ``waits for cap
        'container' (2/2 held)``, ``not pending: finished``.
        """
        self.graph[stage]  # KeyError naming an unknown stage
        if self._plan is None:
            return "waits for the run to start"
        return self._plan.why_pending(stage).describe(self.statistics())

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the run: cancel running stages, skip unstarted ones, then clean up."""
        plan = self._plan
        if plan is None or self._done is None:
            self._early_cancel = self._early_cancel or reason
            return
        marked, stop = plan.cancel(reason)
        for name in marked:
            self._ended(self._nodes[name], EventKind.STAGE_CANCELLED)
        for name in stop:
            node = self._nodes[name]
            if node.task is not None:
                node.task.cancel(reason)
                # A task cancelled before its first step never runs its body.
                node.task.add_done_callback(functools.partial(self._after_cancel, node))

    async def run(self, *, stop_after: str | Sequence[str] | None = None) -> Run:
        """Run the graph (or, with ``stop_after``, those stages and their ancestors).

        ``stop_after`` is one stage name or several (e.g. the same stage of
        every build in a composed graph).
        """
        if self.run_dir is None and self._run_root is not None:
            self.run_dir = new_run_dir(self._run_root)
        return await self._execute(stop_after=stop_after, reused={}, attempt=1,
                                   from_stage=None)

    # -- driving ----------------------------------------------------------------------

    async def _execute(self, *, stop_after: str | Sequence[str] | None, reused: Mapping[str, Any],
                       attempt: int, from_stage: str | Sequence[str] | None) -> Run:
        """Run once; :mod:`pipeline.resume` calls this with what a resume reuses."""
        if self._used:
            raise DefinitionError("a Runner runs once; make a new one")
        self._used = True
        stops = _stop_names(stop_after)
        for name in stops or ():
            if name not in self.graph:
                raise DefinitionError(f"stop_after names unknown stage {name!r}",
                                      field="stop_after")
        driver = asyncio.create_task(
            self._drive(stop_after=stops, reused=reused, attempt=attempt,
                        from_stage=from_stage))
        outer_cancelled = False
        while True:
            try:
                run = await asyncio.shield(driver)
                break
            except asyncio.CancelledError:
                if driver.done() and not driver.cancelled():
                    run = driver.result()
                    outer_cancelled = True
                    break
                # Our caller was cancelled: stop the run, but let cleanup finish.
                outer_cancelled = True
                self.cancel("the task running the pipeline was cancelled")
        self.last_run = run
        if outer_cancelled:
            raise asyncio.CancelledError
        return run

    async def _drive(self, *, stop_after: tuple[str, ...] | None, reused: Mapping[str, Any],
                     attempt: int, from_stage: str | Sequence[str] | None) -> Run:
        graph = self.graph
        nodes = self._nodes
        for stage in graph:
            nodes[stage.name] = _Node(stage)
        selected: set[str] | None = None
        if stop_after is not None:
            selected = set(stop_after)
            for name in stop_after:
                selected |= graph.ancestors(name)
        for name, value in reused.items():
            nodes[name].result = value
            nodes[name].serialized = value is not MISSING
        plan = self._plan = ActivePlan(
            {s.name: s.deps for s in graph}, always=[s.name for s in graph if s.always],
            reused=reused, selected=selected, fail_fast=self.fail_fast)
        for name in plan.active:
            self._shared.add_users(nodes[name].shared)
        self._done = asyncio.get_running_loop().create_future()
        started = _now()
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / GRAPH,
                              {"digest": graph.digest, "definition": graph.definition()})
            self._journal = Journal(self.run_dir, fsync=self.durability == "fsync")
            self._journal.append({"type": "run", "digest": graph.digest, "attempt": attempt,
                                  "time": started,
                                  "caps": {"running": self.caps.running,
                                           "kinds": dict(self.caps.kinds)},
                                  "stop_after": list(stop_after) if stop_after else None,
                                  "from_stage": from_stage if isinstance(from_stage, str)
                                  or from_stage is None else list(from_stage)})
        try:
            self._emit(EventKind.RUN_STARTED, None, str(self.run_dir or self._run_name),
                       {"stages": len(plan.active) + len(reused), "attempt": attempt})
            for name in reused:
                self._emit(EventKind.STAGE_REUSED, name)
            if self._early_cancel is not None:
                self.cancel(self._early_cancel)
            for name in plan.start():
                self._start(nodes[name])
            if plan.done and not self._done.done():
                self._done.set_result(None)
            await self._done
        finally:
            # Only reached early on an internal error: never leave anything behind.
            if not self._done.done():
                self.cancel("internal error")
                while self._live:
                    await asyncio.gather(*(n.task for n in list(self._live) if n.task),
                                         return_exceptions=True)
            self._flush()
            await self._shared.aclose()
            self._flush()
        return self._finish_run(started, attempt, stop_after)

    def _finish_run(self, started: float, attempt: int,
                    stop_after: tuple[str, ...] | None) -> Run:
        plan = self._plan
        assert plan is not None
        counts = {state.value: len(names) for state, names in plan.sets().items() if names}
        if plan.failed or self._errors:
            status = RunStatus.FAILED
        elif plan.cancelling:
            status = RunStatus.CANCELLED
        elif stop_after is not None:
            status = RunStatus.STOPPED
        else:
            status = RunStatus.FINISHED
        ended = _now()
        run = Run(run_dir=self.run_dir, digest=self.graph.digest, status=status,
                  stages=_Outcomes(self._nodes, plan), attempt=attempt, started=started,
                  ended=ended, errors=tuple(self._errors))
        if self._journal is not None and self.run_dir is not None:
            try:
                self._journal.append({"type": "end", "status": status.value, "time": ended,
                                      "errors": list(self._errors)})
                self._journal.close()
                atomic_write_json(self.run_dir / STATE, run.to_json())
            except OSError as exc:
                self._errors.append(f"cannot write run state: {exc}")
        if self._tmp_scratch is not None:
            shutil.rmtree(self._tmp_scratch, ignore_errors=True)
        self._emit(EventKind.RUN_FINISHED, None, status.value, {"counts": counts})
        for sub in self._subs:
            close = getattr(sub, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:  # noqa: BLE001  # a display must not break the run
                    warnings.warn(f"pipeline subscriber {sub!r} failed to close: {exc}",
                                  stacklevel=1)
        return run

    # -- following the plan -----------------------------------------------------------

    def _start(self, node: _Node) -> None:
        """The plan made the stage ready: give it a task."""
        if self._subs:
            self._emit(EventKind.STAGE_QUEUED, node.name)
        self._live.add(node)
        node.task = asyncio.get_running_loop().create_task(self._stage_main(node))

    def _ended(self, node: _Node, kind: EventKind, *, settled: bool = False) -> None:
        """Report and record a stage the plan has failed, cancelled or abandoned.

        It is settled once recorded (a finished stage takes its own, faster
        path through :meth:`_finished`).

        ``settled``: the plan settled it already (abandoned or cancelled in a
        cascade); its line is only written.
        """
        plan = self._plan
        assert plan is not None
        if node.error is None:
            node.error = plan.reason(node.name)
        node.ended = _now()
        if self._subs:
            self._emit(kind, node.name, node.error or "")
        line = (self._line(node, plan.state(node.name)) if self._journal is not None
                else "")
        if not settled:
            self._commit(node, line)
        elif self._journal is not None:
            self._pending_lines.append((None, line))

    def _line(self, node: _Node, state: StageState, encoded: str | None = None) -> str:
        head = (f'{{"type":"stage","name":{json.dumps(node.name)},"state":"{state.value}",'
                f'"attempts":{node.attempts},"started":{_jfloat(node.started)},'
                f'"ended":{_jfloat(node.ended)}')
        if encoded is not None:
            return (f'{head},"serialized":true,"codec":"{node.stage.codec.name}",'
                    f'"result":{encoded}}}')
        if node.error:
            return f'{head},"error":{json.dumps(node.error)}}}'
        return head + "}"

    def _commit(self, node: _Node, line: str) -> None:
        """Record an ended stage; it is settled (its users released) once the line is written."""
        if self._journal is None:
            self._settle(node)
            return
        self._pending_lines.append((node, line))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._pending_lines:
            batch, self._pending_lines = self._pending_lines, []
            if self._journal is not None:
                try:
                    self._journal.write_lines([line for _n, line in batch])
                except OSError as exc:
                    self._errors.append(f"cannot write the journal: {exc}")
                    self._journal = None
                    self.cancel(f"cannot write the journal: {exc}")
            for node, _line in batch:
                if node is not None:
                    self._settle(node)

    def _settle(self, node: _Node) -> None:
        plan = self._plan
        assert plan is not None and self._done is not None
        self._live.discard(node)
        nodes = self._nodes
        for name, state in plan.settle(node.name):
            user = nodes[name]
            if state is _QUEUED:
                self._start(user)
                continue
            self._ended(user, EventKind.STAGE_ABANDONED if state is _ABANDONED
                        else EventKind.STAGE_CANCELLED, settled=True)
            if user.shared:
                self._shared.drop_users(user.shared)
        if node.shared:
            self._shared.drop_users(node.shared)
        if self._pending_lines and not self._flush_scheduled and self._journal is not None:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        if plan.done and not self._done.done():
            self._done.set_result(None)

    # -- one stage's task -------------------------------------------------------------

    async def _stage_main(self, node: _Node) -> None:
        stage = node.stage
        plan = self._plan
        assert plan is not None
        ctx = StageContext(self, stage)
        attempts = 0
        # CancelledError is caught and not re-raised: this is the stage's own
        # task, and ending it cancelled is what recording the stage means.
        if node.simple:
            # The hot path, inlined: no resources, timeout or retries.
            running = self._running
            try:
                if running is not None and not running.acquire_nowait(node):
                    plan.waiting_on(node.name, "running")
                    self._note_wait(node, "running")
                    await running.acquire(node)
                    self._note_wait(node, None)
                try:
                    node.attempts = ctx.attempt = attempts = 1
                    node.started = _now()
                    plan.started(node.name)
                    if self._subs:
                        self._emit(EventKind.STAGE_STARTED, node.name)
                    result = await stage.fn(ctx)
                finally:
                    if running is not None:
                        running.release(node)
            except asyncio.CancelledError:
                self._on_cancelled(node)
                return
            except BaseException as exc:  # noqa: BLE001  # a stage may raise anything
                self._raised(node, exc, attempts)
                return
            self._finished(node, result)
            return
        try:
            for rname in node.shared:
                plan.waiting_on(node.name, self._shared.cap_of(rname), resource=rname)
                ctx.resources[rname] = await self._shared.acquire(rname, ctx)
            plan.waiting_on(node.name)
            while True:
                attempts += 1
                ctx.attempt = attempts
                node.attempts = attempts
                try:
                    result = await self._attempt(node, ctx)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if attempts > stage.retries:
                        raise
                    self._emit(EventKind.STAGE_RETRY, node.name,
                               f"attempt {attempts} failed: {type(exc).__name__}: {exc}",
                               {"attempt": attempts})
                    if stage.retry_delay:
                        await asyncio.sleep(stage.retry_delay)
        except asyncio.CancelledError:
            self._on_cancelled(node)
            return
        except BaseException as exc:  # noqa: BLE001  # a stage may raise anything
            self._raised(node, exc, attempts)
            return
        self._finished(node, result)

    async def _attempt(self, node: _Node, ctx: StageContext) -> Any:
        stage = node.stage
        running = self._running
        if not stage.local_resources and stage.timeout is None:
            # The hot path: no stage-local resources, no timeout.
            await self._take(node, running, node, "running")
            try:
                self._mark_started(node)
                return await stage.fn(ctx)
            finally:
                if running is not None:
                    running.release(node)
        async with AsyncExitStack() as stack:
            local = sorted(stage.local_resources, key=lambda r: r.kind)
            for res in local:
                lim = self.kind_limiters.get(res.kind)
                if lim is not None:
                    key = (self._borrower, node.name, res.name)
                    await self._take(node, lim, key, res.kind)
                    stack.callback(lim.release, key)
            if running is not None:
                await self._take(node, running, node, "running")
                stack.callback(running.release, node)
            self._mark_started(node)
            for res in stage.local_resources:
                ctx.resources[res.name] = await self._enter_local(stack, res, ctx)
            if stage.timeout is not None:
                async with asyncio.timeout(stage.timeout):
                    return await stage.fn(ctx)
            return await stage.fn(ctx)

    async def _take(self, node: _Node, lim: CapacityLimiter | None, key: Any, cap: str) -> None:
        """Borrow a token; while it has to wait, the plan knows for which cap."""
        if lim is None or lim.acquire_nowait(key):
            return
        assert self._plan is not None
        self._plan.waiting_on(node.name, cap)
        self._note_wait(node, cap)
        await lim.acquire(key)
        self._plan.waiting_on(node.name)
        self._note_wait(node, None)

    def _note_wait(self, node: _Node, cap: str | None) -> None:
        """Journal that a stage waits for a cap (None: no longer), so that a
        reader of the run directory (``pipeline-run why``) can tell while the
        run goes on."""
        if self._journal is None:
            return
        self._pending_lines.append((None, json.dumps(
            {"type": "wait", "name": node.name, "cap": cap, "time": _now()})))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _mark_started(self, node: _Node) -> None:
        assert self._plan is not None
        if node.started is None:
            node.started = _now()
            self._plan.started(node.name)
            if self._subs:
                self._emit(EventKind.STAGE_STARTED, node.name)

    async def _enter_local(self, stack: AsyncExitStack, res: Resource, ctx: StageContext) -> Any:
        try:
            cm = res.factory(ctx)
            enter = type(cm).__aenter__
            exit_ = type(cm).__aexit__
        except AttributeError as exc:
            raise ResourceError(res.name, "factory did not return an async context manager",
                                stage=ctx.name) from exc
        try:
            value = await enter(cm)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise ResourceError(res.name, f"could not be acquired: {type(exc).__name__}: {exc}",
                                stage=ctx.name) from exc
        self._emit(EventKind.RESOURCE_ACQUIRED, ctx.name, res.name, {"kind": res.kind})

        async def release(exc_type: Any, exc: Any, tb: Any) -> bool:
            try:
                return bool(await exit_(cm, exc_type, exc, tb))
            finally:
                self._emit(EventKind.RESOURCE_RELEASED, ctx.name, res.name, {"kind": res.kind})

        stack.push_async_exit(release)
        return value

    # -- what a stage's task reports --------------------------------------------------

    def _finished(self, node: _Node, result: Any) -> None:
        codec = node.stage.codec
        encoded: str | None = None
        if result is None and codec.serializable and codec.encode is None:
            encoded = "null"
        elif codec.serializable:
            try:
                encoded = json.dumps(codec.encode(result) if codec.encode else result,
                                     allow_nan=False)
            except Exception as exc:  # noqa: BLE001  # any codec error fails the stage
                err = SerializationError(node.name, f"cannot store its result "
                                         f"({type(result).__name__}) with codec "
                                         f"{codec.name!r}: {exc}")
                err.__cause__ = exc
                self._fail(node, err, node.attempts, wrap=False)
                return
        assert self._plan is not None
        self._plan.finish(node.name)
        node.result = result
        node.serialized = encoded is not None
        node.ended = _now()
        if self._subs:
            self._emit(EventKind.STAGE_FINISHED, node.name)
        journal = self._journal is not None
        self._commit(node, self._line(node, StageState.FINISHED, encoded) if journal else "")

    def _raised(self, node: _Node, exc: BaseException, attempts: int) -> None:
        """The stage failed; KeyboardInterrupt/SystemExit also cancel the run."""
        self._fail(node, exc, attempts)
        if not isinstance(exc, Exception):
            self.cancel(f"stage {node.name!r} raised {type(exc).__name__}")

    def _fail(self, node: _Node, exc: BaseException, attempts: int, *, wrap: bool = True) -> None:
        err: BaseException = exc
        if wrap and not isinstance(exc, (StageFailed, SerializationError)):
            if isinstance(exc, TimeoutError) and node.stage.timeout is not None:
                cause: BaseException = TimeoutError(
                    f"timed out after {node.stage.timeout} s")
                cause.__cause__ = exc
            else:
                cause = exc
            err = StageFailed(node.name, cause, attempts=attempts)
            err.__cause__ = cause
        node.exception = err
        node.error = str(err)
        assert self._plan is not None
        cancel_run = self._plan.fail(node.name)
        self._ended(node, EventKind.STAGE_FAILED)
        if cancel_run:
            self.cancel(f"fail_fast: stage {node.name!r} failed")

    def _on_cancelled(self, node: _Node) -> None:
        """The stage's task ended cancelled (from its body, or before it ran)."""
        assert self._plan is not None
        if self._plan.stage_cancelled(node.name):
            self._ended(node, EventKind.STAGE_CANCELLED)

    def _after_cancel(self, node: _Node, _task: asyncio.Task[None]) -> None:
        self._on_cancelled(node)

    # -- what a StageContext reads (pipeline.context._Host) ------------------------------

    def _result_of(self, name: str) -> tuple[Any, StageState] | None:
        node = self._nodes.get(name)
        if node is None or self._plan is None:
            return None
        return node.result, self._plan.state(name)

    def _outcome_of(self, name: str) -> StageOutcome:
        assert self._plan is not None
        return self._nodes[name].outcome(self._plan.state(name))

    def _result_names(self) -> Iterator[str]:
        return (n for n, node in self._nodes.items() if node.result is not MISSING)

    def _emit(self, kind: EventKind, stage: str | None, message: str = "",
              data: Any = None) -> None:
        if not self._subs:
            return
        event = Event(kind, stage, _now(), message, data)
        for sub in self._subs:
            try:
                sub(event)
            except Exception as exc:  # noqa: BLE001  # a broken display must not break a run
                self._subs = [s for s in self._subs if s is not sub]
                warnings.warn(f"pipeline subscriber {sub!r} raised {type(exc).__name__}: "
                              f"{exc}; dropped for the rest of the run", stacklevel=1)

    def _scratch_for(self, name: str) -> Path:
        if self.run_dir is not None:
            base = self.run_dir / "stages"
        else:
            if self._tmp_scratch is None:
                self._tmp_scratch = Path(tempfile.mkdtemp(prefix="pipeline-scratch-"))
            base = self._tmp_scratch
        path = base.joinpath(*name.split("/"))
        path.mkdir(parents=True, exist_ok=True)
        return path


def _stop_names(stop_after: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if stop_after is None:
        return None
    if isinstance(stop_after, str):
        return (stop_after,)
    names = tuple(stop_after)
    if not names or not all(isinstance(n, str) for n in names):
        raise DefinitionError(f"stop_after must be a stage name or a non-empty sequence of "
                              f"them, not {stop_after!r}", field="stop_after")
    return names


def _jfloat(value: float | None) -> str:
    return "null" if value is None else repr(value)

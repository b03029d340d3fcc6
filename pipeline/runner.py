"""The scheduler: runs a :class:`~pipeline.definition.Graph` under caps, cleans up, persists.

::

    run = await Runner(graph, run_root=Path("runs"), caps=Caps(running=4),
                       subscribers=[RichProgress()]).run(stop_after=None)
    run = await resume(run.run_dir, graph, from_stage="parse")
    run = run_sync(graph, run_root=Path("runs"))   # + SIGINT/SIGTERM handling

The core is a small state machine over per-stage nodes (pending -> queued ->
running -> finished | failed | cancelled, or abandoned), with a countdown of
unfinished dependencies per node, so making a stage ready is O(its users).
Each ready stage runs in its own task.

Caveats:

- A failed stage abandons what depends on it; independent stages go on
  (``fail_fast=True`` cancels the rest instead). ``always`` stages run once all
  their dependencies are settled, whatever happened, also during cancellation,
  and are never cancelled by the runner (give them a ``timeout``).
- Cancelling (``Runner.cancel``, cancelling the task awaiting ``run()``, or a
  signal under :func:`run_sync`) cancels running stages, marks unstarted ones
  cancelled, runs ``always`` stages, and releases every resource exactly once,
  in reverse acquisition order. Further cancellations of the awaiting task do
  not interrupt that cleanup; then ``CancelledError`` is re-raised.
- Shared resources are entered and exited in a holder task of their own, so
  context managers that care which task exits them (``asyncio.timeout``,
  task groups) work. A stage acquires per-kind slots before the running slot,
  so the running cap cannot deadlock; two kinds acquired in different orders
  by different stages can (stage-local kinds are taken in sorted order).
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
import secrets
import shutil
import signal
import sys
import tempfile
import time
import warnings
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pipeline.caps import Caps, CapacityLimiter, LimiterStatistics
from pipeline.definition import Graph, Resource, Stage
from pipeline.errors import (
    DefinitionError,
    ResourceError,
    ResumeMismatch,
    RunCancelled,
    SerializationError,
    StageFailed,
)
from pipeline.events import Event, EventKind, Subscriber
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
    decode_result,
    read_journal,
)

__all__ = ["Runner", "StageContext", "resume", "run_sync"]

_PENDING = StageState.PENDING
_QUEUED = StageState.QUEUED
_RUNNING = StageState.RUNNING
_FINISHED = StageState.FINISHED
_FAILED = StageState.FAILED
_ABANDONED = StageState.ABANDONED
_CANCELLED = StageState.CANCELLED
_REUSED = StageState.REUSED

_now = time.time


class _Node:
    """Runtime state of one stage (mutable; never leaves the runner)."""

    __slots__ = ("stage", "name", "succs", "remaining", "state", "result", "error",
                 "exception", "started", "ended", "attempts", "task", "always", "shared",
                 "serialized", "active", "simple")

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.name = stage.name
        self.succs: list[_Node] = []
        self.remaining = 0
        self.state = _PENDING
        self.result: Any = MISSING
        self.error: str | None = None
        self.exception: BaseException | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.attempts = 0
        self.task: asyncio.Task[None] | None = None
        self.always = stage.always
        self.shared = stage.shared_resources
        self.serialized = False
        self.active = False
        self.simple = not (stage.resources or stage.timeout is not None or stage.retries)

    def outcome(self) -> StageOutcome:
        return StageOutcome(name=self.name, state=self.state, result=self.result,
                            error=self.error, exception=self.exception, started=self.started,
                            ended=self.ended, attempts=self.attempts, serialized=self.serialized)


class _Shared:
    """Runtime state of one shared resource."""

    __slots__ = ("decl", "users_left", "state", "holder", "ready", "release", "order")

    def __init__(self, decl: Resource) -> None:
        self.decl = decl
        self.users_left = 0
        self.state = "idle"  # idle, waiting, entering, held, releasing, released
        self.holder: asyncio.Task[None] | None = None
        self.ready: asyncio.Future[Any] | None = None
        self.release: asyncio.Event | None = None
        self.order = -1


class _Outcomes(Mapping[str, StageOutcome]):
    """``Run.stages`` of a finished run: outcomes made on first access (big runs are cheap)."""

    __slots__ = ("_nodes", "_made")

    def __init__(self, nodes: dict[str, _Node]) -> None:
        self._nodes = nodes
        self._made: dict[str, StageOutcome] = {}

    def __getitem__(self, name: str) -> StageOutcome:
        made = self._made.get(name)
        if made is None:
            made = self._made[name] = self._nodes[name].outcome()
        return made

    def __iter__(self):  # type: ignore[override]
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"<{len(self._nodes)} stage outcomes>"


class _Scoped(dict):
    """A dict whose keys resolve inside a stage's prefix first."""

    __slots__ = ("prefix", "what", "stage")

    def __init__(self, prefix: str, what: str, stage: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.what = what
        self.stage = stage

    def __missing__(self, key: str) -> Any:
        full = self.prefix + key
        if self.prefix and full in self:
            return self[full]
        raise KeyError(f"stage {self.stage!r} has no {self.what} {key!r} "
                       f"(it has: {', '.join(sorted(self)) or 'none'})")


class _Results(Mapping[str, Any]):
    """``ctx.results``: finished stages' results, names resolved in the stage's prefix."""

    __slots__ = ("_nodes", "_prefix", "_stage")

    def __init__(self, nodes: dict[str, _Node], prefix: str, stage: str) -> None:
        self._nodes = nodes
        self._prefix = prefix
        self._stage = stage

    def _node(self, key: str) -> _Node:
        if self._prefix:
            node = self._nodes.get(self._prefix + key)
            if node is not None:
                return node
        node = self._nodes.get(key)
        if node is None:
            raise KeyError(f"stage {self._stage!r} asked for the result of unknown stage {key!r}")
        return node

    def __getitem__(self, key: str) -> Any:
        node = self._node(key)
        if node.result is MISSING:
            raise KeyError(f"stage {self._stage!r} asked for the result of {node.name!r}, "
                           f"which has none (state {node.state.value})")
        return node.result

    def __iter__(self):  # type: ignore[override]
        return (n for n, node in self._nodes.items() if node.result is not MISSING)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class StageContext:
    """What a stage function gets: results, resources, logging, progress, directories."""

    __slots__ = ("_runner", "_node", "_resources", "attempt")

    def __init__(self, runner: Runner, node: _Node) -> None:
        self._runner = runner
        self._node = node
        self._resources: _Scoped | None = None
        self.attempt = 0

    @property
    def resources(self) -> dict[str, Any]:
        """Acquired resources by name (shared ones also by their name inside the prefix)."""
        if self._resources is None:
            self._resources = _Scoped(self._node.stage.prefix, "resource", self._node.name)
        return self._resources

    @property
    def name(self) -> str:
        return self._node.name

    @property
    def stage(self) -> Stage:
        return self._node.stage

    @property
    def results(self) -> Mapping[str, Any]:
        """Results of finished stages (the dependencies are always there)."""
        return _Results(self._runner._nodes, self._node.stage.prefix, self._node.name)

    @property
    def outcomes(self) -> dict[str, StageOutcome]:
        """Outcomes of this stage's dependencies, keyed by their full names."""
        nodes = self._runner._nodes
        return {d: nodes[d].outcome() for d in self._node.stage.deps}

    @property
    def run_dir(self) -> Path | None:
        return self._runner.run_dir

    @property
    def scratch(self) -> Path:
        """This stage's own directory (made on first use; a temp dir when not persisting)."""
        return self._runner._scratch_for(self._node.name)

    def log(self, message: str, **data: Any) -> None:
        self._runner._emit(EventKind.LOG, self._node.name, str(message), data or None)

    def progress(self, done: float, total: float | None = None) -> None:
        self._runner._emit(EventKind.PROGRESS, self._node.name, "",
                           {"done": done, "total": total})


class Runner:
    """Runs one graph once (``run``), or continues a run directory (see :func:`resume`).

    ``run_root``: a new run directory is made under it per run. ``run_dir``:
    use exactly this directory. Neither: nothing is persisted.
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
        self._shared: dict[str, _Shared] = {}
        self._held: list[_Shared] = []
        self._live: set[_Node] = set()
        self._aux: set[asyncio.Task[None]] = set()
        self._errors: list[str] = []
        self._open = 0
        self._done: asyncio.Future[None] | None = None
        self._cancelling = False
        self._cancel_reason = ""
        self._journal: Journal | None = None
        self._pending_lines: list[tuple[_Node | None, str]] = []
        self._flush_scheduled = False
        self._tmp_scratch: Path | None = None
        self._used = False
        self.last_run: Run | None = None

    # -- public ---------------------------------------------------------------------

    def statistics(self) -> dict[str, LimiterStatistics]:
        """Cap statistics: ``"running"`` and one per capped resource kind."""
        out = {"running": self.running_limiter.statistics()}
        out.update({k: lim.statistics() for k, lim in self.kind_limiters.items()})
        return out

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the run: cancel running stages, skip unstarted ones, then clean up."""
        if self._cancelling or self._done is None:
            self._cancelling = True
            self._cancel_reason = self._cancel_reason or reason
            return
        self._cancelling = True
        self._cancel_reason = reason
        for node in self._nodes.values():
            if node.active and node.state is _PENDING and not node.always:
                node.state = _CANCELLED
                node.error = reason
                node.ended = _now()
                self._emit(EventKind.STAGE_CANCELLED, node.name, reason)
                self._commit(node, self._line(node))
        for node in list(self._live):
            if not node.always and node.task is not None:
                node.task.cancel(reason)
                # A task cancelled before its first step never runs its body.
                node.task.add_done_callback(functools.partial(self._after_cancel, node))

    def _after_cancel(self, node: _Node, _task: asyncio.Task[None]) -> None:
        if node.state is _QUEUED or node.state is _RUNNING:
            node.state = _CANCELLED
            node.error = self._cancel_reason or "cancelled"
            node.ended = _now()
            self._emit(EventKind.STAGE_CANCELLED, node.name, node.error)
            self._commit(node, self._line(node))

    async def run(self, *, stop_after: str | Sequence[str] | None = None) -> Run:
        """Run the graph (or, with ``stop_after``, those stages and their ancestors).

        ``stop_after`` is one stage name or several (e.g. the same stage of
        every build in a composed graph).
        """
        if self.run_dir is None and self._run_root is not None:
            self._run_root.mkdir(parents=True, exist_ok=True)
            run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
            self.run_dir = self._run_root / run_id
            self.run_dir.mkdir()
        return await self._execute(stop_after=stop_after, reused={}, attempt=1,
                                   from_stage=None)

    # -- driving ----------------------------------------------------------------------

    async def _execute(self, *, stop_after: str | Sequence[str] | None, reused: Mapping[str, Any],
                       attempt: int, from_stage: str | None) -> Run:
        if self._used:
            raise DefinitionError("a Runner runs once; make a new one")
        self._used = True
        stop_after = _stop_names(stop_after)
        for name in stop_after or ():
            if name not in self.graph:
                raise DefinitionError(f"stop_after names unknown stage {name!r}",
                                      field="stop_after")
        driver = asyncio.create_task(
            self._drive(stop_after=stop_after, reused=reused, attempt=attempt,
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
            raise asyncio.CancelledError()
        return run

    async def _drive(self, *, stop_after: tuple[str, ...] | None, reused: Mapping[str, Any],
                     attempt: int, from_stage: str | None) -> Run:
        loop = asyncio.get_running_loop()
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
            node = nodes[name]
            node.state = _REUSED
            node.result = value
            node.serialized = value is not MISSING
        active = [n for n in nodes.values()
                  if n.state is _PENDING and (selected is None or n.name in selected)]
        for node in active:
            node.active = True
        for node in active:
            for dep in node.stage.deps:
                d = nodes[dep]
                if d.active:
                    d.succs.append(node)
                    node.remaining += 1
        for res in graph.resources:
            self._shared[res.name] = _Shared(res)
        for node in active:
            for rname in node.shared:
                self._shared[rname].users_left += 1
        self._open = len(active)
        self._done = loop.create_future()
        started = _now()
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / GRAPH,
                              {"digest": graph.digest, "definition": graph.definition()})
            self._journal = Journal(self.run_dir, fsync=self.durability == "fsync")
            self._journal.append({"type": "run", "digest": graph.digest, "attempt": attempt,
                                  "time": started,
                                  "stop_after": list(stop_after) if stop_after else None,
                                  "from_stage": from_stage})
        try:
            self._emit(EventKind.RUN_STARTED, None, str(self.run_dir or ""),
                       {"stages": len(active) + len(reused), "attempt": attempt})
            for name in reused:
                self._emit(EventKind.STAGE_REUSED, name)
            if self._cancelling:  # cancelled before we started
                self._cancelling = False
                self.cancel(self._cancel_reason)
            for node in active:
                if node.state is _PENDING and node.remaining == 0:
                    self._start(node)
            if self._open == 0 and not self._done.done():
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
            while self._aux:
                await asyncio.gather(*list(self._aux), return_exceptions=True)
            for shared in reversed(self._held):
                await self._release_shared(shared)
            for shared in self._shared.values():  # acquisitions still waiting for a slot
                await self._release_shared(shared)
            self._flush()
        return self._finish_run(started, attempt, stop_after)

    def _finish_run(self, started: float, attempt: int,
                    stop_after: tuple[str, ...] | None) -> Run:
        outcomes = _Outcomes(self._nodes)
        counts: dict[str, int] = {}
        for node in self._nodes.values():
            key = node.state.value
            counts[key] = counts.get(key, 0) + 1
        failed = StageState.FAILED.value in counts
        if failed or self._errors:
            status = RunStatus.FAILED
        elif self._cancelling:
            status = RunStatus.CANCELLED
        elif stop_after is not None:
            status = RunStatus.STOPPED
        else:
            status = RunStatus.FINISHED
        ended = _now()
        run = Run(run_dir=self.run_dir, digest=self.graph.digest, status=status,
                  stages=outcomes, attempt=attempt, started=started, ended=ended,
                  errors=tuple(self._errors))
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
                except Exception as exc:  # a display must not break the run
                    warnings.warn(f"pipeline subscriber {sub!r} failed to close: {exc}",
                                  stacklevel=1)
        return run

    # -- the state machine ------------------------------------------------------------

    def _start(self, node: _Node) -> None:
        node.state = _QUEUED
        if self._subs:
            self._emit(EventKind.STAGE_QUEUED, node.name)
        self._live.add(node)
        node.task = asyncio.get_running_loop().create_task(self._stage_main(node))

    def _line(self, node: _Node, encoded: str | None = None) -> str:
        head = (f'{{"type":"stage","name":{json.dumps(node.name)},"state":"{node.state.value}",'
                f'"attempts":{node.attempts},"started":{_jfloat(node.started)},'
                f'"ended":{_jfloat(node.ended)}')
        if encoded is not None:
            return (f'{head},"serialized":true,"codec":"{node.stage.codec.name}",'
                    f'"result":{encoded}}}')
        if node.error:
            return f'{head},"error":{json.dumps(node.error)}}}'
        return head + "}"

    def _commit(self, node: _Node | None, line: str) -> None:
        """Record a settled stage; its users are released once the line is written."""
        if self._journal is None:
            if node is not None:
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
        stack = [node]
        while stack:
            n = stack.pop()
            self._open -= 1
            self._live.discard(n)
            ok = n.state is _FINISHED
            for s in n.succs:
                if s.state is not _PENDING:
                    continue
                if ok or s.always:
                    s.remaining -= 1
                    if s.remaining == 0:
                        if self._cancelling and not s.always:
                            s.state = _CANCELLED
                            s.error = self._cancel_reason
                            s.ended = _now()
                            self._emit(EventKind.STAGE_CANCELLED, s.name, s.error)
                            self._pending_lines.append((None, self._line(s)))
                            stack.append(s)
                        else:
                            self._start(s)
                else:
                    s.state = _ABANDONED
                    s.error = f"dependency {n.name!r} {n.state.value}"
                    s.ended = _now()
                    if self._subs:
                        self._emit(EventKind.STAGE_ABANDONED, s.name, s.error)
                    if self._journal is not None:
                        self._pending_lines.append((None, self._line(s)))
                    stack.append(s)
            if n.shared:
                self._drop_users(n)
        if self._pending_lines and not self._flush_scheduled and self._journal is not None:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        if self._open == 0 and self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def _stage_main(self, node: _Node) -> None:
        stage = node.stage
        ctx = StageContext(self, node)
        attempts = 0
        if node.simple:
            # The hot path, inlined: no resources, timeout or retries.
            running = self._running
            try:
                if running is not None and not running.acquire_nowait(node):
                    await running.acquire(node)
                try:
                    node.attempts = ctx.attempt = attempts = 1
                    node.state = _RUNNING
                    node.started = _now()
                    if self._subs:
                        self._emit(EventKind.STAGE_STARTED, node.name)
                    result = await stage.fn(ctx)
                finally:
                    if running is not None:
                        running.release(node)
            except asyncio.CancelledError:
                self._cancelled(node)
                return
            except BaseException as exc:
                self._raised(node, exc, attempts)
                return
            self._finished(node, result, attempts)
            return
        try:
            if node.shared:
                for rname in node.shared:
                    ctx.resources[rname] = await self._acquire_shared(self._shared[rname], ctx)
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
            self._cancelled(node)
            return
        except BaseException as exc:
            self._raised(node, exc, attempts)
            return
        self._finished(node, result, attempts)

    def _raised(self, node: _Node, exc: BaseException, attempts: int) -> None:
        """The stage failed; KeyboardInterrupt/SystemExit also cancel the run."""
        self._fail(node, exc, attempts)
        if not isinstance(exc, Exception):
            self.cancel(f"stage {node.name!r} raised {type(exc).__name__}")

    def _cancelled(self, node: _Node) -> None:
        node.state = _CANCELLED
        node.error = self._cancel_reason or "cancelled"
        node.ended = _now()
        self._emit(EventKind.STAGE_CANCELLED, node.name, node.error)
        self._commit(node, self._line(node))

    def _finished(self, node: _Node, result: Any, attempts: int) -> None:
        stage = node.stage
        codec = stage.codec
        encoded: str | None = None
        if result is None and codec.serializable and codec.encode is None:
            encoded = "null"
        elif codec.serializable:
            try:
                encoded = json.dumps(codec.encode(result) if codec.encode else result,
                                     allow_nan=False)
            except Exception as exc:
                err = SerializationError(node.name, f"cannot store its result "
                                         f"({type(result).__name__}) with codec "
                                         f"{codec.name!r}: {exc}")
                err.__cause__ = exc
                self._fail(node, err, attempts, wrap=False)
                return
        node.state = _FINISHED
        node.result = result
        node.serialized = encoded is not None
        node.ended = _now()
        if self._subs:
            self._emit(EventKind.STAGE_FINISHED, node.name)
        self._commit(node, self._line(node, encoded) if self._journal is not None else "")

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
        node.state = _FAILED
        node.exception = err
        node.error = str(err)
        node.ended = _now()
        self._emit(EventKind.STAGE_FAILED, node.name, node.error)
        self._commit(node, self._line(node))
        if self.fail_fast:
            self.cancel(f"fail_fast: stage {node.name!r} failed")

    async def _attempt(self, node: _Node, ctx: StageContext) -> Any:
        stage = node.stage
        running = self._running
        if not stage.local_resources and stage.timeout is None:
            # The hot path: no stage-local resources, no timeout.
            if running is not None and not running.acquire_nowait(node):
                await running.acquire(node)
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
                    await lim.acquire(key)
                    stack.callback(lim.release, key)
            if running is not None:
                await running.acquire(node)
                stack.callback(running.release, node)
            self._mark_started(node)
            for res in stage.local_resources:
                ctx.resources[res.name] = await self._enter_local(stack, res, ctx)
            if stage.timeout is not None:
                async with asyncio.timeout(stage.timeout):
                    return await stage.fn(ctx)
            return await stage.fn(ctx)

    def _mark_started(self, node: _Node) -> None:
        if node.state is not _RUNNING:
            node.state = _RUNNING
            node.started = _now()
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

    # -- shared resources -------------------------------------------------------------

    async def _acquire_shared(self, shared: _Shared, ctx: StageContext) -> Any:
        if shared.holder is None:
            loop = asyncio.get_running_loop()
            shared.ready = loop.create_future()
            shared.ready.add_done_callback(_consume)
            shared.release = asyncio.Event()
            shared.state = "waiting"
            shared.holder = loop.create_task(self._hold(shared, ctx))
        assert shared.ready is not None
        return await asyncio.shield(shared.ready)

    async def _hold(self, shared: _Shared, ctx: StageContext) -> None:
        decl = shared.decl
        assert shared.ready is not None and shared.release is not None
        lim = self.kind_limiters.get(decl.kind)
        key = (self._borrower, "shared", decl.name)
        try:
            if lim is not None:
                await lim.acquire(key)
            try:
                shared.state = "entering"
                cm = decl.factory(ctx)
                try:
                    value = await type(cm).__aenter__(cm)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    raise ResourceError(decl.name, f"could not be acquired: "
                                        f"{type(exc).__name__}: {exc}", stage=ctx.name) from exc
                shared.order = len(self._held)
                self._held.append(shared)
                shared.state = "held"
                self._emit(EventKind.RESOURCE_ACQUIRED, ctx.name, decl.name,
                           {"kind": decl.kind, "shared": True})
                shared.ready.set_result(value)
                try:
                    await shared.release.wait()
                except BaseException:
                    await type(cm).__aexit__(cm, *sys.exc_info())
                    raise
                shared.state = "releasing"
                try:
                    await type(cm).__aexit__(cm, None, None, None)
                finally:
                    self._emit(EventKind.RESOURCE_RELEASED, None, decl.name,
                               {"kind": decl.kind, "shared": True})
            finally:
                if lim is not None and key in lim._borrowers:
                    lim.release(key)
        except asyncio.CancelledError:
            if not shared.ready.done():
                shared.ready.set_exception(ResourceError(decl.name, "acquisition cancelled"))
        except BaseException as exc:
            if not shared.ready.done():
                shared.ready.set_exception(exc if isinstance(exc, ResourceError) else
                                           ResourceError(decl.name, f"{exc}"))
            else:
                self._errors.append(f"resource {decl.name!r} failed to release: "
                                    f"{type(exc).__name__}: {exc}")
        finally:
            shared.state = "released"

    def _drop_users(self, node: _Node) -> None:
        freed = []
        for rname in node.shared:
            shared = self._shared[rname]
            shared.users_left -= 1
            if shared.users_left == 0 and shared.holder is not None:
                freed.append(shared)
        if freed:
            freed.sort(key=lambda s: s.order, reverse=True)
            task = asyncio.get_running_loop().create_task(self._release_many(freed))
            self._aux.add(task)
            task.add_done_callback(self._aux.discard)

    async def _release_many(self, freed: Sequence[_Shared]) -> None:
        for shared in freed:
            await self._release_shared(shared)

    async def _release_shared(self, shared: _Shared) -> None:
        holder = shared.holder
        if holder is None or holder.done():
            return
        if shared.state == "waiting":
            holder.cancel()
        else:
            assert shared.release is not None
            shared.release.set()
        await asyncio.gather(holder, return_exceptions=True)

    # -- helpers ----------------------------------------------------------------------

    def _emit(self, kind: EventKind, stage: str | None, message: str = "",
              data: Any = None) -> None:
        if not self._subs:
            return
        event = Event(kind, stage, _now(), message, data)
        for sub in self._subs:
            try:
                sub(event)
            except Exception as exc:
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


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark retrieved: stages that still wait will re-raise it


# --- resume and the sync entry point ------------------------------------------------


def _changed_stages(run_dir: Path, graph: Graph) -> list[str]:
    try:
        old = json.loads((run_dir / GRAPH).read_text())["definition"]
    except (OSError, ValueError, KeyError):
        return []
    new = graph.definition()
    olds = {s["name"]: s for s in old.get("stages", [])}
    news = {s["name"]: s for s in new["stages"]}
    changed = sorted(n for n in olds.keys() | news.keys() if olds.get(n) != news.get(n))
    for key in ("version", "params", "resources"):
        if old.get(key) != new.get(key):
            changed.append(f"<graph {key}>")
    return changed


def plan_resume(run_dir: str | Path, graph: Graph,
                from_stage: str | None = None) -> tuple[dict[str, Any], int]:
    """Which results a resume reuses (decoded), and the next attempt number.

    Refuses with :class:`ResumeMismatch` when the graph's digest changed.
    """
    run_dir = Path(run_dir)
    js = read_journal(run_dir)
    if js.digest != graph.digest:
        raise ResumeMismatch(run_dir, js.digest, graph.digest, _changed_stages(run_dir, graph))
    if from_stage is not None and from_stage not in graph:
        raise DefinitionError(f"from_stage names unknown stage {from_stage!r}",
                              field="from_stage")
    finished = {n: r for n, r in js.records.items()
                if n in graph and r.state in (_FINISHED, _REUSED)}
    rerun = {n for n in graph.names if n not in finished}
    if from_stage is not None:
        rerun |= {from_stage} | graph.descendants(from_stage)
    for name in reversed(graph.names):  # users before their dependencies
        if name in rerun:
            for dep in graph[name].deps:
                if dep not in rerun and not finished[dep].serialized:
                    rerun.add(dep)
    reused = {n: decode_result(graph[n], finished[n].result)
              for n in graph.names if n not in rerun}
    return reused, js.attempt + 1


async def resume(
    run_dir: str | Path,
    graph: Graph,
    *,
    from_stage: str | None = None,
    stop_after: str | Sequence[str] | None = None,
    caps: Caps | None = None,
    subscribers: Iterable[Subscriber] = (),
    durability: str = "flush",
    fail_fast: bool = False,
    limiters: Mapping[str, CapacityLimiter] | None = None,
) -> Run:
    """Continue a run in its directory.

    Stages that finished with a stored result are reused, except ``from_stage``
    and everything after it; stages whose results were not serializable re-run
    when a re-running stage needs them. Shared resources are acquired afresh.
    """
    reused, attempt = plan_resume(run_dir, graph, from_stage)
    runner = Runner(graph, run_dir=run_dir, caps=caps, subscribers=subscribers,
                    durability=durability, fail_fast=fail_fast, limiters=limiters)
    return await runner._execute(stop_after=stop_after, reused=reused, attempt=attempt,
                                 from_stage=from_stage)


def run_sync(
    graph: Graph,
    *,
    run_root: str | Path | None = None,
    resume_dir: str | Path | None = None,
    from_stage: str | None = None,
    stop_after: str | Sequence[str] | None = None,
    caps: Caps | None = None,
    subscribers: Iterable[Subscriber] = (),
    durability: str = "flush",
    fail_fast: bool = False,
    handle_signals: bool = True,
    check: bool = True,
) -> Run:
    """Run (or, with ``resume_dir``, resume) a graph from synchronous code.

    With ``handle_signals``, the first SIGINT or SIGTERM cancels the run
    cleanly (unstarted stages are skipped, ``always`` stages run, resources are
    released) and :class:`RunCancelled` is raised; later signals are reported
    on stderr and do not cut the cleanup short. With ``check``, a run with
    failed stages raises :class:`~pipeline.errors.RunFailed`.
    """
    subscribers = list(subscribers)

    async def main() -> Run:
        loop = asyncio.get_running_loop()
        if resume_dir is not None:
            reused, attempt = plan_resume(resume_dir, graph, from_stage)
            runner = Runner(graph, run_dir=resume_dir, caps=caps, subscribers=subscribers,
                            durability=durability, fail_fast=fail_fast)
        else:
            reused, attempt = {}, 1
            runner = Runner(graph, run_root=run_root, caps=caps, subscribers=subscribers,
                            durability=durability, fail_fast=fail_fast)
        seen: list[str] = []

        def on_signal(name: str) -> None:
            seen.append(name)
            if len(seen) == 1:
                runner.cancel(f"received {name}")
            else:
                print(f"pipeline: {name} again; still cleaning up (resources are being "
                      f"released; SIGKILL skips that)", file=sys.stderr, flush=True)

        installed = []
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, on_signal, sig.name)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
        try:
            if resume_dir is not None:
                run = await runner._execute(stop_after=stop_after, reused=reused,
                                            attempt=attempt, from_stage=from_stage)
            else:
                run = await runner.run(stop_after=stop_after)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        if seen:
            raise RunCancelled(run, signal=seen[0])
        return run

    run = asyncio.run(main())
    return run.check() if check else run

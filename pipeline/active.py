"""The scheduler's core: a pure state machine over the stages of one run.

It knows stage names, their dependencies and which are ``always`` stages, and
learns from its driver what happened; it does no I/O and knows nothing of
asyncio, so every transition can be tested directly. :class:`~pipeline.runner.Runner`
drives it: it runs a task per stage the plan makes ready, tells the plan what
the task did, and writes the journal.

Every stage is in exactly one named set at any time::

    pending -> ready -> running -> finished | failed | cancelled
       |         +-> failed | cancelled        (resources or caps, before it ran)
       +-> abandoned                           (a dependency did not finish)
       +-> cancelled                           (the run was cancelled first)

plus ``reused`` (finished in an earlier attempt; never runs). ``ready`` is
:attr:`StageState.QUEUED <pipeline.state.StageState.QUEUED>`: the dependencies
are settled and the stage waits for caps or resources.

Caveats:

- A stage's end (:meth:`ActivePlan.finish`, :meth:`~ActivePlan.fail`,
  :meth:`~ActivePlan.stage_cancelled`) and its *settling* are two steps: the driver
  settles a stage once its journal line is written, and only settling releases
  its users. Until then the users still wait for it.
- Stages that :meth:`~ActivePlan.settle` abandons or cancels settle at once
  (their lines carry no result a user could need).
- Stages outside ``selected`` (``stop_after``) stay pending and never become
  ready; :meth:`~ActivePlan.why_pending` says so.
- Cap waits are what the driver reports through :meth:`~ActivePlan.waiting_on`:
  caps are async and live in the driver.
- The set properties are live read-only views; iterate :attr:`ActivePlan.names`
  for a stable order.
- An impossible transition (a driver bug) raises ``RuntimeError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

import attrs

from pipeline.state import StageState

if TYPE_CHECKING:
    from pipeline.caps import LimiterStatistics

__all__ = ["ActivePlan", "PendingReason"]

_PENDING = StageState.PENDING
_QUEUED = StageState.QUEUED
_RUNNING = StageState.RUNNING
_FINISHED = StageState.FINISHED
_FAILED = StageState.FAILED
_ABANDONED = StageState.ABANDONED
_CANCELLED = StageState.CANCELLED
_REUSED = StageState.REUSED

_STARTED = (_QUEUED, _RUNNING)
_ENDED = (_FINISHED, _FAILED, _CANCELLED)

Change = tuple[str, StageState]
"""A stage that :meth:`ActivePlan.settle` moved, and where to (ready, abandoned, cancelled)."""


@attrs.frozen(kw_only=True)
class PendingReason:
    """Why a stage is where it is: what :meth:`ActivePlan.why_pending` answers.

    ``waits_for`` lists the dependencies not yet settled, with their states;
    ``cap``/``resource`` is what a ready stage waits on; ``detail`` says why a
    stage ended the way it did, or why it is not part of the run.
    """

    stage: str
    state: StageState
    waits_for: tuple[tuple[str, StageState], ...] = ()
    cap: str | None = None
    resource: str | None = None
    detail: str = ""
    in_run: bool = True
    started: bool = True

    @property
    def pending(self) -> bool:
        """The stage has yet to run (pending or ready) in this run."""
        return self.in_run and self.state in (_PENDING, _QUEUED)

    def describe(self, caps: Mapping[str, LimiterStatistics] | None = None) -> str:
        """One line for people; ``caps`` (``Runner.statistics()``) adds how full a cap is."""
        if not self.in_run:
            return f"not in this run: {self.detail}"
        if self.state is _PENDING:
            if self.waits_for:
                many = len(self.waits_for) > 1
                deps = ", ".join(f"{name!r} ({_dep_state(state)})"
                                 for name, state in self.waits_for)
                return f"waits for dependenc{'ies' if many else 'y'} {deps}"
            return "waits for the run to start" if not self.started else "ready to start"
        if self.state is _QUEUED:
            cap = _cap_text(self.cap, caps)
            if self.resource is not None:
                return f"waits for shared resource {self.resource!r}" + (
                    f" ({cap})" if cap else "")
            if cap:
                return f"waits for {cap}"
            return "ready: starting (no cap to wait for)"
        text = f"not pending: {self.state.value}"
        return f"{text} ({self.detail})" if self.detail else text


def _dep_state(state: StageState) -> str:
    if state in _ENDED:
        return f"{state.value}, not yet recorded"
    return state.value


def _cap_text(cap: str | None, caps: Mapping[str, LimiterStatistics] | None) -> str:
    if cap is None:
        return ""
    stats = caps.get(cap) if caps is not None else None
    if stats is None:
        return f"cap {cap!r}"
    total = "unlimited" if stats.total_tokens is None else stats.total_tokens
    return f"cap {cap!r} ({stats.borrowed_tokens}/{total} held)"


class _Entry:
    """One stage's place in the plan (mutable; never leaves the plan)."""

    __slots__ = ("active", "always", "deps", "name", "remaining", "settled", "state", "users")

    def __init__(self, name: str, deps: Sequence[str], always: bool) -> None:
        self.name = name
        self.deps = deps
        self.always = always
        self.active = False            # part of this run (not reused, inside ``selected``)
        self.users: list[_Entry] = []  # active stages that wait for this one
        self.remaining = 0             # active dependencies not yet settled (as this one counts)
        self.state = _PENDING
        self.settled = False


class ActivePlan:
    """The states of one run's stages and the rules that move them.

    ``deps`` maps every stage name to its dependencies, in the graph's order.
    ``reused`` stages finished in an earlier attempt; ``selected`` (None: all)
    limits the run to those stages (``stop_after`` and its ancestors).
    ``fail_fast``: a failure asks the driver to cancel the run.
    """

    __slots__ = ("_abandoned", "_active", "_cancel_reason", "_cancelled", "_cancelling",
                 "_entries", "_failed", "_finished", "_open", "_pending", "_ready",
                 "_reasons", "_reused", "_running", "_sets", "_started", "_waits", "fail_fast",
                 "names")

    def __init__(self, deps: Mapping[str, Sequence[str]], *, always: Iterable[str] = (),
                 reused: Iterable[str] = (), selected: Iterable[str] | None = None,
                 fail_fast: bool = False) -> None:
        always = set(always)
        entries = {name: _Entry(name, d, name in always) for name, d in deps.items()}
        for name in (*always, *reused, *(selected or ())):
            if name not in entries:
                raise KeyError(f"no stage {name!r} in the plan")
        self.names: tuple[str, ...] = tuple(entries)
        self.fail_fast = fail_fast
        self._entries = entries
        self._pending: set[str] = set()
        self._ready: set[str] = set()
        self._running: set[str] = set()
        self._finished: set[str] = set()
        self._failed: set[str] = set()
        self._abandoned: set[str] = set()
        self._cancelled: set[str] = set()
        self._reused: set[str] = set()
        self._sets = {_PENDING: self._pending, _QUEUED: self._ready, _RUNNING: self._running,
                      _FINISHED: self._finished, _FAILED: self._failed,
                      _ABANDONED: self._abandoned, _CANCELLED: self._cancelled,
                      _REUSED: self._reused}
        for name in reused:
            entry = entries[name]
            entry.state = _REUSED
            entry.settled = True
            self._reused.add(name)
        chosen = set(selected) if selected is not None else None
        active = [e for e in entries.values()
                  if e.state is _PENDING and (chosen is None or e.name in chosen)]
        self._pending.update(e.name for e in entries.values() if e.state is _PENDING)
        for entry in active:
            entry.active = True
        for entry in active:
            for dep in entry.deps:
                if dep in entries and entries[dep].active:
                    entries[dep].users.append(entry)
                    entry.remaining += 1
                elif dep not in entries:
                    raise KeyError(f"stage {entry.name!r} depends on unknown stage {dep!r}")
        self._active: tuple[str, ...] = tuple(e.name for e in active)
        self._open = len(active)
        self._reasons: dict[str, str] = {}  # why abandoned or cancelled
        self._waits: dict[str, tuple[str | None, str | None]] = {}  # ready: (cap, resource)
        self._started = False
        self._cancelling = False
        self._cancel_reason = ""

    # -- reading ----------------------------------------------------------------------

    @property
    def pending(self) -> AbstractSet[str]:
        """Not started: waiting for dependencies (or never reached: not in the run)."""
        return self._pending

    @property
    def ready(self) -> AbstractSet[str]:
        """Dependencies settled; waiting for caps or resources (``StageState.QUEUED``)."""
        return self._ready

    @property
    def running(self) -> AbstractSet[str]:
        return self._running

    @property
    def finished(self) -> AbstractSet[str]:
        return self._finished

    @property
    def failed(self) -> AbstractSet[str]:
        return self._failed

    @property
    def abandoned(self) -> AbstractSet[str]:
        return self._abandoned

    @property
    def cancelled(self) -> AbstractSet[str]:
        return self._cancelled

    @property
    def reused(self) -> AbstractSet[str]:
        return self._reused

    def sets(self) -> dict[StageState, AbstractSet[str]]:
        """Every named set by the state it holds; together they partition :attr:`names`."""
        return dict(self._sets)

    @property
    def active(self) -> tuple[str, ...]:
        """The stages this run is to settle, in order (not reused, inside ``selected``)."""
        return self._active

    @property
    def done(self) -> bool:
        """Every active stage is settled."""
        return self._open == 0

    @property
    def cancelling(self) -> bool:
        return self._cancelling

    @property
    def cancel_reason(self) -> str:
        return self._cancel_reason

    def state(self, name: str) -> StageState:
        return self._entries[name].state

    def reason(self, name: str) -> str | None:
        """Why a stage was abandoned or cancelled (None otherwise)."""
        self._entries[name]  # KeyError for an unknown stage
        return self._reasons.get(name)

    def why_pending(self, name: str) -> PendingReason:
        """What the stage still waits for, or why it is not pending."""
        entry = self._entries[name]
        state = entry.state
        if state is _PENDING:
            if not entry.active:
                return PendingReason(stage=name, state=state, in_run=False,
                                     detail="stop_after ends the run before it")
            waits = tuple((d, self._entries[d].state) for d in entry.deps
                          if not self._entries[d].settled)
            return PendingReason(stage=name, state=state, waits_for=waits,
                                 started=self._started)
        if state is _QUEUED:
            cap, resource = self._waits.get(name, (None, None))
            return PendingReason(stage=name, state=state, cap=cap, resource=resource)
        detail = self._reasons.get(name, "")
        if state is _REUSED:
            detail = "finished in an earlier attempt"
        return PendingReason(stage=name, state=state, detail=detail)

    # -- transitions --------------------------------------------------------------------

    def start(self) -> list[str]:
        """Begin: make ready the active stages without unsettled dependencies."""
        self._started = True
        made = []
        for name in self._active:
            entry = self._entries[name]
            if entry.state is _PENDING and entry.remaining == 0:
                self._make_ready(entry)
                made.append(name)
        return made

    def waiting_on(self, name: str, cap: str | None = None, *,
                   resource: str | None = None) -> None:
        """The driver reports what a started stage waits for (both None: nothing)."""
        self._entries[name]  # KeyError for an unknown stage
        if cap is None and resource is None:
            self._waits.pop(name, None)
        else:
            self._waits[name] = (cap, resource)

    def started(self, name: str) -> None:
        """The stage's function runs (again, on a retry: then nothing changes)."""
        entry = self._entries[name]
        if entry.state is _QUEUED:
            self._ready.discard(name)
            self._running.add(name)
            entry.state = _RUNNING
            if self._waits:
                self._waits.pop(name, None)
        elif entry.state is not _RUNNING:
            raise _bad(entry, _RUNNING)

    def finish(self, name: str) -> None:
        entry = self._entries[name]
        if entry.state is not _RUNNING:
            raise _bad(entry, _FINISHED)
        self._running.discard(name)
        self._finished.add(name)
        entry.state = _FINISHED

    def fail(self, name: str) -> bool:
        """The stage failed (it may not have run); True: ``fail_fast`` cancels the run."""
        entry = self._entries[name]
        if entry.state not in _STARTED:
            raise _bad(entry, _FAILED)
        self._move(entry, _FAILED)
        self._waits.pop(name, None)
        return self.fail_fast

    def stage_cancelled(self, name: str) -> bool:
        """A started stage's task ended cancelled; False if it had ended already."""
        entry = self._entries[name]
        if entry.state not in _STARTED:
            return False
        self._mark_cancelled(entry)
        return True

    def cancel(self, reason: str) -> tuple[list[str], list[str]]:
        """Cancel the run: mark unstarted stages cancelled (not ``always`` ones).

        Returns the stages marked cancelled (the driver records and settles
        them) and the started ones it must stop. A second call changes
        nothing: the first reason stays.
        """
        if self._cancelling:
            return [], []
        self._cancelling = True
        self._cancel_reason = reason
        marked, stop = [], []
        for name in self._active:
            entry = self._entries[name]
            if entry.always:
                continue
            if entry.state is _PENDING:
                self._mark_cancelled(entry)
                marked.append(name)
            elif entry.state in _STARTED:
                stop.append(name)
        return marked, stop

    def settle(self, name: str) -> list[Change]:
        """The stage's end is recorded: count it off its users.

        Users whose dependencies are now all settled become ready (or, when
        the run is cancelling, cancelled, unless ``always``); users of a stage
        that did not finish are abandoned, unless ``always``. Abandoned and
        cancelled users settle at once, so it cascades. Returns the moves in
        the order made.
        """
        root = self._entries[name]
        if root.settled or root.state not in _ENDED:
            raise _bad(root, root.state, "settle")
        changes: list[Change] = []
        stack = [root]
        while stack:
            entry = stack.pop()
            entry.settled = True
            self._open -= 1
            ok = entry.state is _FINISHED
            for user in entry.users:
                if user.state is not _PENDING:
                    continue
                if ok or user.always:
                    user.remaining -= 1
                    if user.remaining:
                        continue
                    if self._cancelling and not user.always:
                        self._mark_cancelled(user)
                        changes.append((user.name, _CANCELLED))
                        stack.append(user)
                    else:
                        self._make_ready(user)
                        changes.append((user.name, _QUEUED))
                else:
                    self._move(user, _ABANDONED)
                    self._reasons[user.name] = f"dependency {entry.name!r} {entry.state.value}"
                    changes.append((user.name, _ABANDONED))
                    stack.append(user)
        return changes

    # -- the one way each state is entered -------------------------------------------------

    def _make_ready(self, entry: _Entry) -> None:
        self._pending.discard(entry.name)
        self._ready.add(entry.name)
        entry.state = _QUEUED

    def _mark_cancelled(self, entry: _Entry) -> None:
        self._move(entry, _CANCELLED)
        self._reasons[entry.name] = self._cancel_reason or "cancelled"
        self._waits.pop(entry.name, None)

    def _move(self, entry: _Entry, state: StageState) -> None:
        self._sets[entry.state].discard(entry.name)
        self._sets[state].add(entry.name)
        entry.state = state


def _bad(entry: _Entry, to: StageState, what: str = "") -> RuntimeError:
    verb = what or f"go to {to.value}"
    return RuntimeError(f"stage {entry.name!r} cannot {verb} from {entry.state.value} "
                        f"(settled={entry.settled}): a bug in the driver")

"""Events of a run and the subscribers that watch them.

A subscriber is any callable taking an :class:`Event`; if it also has
``close()``, the runner calls it when the run ends. Three are provided:
:class:`Collector` (tests), :class:`JsonLinesLog` (a log file) and
:class:`RichProgress` (a terminal display), and for logs and scripts,
:class:`PlainProgress` (a line per log line and stage change) and
:class:`JsonProgress` (a JSON object per event per line).

Caveats:

- Subscribers are called synchronously on the scheduler's event loop, in the
  order given; keep them quick. One that raises is dropped for the rest of the
  run (with a warning), so a broken display cannot break a build.
- ``Event.time`` is ``time.time()`` (wall clock, seconds).
"""

from __future__ import annotations

import enum
import json
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

__all__ = [
    "Collector",
    "Event",
    "EventKind",
    "JsonLinesLog",
    "JsonProgress",
    "PlainProgress",
    "RichProgress",
    "Subscriber",
]


class EventKind(str, enum.Enum):
    RUN_STARTED = "run_started"
    RUN_FINISHED = "run_finished"
    STAGE_QUEUED = "stage_queued"        # dependencies done; waiting for caps/resources
    STAGE_STARTED = "stage_started"      # the stage function is called
    STAGE_RETRY = "stage_retry"          # an attempt failed; another follows
    STAGE_FINISHED = "stage_finished"
    STAGE_FAILED = "stage_failed"
    STAGE_ABANDONED = "stage_abandoned"  # a dependency did not finish
    STAGE_CANCELLED = "stage_cancelled"
    STAGE_REUSED = "stage_reused"        # result reloaded from an earlier run (resume)
    RESOURCE_ACQUIRED = "resource_acquired"
    RESOURCE_RELEASED = "resource_released"
    LOG = "log"
    PROGRESS = "progress"


class Event(NamedTuple):
    """One thing that happened (immutable). ``stage`` is None for run-level events.

    A NamedTuple rather than an attrs class: the scheduler makes three per
    stage, and this is the cheapest immutable value to construct.
    """

    kind: EventKind
    stage: str | None
    time: float
    message: str = ""
    data: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value, "time": self.time}
        if self.stage is not None:
            out["stage"] = self.stage
        if self.message:
            out["message"] = self.message
        if self.data is not None:
            out["data"] = self.data
        return out


Subscriber = Callable[[Event], None]


class Collector:
    """Keeps every event, for tests and post-mortems."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def kinds(self, stage: str | None = None) -> list[EventKind]:
        return [e.kind for e in self.events if stage is None or e.stage == stage]

    def of(self, kind: EventKind) -> list[Event]:
        return [e for e in self.events if e.kind is kind]

    def stages(self, kind: EventKind) -> list[str]:
        return [e.stage for e in self.events if e.kind is kind and e.stage is not None]


class JsonLinesLog:
    """Appends each event as one JSON line to ``path`` (buffered; flushed on close)."""

    def __init__(self, path: str | Path, *, flush_every: int = 256) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # open until close()
        self._pending = 0
        self._flush_every = flush_every

    def __call__(self, event: Event) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(event.to_json(), default=repr) + "\n")
        self._pending += 1
        if self._pending >= self._flush_every or event.kind is EventKind.RUN_FINISHED:
            self._file.flush()
            self._pending = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class RichProgress:
    """A terminal display: one overall bar, the running stages, and log lines.

    Log lines are printed above the bar as ``stage | line``. Use ``console=``
    to direct it elsewhere (tests pass a recording Console).
    """

    def __init__(self, *, console: Any = None, show_logs: bool = True) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console or Console(file=sys.stderr)
        self.show_logs = show_logs
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console, transient=False)
        self._overall: Any = None
        self._stage_tasks: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._started = False

    def __call__(self, event: Event) -> None:
        kind = event.kind
        p = self._progress
        if kind is EventKind.RUN_STARTED:
            total = (event.data or {}).get("stages", 0)
            if not self._started:
                p.start()
                self._started = True
            self._overall = p.add_task("[bold]stages", total=total)
            return
        if self._overall is None:
            return
        stage = event.stage or ""
        if kind is EventKind.STAGE_STARTED:
            self._stage_tasks[stage] = p.add_task(f"  {event.stage}", total=None)
        elif kind in (EventKind.STAGE_FINISHED, EventKind.STAGE_FAILED,
                      EventKind.STAGE_CANCELLED, EventKind.STAGE_ABANDONED,
                      EventKind.STAGE_REUSED):
            p.advance(self._overall)
            task = self._stage_tasks.pop(stage, None)
            if task is not None:
                p.remove_task(task)
            if kind is EventKind.STAGE_FAILED:
                p.console.print(f"[red]failed[/red] {event.stage}: {event.message}",
                                markup=True, highlight=False)
        elif kind is EventKind.PROGRESS:
            task = self._stage_tasks.get(stage)
            if task is not None and isinstance(event.data, dict):
                p.update(task, completed=event.data.get("done"), total=event.data.get("total"))
        elif kind is EventKind.LOG and self.show_logs:
            p.console.print(f"{event.stage} | {event.message}", markup=False, highlight=False)
        elif kind is EventKind.RUN_FINISHED:
            p.update(self._overall, description=f"[bold]stages ({event.message})")
            self.close()

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False


#: Stage events the line-oriented displays print, and the state each names.
_STATE_OF = {EventKind.STAGE_STARTED: "started", EventKind.STAGE_FINISHED: "finished",
             EventKind.STAGE_FAILED: "failed", EventKind.STAGE_CANCELLED: "cancelled",
             EventKind.STAGE_ABANDONED: "abandoned", EventKind.STAGE_REUSED: "reused",
             EventKind.STAGE_RETRY: "retrying"}


def _run_id(event: Event) -> str:
    return Path(event.message).name if event.message else ""


class PlainProgress:
    """One line per log line (``stage | line``) and per stage change
    (``stage: finished in 0.12 s``), for logs and CI, flushed as they come."""

    def __init__(self, file: IO[str] | None = None) -> None:
        self.file = file or sys.stderr
        self._started: dict[str, float] = {}

    def __call__(self, event: Event) -> None:
        kind, stage = event.kind, event.stage or ""
        if kind is EventKind.LOG:
            line = f"{stage} | {event.message}"
        elif kind in _STATE_OF:
            state = _STATE_OF[kind]
            if kind is EventKind.STAGE_STARTED:
                self._started[stage] = event.time
                line = f"{stage}: started"
            else:
                began = self._started.pop(stage, None)
                took = f" in {event.time - began:.2f} s" if began is not None else ""
                why = f": {event.message}" if event.message and state != "finished" else ""
                line = f"{stage}: {state}{took}{why}"
        elif kind is EventKind.RUN_STARTED:
            line = f"run {_run_id(event)}: started"
        elif kind is EventKind.RUN_FINISHED:
            line = f"run: {event.message}"
        else:
            return
        self.file.write(line + "\n")
        self.file.flush()


class JsonProgress:
    """One JSON object per event per line (the README documents the schema).

    Every object has ``time``, ``event`` (the EventKind's value) and ``run``
    (the run id); stage events add ``stage`` and, when a stage ended, its
    ``state`` and ``elapsed`` seconds; log events add ``stream`` and
    ``line``; ``message`` when there is one. ``fields(stage, run)`` may
    replace the ``stage`` field with others (a build's key and stage).
    """

    def __init__(self, file: IO[str] | None = None, *,
                 fields: Callable[[str, str], dict[str, Any]] | None = None) -> None:
        self.file = file or sys.stderr
        self.fields = fields
        self._run = ""
        self._started: dict[str, float] = {}

    def __call__(self, event: Event) -> None:
        kind = event.kind
        if kind is EventKind.RUN_STARTED:
            self._run = _run_id(event)
        if kind is EventKind.RESOURCE_ACQUIRED or kind is EventKind.RESOURCE_RELEASED:
            return
        out: dict[str, Any] = {"time": event.time, "event": kind.value, "run": self._run}
        if event.stage is not None:
            out.update(self.fields(event.stage, self._run) if self.fields
                       else {"stage": event.stage})
            if kind in _STATE_OF:
                out["state"] = _STATE_OF[kind]
            if kind is EventKind.STAGE_STARTED:
                self._started[event.stage] = event.time
            elif kind in _STATE_OF:
                began = self._started.pop(event.stage, None)
                if began is not None:
                    out["elapsed"] = round(event.time - began, 6)
        if kind is EventKind.LOG:
            out["stream"] = (event.data or {}).get("stream", "stdout")
            out["line"] = event.message
        elif event.message and kind is not EventKind.RUN_STARTED:
            out["message"] = event.message
        self.file.write(json.dumps(out) + "\n")
        self.file.flush()

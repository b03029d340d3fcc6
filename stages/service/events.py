"""What happens to one build while it runs, as values: started, stage, log, finished, failed.

:class:`BuildEvents` turns the pipeline events of a run (every stage of
every build in it) into the :data:`BuildEvent` values of one build, in
order: one :class:`Started`, then :class:`StageChanged` and
:class:`LogLine` as they happen, then :class:`Finished` or :class:`Failed`
(made by :func:`final_event` from the build's result). These are what the
gRPC ``DoBuildStream`` sends (:mod:`stages.grpc.build_service`), and what
a client rebuilds into pipeline events for its progress display
(:func:`to_pipeline_event`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from stages.errors import BuildError, BuildFailed, RuncError, cause_of

if TYPE_CHECKING:
    from pipeline import Event
    from stages.request import Build

__all__ = ["BuildEvent", "BuildEvents", "Failed", "Finished", "LogLine", "StageChanged",
           "Started", "exit_code_of", "final_event", "to_pipeline_event"]

STAGE_STATES = ("started", "finished", "failed", "cancelled")


@attrs.frozen
class Started:
    build_id: str
    time: float = attrs.field(factory=time.time)


@attrs.frozen
class StageChanged:
    """``name`` is the bare stage name (run, ingest...); ``state`` one of STAGE_STATES."""

    name: str
    state: str
    elapsed: float = 0.0
    time: float = attrs.field(factory=time.time)


@attrs.frozen
class LogLine:
    """One line of builder output, as written (the newline kept when there was one)."""

    stream: str   # "stdout" or "stderr"
    data: bytes
    time: float = attrs.field(factory=time.time)


@attrs.frozen
class Finished:
    build: Build
    time: float = attrs.field(factory=time.time)


@attrs.frozen
class Failed:
    stage: str
    message: str
    exit_code: int | None = None
    time: float = attrs.field(factory=time.time)


BuildEvent = Started | StageChanged | LogLine | Finished | Failed


class BuildEvents:
    """A pipeline subscriber that passes one build's events on to ``emit``.

    ``prefix`` is the build's stage-name prefix in the run (``<key>/``);
    events of other builds in the same run are ignored.
    """

    _STATES = {"stage_started": "started", "stage_finished": "finished",
               "stage_failed": "failed", "stage_cancelled": "cancelled"}

    def __init__(self, prefix: str, emit: Callable[[BuildEvent], None]) -> None:
        self.prefix = prefix
        self.emit = emit
        self._started: dict[str, float] = {}

    def __call__(self, event: Event) -> None:
        kind = event.kind.value
        if kind == "run_started":
            self.emit(Started(build_id=str(event.message).rsplit("/", 1)[-1], time=event.time))
            return
        stage = event.stage
        if stage is None or not stage.startswith(self.prefix):
            return
        name = stage[len(self.prefix):]
        if kind == "log":
            # The builder's output only (the run stage's lines, raw); the other
            # stages' notes name the server's own paths.
            data = event.data or {}
            raw = data.get("raw")
            if isinstance(raw, bytes):
                self.emit(LogLine(stream=str(data.get("stream", "stdout")), data=raw,
                                  time=event.time))
        elif kind in self._STATES:
            state = self._STATES[kind]
            if state == "started":
                self._started[name] = event.time
            began = self._started.get(name, event.time)
            self.emit(StageChanged(name=name, state=state, elapsed=event.time - began,
                                   time=event.time))


def exit_code_of(exc: BaseException) -> int | None:
    """The builder's exit code behind a failed build, if it exited."""
    runc = cause_of(exc, RuncError)
    return None if runc is None else runc.exit_code


def final_event(result: Build | BuildError) -> Finished | Failed:
    """The last event of a build: its Build, or what made it fail."""
    if isinstance(result, BuildError):
        stage = (result.stage or "") if isinstance(result, BuildFailed) else ""
        return Failed(stage=stage, message=str(result), exit_code=exit_code_of(result))
    return Finished(build=result)


def to_pipeline_event(event: BuildEvent, key: str) -> Event:
    """A streamed build's event as the pipeline event a local run would have
    emitted (stage ``<key>/<name>``), for the same progress displays."""
    from pipeline import Event, EventKind

    if isinstance(event, Started):
        return Event(EventKind.RUN_STARTED, None, event.time, event.build_id)
    if isinstance(event, StageChanged):
        kind = EventKind(f"stage_{event.state}")
        return Event(kind, f"{key}/{event.name}", event.time, "",
                     {"elapsed": event.elapsed})
    if isinstance(event, LogLine):
        text = event.data.decode("utf-8", "replace").rstrip("\n")
        return Event(EventKind.LOG, f"{key}/run", event.time, text,
                     {"stream": event.stream, "raw": event.data})
    if isinstance(event, Failed):
        return Event(EventKind.RUN_FINISHED, None, event.time, "failed",
                     {"stage": event.stage, "error": event.message,
                      "exit_code": event.exit_code})
    return Event(EventKind.RUN_FINISHED, None, event.time, "succeeded")

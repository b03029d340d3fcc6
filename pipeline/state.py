"""Run state: stage states, the run summary, and the run directory on disk.

A run directory holds::

    graph.json      the graph's canonical definition and digest (at start)
    journal.jsonl   append-only: one line per run attempt (with its caps), per
                    settled stage, per run end, and a "wait" line whenever a
                    stage starts or stops waiting for a cap. The source of truth.
    state.json      a readable snapshot, atomically replaced at the end of a run
    stages/<name>/  each stage's scratch directory (made on first use)

Caveats:

- The journal is written in batches (group commit): a stage's dependents start
  only after its line is written, so a finished stage's result survives a
  crash of the process. With ``durability="fsync"`` each batch is also
  fsynced (survives power loss, costs a disk flush per batch).
- A torn last line (a crash mid-write) is ignored when reading.
- Results are stored inline in the journal; keep them small (paths, digests),
  not bulk data.
"""

from __future__ import annotations

import enum
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from pipeline.errors import StateError

__all__ = [
    "MISSING",
    "Journal",
    "Run",
    "RunStatus",
    "StageOutcome",
    "StageState",
    "atomic_write_json",
    "load_run",
    "new_run_dir",
    "run_token",
]

JOURNAL = "journal.jsonl"
STATE = "state.json"
GRAPH = "graph.json"


class StageState(str, enum.Enum):
    PENDING = "pending"        # not started (yet); also: not reached when the run stopped
    QUEUED = "queued"          # dependencies done, waiting for caps or resources
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    ABANDONED = "abandoned"    # a dependency failed, was abandoned or cancelled
    CANCELLED = "cancelled"
    REUSED = "reused"          # finished in an earlier attempt of this run; result reloaded

    @property
    def ok(self) -> bool:
        return self in (StageState.FINISHED, StageState.REUSED)

    @property
    def settled(self) -> bool:
        return self in _SETTLED


_SETTLED = frozenset({StageState.FINISHED, StageState.FAILED, StageState.ABANDONED,
                      StageState.CANCELLED, StageState.REUSED})


class RunStatus(str, enum.Enum):
    RUNNING = "running"      # on disk: the process died (or still runs)
    FINISHED = "finished"    # every stage finished
    FAILED = "failed"        # some stage failed (others may have finished)
    CANCELLED = "cancelled"
    STOPPED = "stopped"      # stop_after reached; resume to continue


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()
"""The result of a stage that has none (not finished, or not serializable)."""


@attrs.frozen(kw_only=True)
class StageOutcome:
    """What happened to one stage. ``exception`` is only set in the process that ran it."""

    name: str
    state: StageState
    result: Any = MISSING
    error: str | None = None
    exception: BaseException | None = attrs.field(default=None, eq=False, repr=False)
    started: float | None = None
    ended: float | None = None
    attempts: int = 0
    serialized: bool = False

    @property
    def duration(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state.value, "attempts": self.attempts}
        if self.error:
            out["error"] = self.error
        if self.started is not None:
            out["started"] = self.started
        if self.ended is not None:
            out["ended"] = self.ended
        return out


@attrs.frozen(kw_only=True)
class Run:
    """The summary of a run (returned by the runner, or loaded from a run directory)."""

    run_dir: Path | None
    digest: str
    status: RunStatus
    stages: Mapping[str, StageOutcome] = attrs.field(repr=False)
    attempt: int = 1
    started: float | None = None
    ended: float | None = None
    errors: tuple[str, ...] = ()  # problems outside stages, e.g. a resource that failed to release

    @property
    def results(self) -> dict[str, Any]:
        """Results of the stages that have one."""
        return {n: o.result for n, o in self.stages.items() if o.result is not MISSING}

    def states(self) -> dict[str, StageState]:
        return {n: o.state for n, o in self.stages.items()}

    def names(self, state: StageState) -> list[str]:
        return [n for n, o in self.stages.items() if o.state is state]

    def state_counts(self) -> dict[str, int]:
        """How many stages are in each state, by the state's value."""
        counts: dict[str, int] = {}
        for o in self.stages.values():
            counts[o.state.value] = counts.get(o.state.value, 0) + 1
        return counts

    def check(self) -> Run:
        """Raise :class:`~pipeline.errors.RunFailed` if any stage failed; else self."""
        from pipeline.errors import RunFailed
        failed = self.names(StageState.FAILED)
        if failed or self.status is RunStatus.FAILED:
            raise RunFailed(self, failed)
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "status": self.status.value,
            "attempt": self.attempt,
            "started": self.started,
            "ended": self.ended,
            "errors": list(self.errors),
            "stages": {n: o.to_json() for n, o in self.stages.items()},
        }


def new_run_id(label: str = "") -> str:
    """A new run id: ``YYYYMMDD-HHMMSS[-LABEL]-TOKEN``, TOKEN six random hex
    digits, so ids sort by start time (the one place run ids are minted)."""
    prefix = time.strftime("%Y%m%d-%H%M%S") + (f"-{label}" if label else "")
    return f"{prefix}-{secrets.token_hex(3)}"


def new_run_dir(root: Path, label: str = "") -> Path:
    """Make a new, empty run directory under ``root`` and return it.

    Its name is a :func:`new_run_id`; two runs started in the same second
    do not collide (one that does gets another token).
    """
    root.mkdir(parents=True, exist_ok=True)
    while True:
        run_dir = root / new_run_id(label)
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return run_dir


def run_token(run_dir: Path) -> str:
    """The random part of a run id made by :func:`new_run_dir`."""
    return run_dir.name.rsplit("-", 1)[-1]


def atomic_write_json(path: Path, value: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # Compact: the C encoder is 10x faster than indent= on big runs.
            f.write(json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class Journal:
    """The append-only journal of a run directory (see the module docstring)."""

    def __init__(self, run_dir: Path, *, fsync: bool = False) -> None:
        self.path = run_dir / JOURNAL
        self.fsync = fsync
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write_lines(self, lines: Iterable[str]) -> None:
        """Append lines (each one JSON document without newline) in one write."""
        if self._fd is None:
            raise StateError(self.path, "journal is closed")
        data = ("\n".join(lines) + "\n").encode()
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        if self.fsync:
            os.fsync(self._fd)

    def append(self, record: Mapping[str, Any]) -> None:
        self.write_lines([json.dumps(record, separators=(",", ":"), default=repr)])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@attrs.frozen(kw_only=True)
class StageRecord:
    """A stage's last journal line, as read back (results still encoded)."""

    name: str
    state: StageState
    result: Any
    codec: str | None
    serialized: bool
    error: str | None
    started: float | None
    ended: float | None
    attempts: int


@attrs.frozen(kw_only=True)
class JournalState:
    """What a journal says: the digest, the latest record per stage, the status."""

    run_dir: Path
    digest: str
    attempt: int
    status: RunStatus
    records: Mapping[str, StageRecord]
    started: float | None
    ended: float | None
    #: Stages that wait for a cap now (no record of their end since), by name:
    #: the cap and since when (``{"cap": ..., "time": ...}``).
    waits: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    #: The caps of the latest attempt (``{"running": N|None, "kinds": {...}}``).
    caps: Mapping[str, Any] = attrs.field(factory=dict)


def read_journal(run_dir: str | Path) -> JournalState:
    run_dir = Path(run_dir)
    path = run_dir / JOURNAL
    if not run_dir.is_dir():
        raise StateError(run_dir, "no such run directory")
    if not path.is_file():
        raise StateError(run_dir, f"not a run directory (no {JOURNAL})")
    digest: str | None = None
    attempt = 0
    status = RunStatus.RUNNING
    started = ended = None
    records: dict[str, StageRecord] = {}
    waits: dict[str, dict[str, Any]] = {}
    caps: dict[str, Any] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # torn tail of a crash
            try:
                rec = json.loads(raw)
                kind = rec["type"]
            except (ValueError, KeyError, TypeError) as exc:
                raise StateError(path, f"line {lineno} is not a journal record: {exc}") from exc
            if kind == "run":
                if digest is not None and rec["digest"] != digest:
                    raise StateError(path, f"line {lineno}: digest changed inside one run")
                digest = rec["digest"]
                attempt = rec.get("attempt", attempt + 1)
                status = RunStatus.RUNNING
                caps = rec.get("caps") or {}
                waits.clear()
                if started is None:
                    started = rec.get("time")
                ended = None
            elif kind == "wait":
                if rec.get("cap") is None:
                    waits.pop(rec["name"], None)
                else:
                    waits[rec["name"]] = {"cap": rec["cap"], "time": rec.get("time")}
            elif kind == "stage":
                waits.pop(rec["name"], None)
                records[rec["name"]] = StageRecord(
                    name=rec["name"], state=StageState(rec["state"]),
                    result=rec.get("result"), codec=rec.get("codec"),
                    serialized=bool(rec.get("serialized", False)),
                    error=rec.get("error"), started=rec.get("started"),
                    ended=rec.get("ended"), attempts=rec.get("attempts", 0))
            elif kind == "end":
                status = RunStatus(rec["status"])
                ended = rec.get("time")
                waits.clear()
    if digest is None:
        raise StateError(path, "journal has no run record")
    return JournalState(run_dir=run_dir, digest=digest, attempt=attempt, status=status,
                        records=records, started=started, ended=ended, waits=waits, caps=caps)


def load_run(run_dir: str | Path, graph: Any = None) -> Run:
    """The :class:`Run` a run directory describes.

    With ``graph`` (the same definition), results are decoded with each stage's
    codec and stages never recorded appear as pending; without it, results stay
    as stored.
    """
    js = read_journal(run_dir)
    stages: dict[str, StageOutcome] = {}
    names: Iterable[str] = graph.names if graph is not None else js.records
    for name in names:
        rec = js.records.get(name)
        if rec is None:
            stages[name] = StageOutcome(name=name, state=StageState.PENDING)
            continue
        result = MISSING
        if rec.serialized:
            result = rec.result
            if graph is not None and name in graph:
                result = decode_result(graph[name], rec.result)
        stages[name] = StageOutcome(
            name=name, state=rec.state, result=result, error=rec.error, started=rec.started,
            ended=rec.ended, attempts=rec.attempts, serialized=rec.serialized)
    return Run(run_dir=js.run_dir, digest=js.digest, status=js.status, stages=stages,
               attempt=js.attempt, started=js.started, ended=js.ended)


def decode_result(stage: Any, stored: Any) -> Any:
    from pipeline.errors import SerializationError
    codec = stage.codec
    if codec.decode is None:
        return stored
    try:
        return codec.decode(stored)
    except Exception as exc:
        raise SerializationError(stage.name, f"cannot decode stored result with codec "
                                 f"{codec.name!r}: {exc}") from exc

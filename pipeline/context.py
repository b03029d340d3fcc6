"""The stage contract: what a stage function (and a resource factory) is called with.

::

    async def parse(ctx: StageContext) -> dict[str, str]:
        source = ctx.results["fetch"]          # a dependency's result
        ctx.log("parsing", size=len(source))
        return {"out": str(ctx.scratch / "out")}

Caveats:

- ``ctx.results`` resolves a name inside the stage's prefix first (see
  :meth:`Graph.prefixed <pipeline.definition.Graph.prefixed>`), then as given;
  it holds every stage's result known so far, not only the dependencies'.
- ``ctx.resources`` holds what was acquired for this stage; shared resources
  are also reachable by their name inside the prefix.
- A context is valid while its stage runs; keep values, not the context.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.events import EventKind
from pipeline.state import MISSING, StageOutcome, StageState

if TYPE_CHECKING:
    from pipeline.definition import Stage

__all__ = ["StageContext"]


class _Host(Protocol):
    """What a context reads from the run that made it (:class:`~pipeline.runner.Runner`)."""

    @property
    def run_dir(self) -> Path | None: ...

    def _emit(self, kind: EventKind, stage: str | None, message: str = "",
              data: Any = None) -> None: ...

    def _scratch_for(self, name: str) -> Path: ...

    def _result_of(self, name: str) -> tuple[Any, StageState] | None:
        """A stage's result (or MISSING) and state; None for an unknown stage."""

    def _outcome_of(self, name: str) -> StageOutcome: ...

    def _result_names(self) -> Iterator[str]: ...


class _Scoped(dict[str, Any]):
    """A dict whose keys resolve inside a stage's prefix first."""

    __slots__ = ("prefix", "stage", "what")

    def __init__(self, prefix: str, what: str, stage: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.what = what
        self.stage = stage

    def __missing__(self, key: str) -> Any:
        full = self.prefix + key
        if self.prefix and dict.__contains__(self, full):
            return dict.__getitem__(self, full)
        raise KeyError(f"stage {self.stage!r} has no {self.what} {key!r} "
                       f"(it has: {', '.join(sorted(self)) or 'none'})")

    # in and get() resolve as [] does: a composed graph's stage asks by the
    # name it was defined with.
    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (
            bool(self.prefix) and isinstance(key, str)
            and dict.__contains__(self, self.prefix + key))

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


class _Results(Mapping[str, Any]):
    """``ctx.results``: finished stages' results, names resolved in the stage's prefix."""

    __slots__ = ("_host", "_prefix", "_stage")

    def __init__(self, host: _Host, prefix: str, stage: str) -> None:
        self._host = host
        self._prefix = prefix
        self._stage = stage

    def __getitem__(self, key: str) -> Any:
        found = self._host._result_of(self._prefix + key) if self._prefix else None
        name = self._prefix + key
        if found is None:
            found = self._host._result_of(key)
            name = key
        if found is None:
            raise KeyError(f"stage {self._stage!r} asked for the result of unknown stage {key!r}")
        result, state = found
        if result is MISSING:
            raise KeyError(f"stage {self._stage!r} asked for the result of {name!r}, "
                           f"which has none (state {state.value})")
        return result

    def __iter__(self) -> Iterator[str]:
        return self._host._result_names()

    def __len__(self) -> int:
        return sum(1 for _ in self)


class StageContext:
    """What a stage function gets: results, resources, logging, progress, directories.

    ``attempt`` counts from 1 (retries add to it). Resource factories get the
    context of the stage that acquires them.
    """

    __slots__ = ("_host", "_resources", "_stage", "attempt")

    def __init__(self, host: _Host, stage: Stage) -> None:
        self._host = host
        self._stage = stage
        self._resources: _Scoped | None = None
        self.attempt = 0

    @property
    def resources(self) -> dict[str, Any]:
        """Acquired resources by name (shared ones also by their name inside the prefix)."""
        if self._resources is None:
            self._resources = _Scoped(self._stage.prefix, "resource", self._stage.name)
        return self._resources

    @property
    def name(self) -> str:
        return self._stage.name

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def results(self) -> Mapping[str, Any]:
        """Results of finished stages (the dependencies are always there)."""
        return _Results(self._host, self._stage.prefix, self._stage.name)

    @property
    def outcomes(self) -> dict[str, StageOutcome]:
        """Outcomes of this stage's dependencies, keyed by their full names."""
        return {d: self._host._outcome_of(d) for d in self._stage.deps}

    @property
    def run_dir(self) -> Path | None:
        return self._host.run_dir

    @property
    def scratch(self) -> Path:
        """This stage's own directory (made on first use; a temp dir when not persisting)."""
        return self._host._scratch_for(self._stage.name)

    def log(self, message: str, **data: Any) -> None:
        self._host._emit(EventKind.LOG, self._stage.name, str(message), data or None)

    def progress(self, done: float, total: float | None = None) -> None:
        self._host._emit(EventKind.PROGRESS, self._stage.name, "",
                         {"done": done, "total": total})

"""Errors of the pipeline framework.

::

    PipelineError                   everything below; catch this at a boundary
    ├── GraphError                  a graph definition is refused at construction
    │   ├── CycleError              the dependencies form a cycle (cycle=[names...])
    │   ├── MissingDependencyError  a stage depends on an unknown stage/resource (stage=, missing=)
    │   ├── DuplicateNameError      two stages or resources share a name (name=)
    │   └── DefinitionError         any other bad definition (stage=, field=)
    ├── StageFailed                 a stage raised (stage=, cause in __cause__ and .cause)
    ├── ResourceError               a resource could not be acquired or released (resource=, stage=)
    ├── SerializationError          a stage result cannot be stored or loaded (stage=)
    ├── RunFailed                   a run ended with failed stages (run=, failures=)
    ├── RunCancelled                a run was cancelled (run=, signal=)
    ├── StateError                  a run directory is missing or unreadable (path=)
    └── ResumeMismatch              resume refused: the graph changed since the run (old=, new=)

Every error names what it is about and, where it helps, what to do next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "CycleError",
    "DefinitionError",
    "DuplicateNameError",
    "GraphError",
    "MissingDependencyError",
    "PipelineError",
    "ResourceError",
    "ResumeMismatch",
    "RunCancelled",
    "RunFailed",
    "SerializationError",
    "StageFailed",
    "StateError",
]


class PipelineError(Exception):
    """Root of the pipeline error hierarchy."""


class GraphError(PipelineError, ValueError):
    """A graph definition is refused at construction."""


class CycleError(GraphError):
    """The stage dependencies form a cycle; ``cycle`` lists it in order."""

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = list(cycle)
        path = " -> ".join([*self.cycle, self.cycle[0]]) if self.cycle else "?"
        super().__init__(f"dependency cycle: {path}")


class MissingDependencyError(GraphError):
    """A stage names a dependency (or shared resource) that is not in the graph."""

    def __init__(self, stage: str, missing: str, *, what: str = "stage") -> None:
        self.stage = stage
        self.missing = missing
        self.what = what
        super().__init__(f"stage {stage!r} depends on unknown {what} {missing!r}")


class DuplicateNameError(GraphError):
    """Two stages (or two shared resources) have the same name."""

    def __init__(self, name: str, *, what: str = "stage") -> None:
        self.name = name
        self.what = what
        super().__init__(f"duplicate {what} name {name!r}")


class DefinitionError(GraphError):
    """A stage or resource definition is malformed."""

    def __init__(self, message: str, *, stage: str | None = None,
                 field: str | None = None) -> None:
        self.stage = stage
        self.field = field
        where = ""
        if stage is not None:
            where = f"stage {stage!r}"
            if field is not None:
                where += f", field {field!r}"
            where += ": "
        elif field is not None:
            where = f"field {field!r}: "
        super().__init__(where + message)


class StageFailed(PipelineError):
    """A stage raised; the original exception is ``cause`` (and ``__cause__``)."""

    def __init__(self, stage: str, cause: BaseException, *, attempts: int = 1) -> None:
        self.stage = stage
        self.cause = cause
        self.attempts = attempts
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(
            f"stage {stage!r} failed{tries}: {type(cause).__name__}: {cause}")


class ResourceError(PipelineError):
    """A resource could not be acquired or released."""

    def __init__(self, resource: str, message: str, *, stage: str | None = None) -> None:
        self.resource = resource
        self.stage = stage
        by = f" (for stage {stage!r})" if stage else ""
        super().__init__(f"resource {resource!r}{by}: {message}")


class SerializationError(PipelineError):
    """A stage's result cannot be encoded for the run directory, or decoded from it."""

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(
            f"stage {stage!r}: {message} (declare codec=PICKLE, a custom Codec, or "
            f"codec=NOT_SERIALIZABLE to re-run the stage on resume)")


class RunFailed(PipelineError):
    """A run finished with failed stages; ``run`` is the finished :class:`Run`."""

    def __init__(self, run: Any, failures: Sequence[str]) -> None:
        self.run = run
        self.failures = list(failures)
        first = run.stages[self.failures[0]].error if self.failures else None
        detail = f"; first: {first}" if first else ""
        super().__init__(
            f"run {run.run_dir} failed: {len(self.failures)} stage(s) failed "
            f"({', '.join(self.failures[:5])}{', ...' if len(self.failures) > 5 else ''}){detail}")


class RunCancelled(PipelineError):
    """A run was cancelled (a signal, or its task was cancelled); cleanup has finished."""

    def __init__(self, run: Any, *, signal: str | None = None) -> None:
        self.run = run
        self.signal = signal
        why = f" by {signal}" if signal else ""
        super().__init__(
            f"run {run.run_dir} cancelled{why}; every resource was released; "
            f"resume with the same graph to continue")


class StateError(PipelineError):
    """A run directory is missing, unreadable or not a run directory."""

    def __init__(self, path: Any, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class ResumeMismatch(PipelineError):
    """Resume refused: the graph's definition digest differs from the run's."""

    def __init__(self, run_dir: Any, old: str, new: str, changed: Sequence[str] = ()) -> None:
        self.run_dir = run_dir
        self.old = old
        self.new = new
        self.changed = list(changed)
        what = f" (changed: {', '.join(self.changed[:8])})" if self.changed else ""
        super().__init__(
            f"cannot resume {run_dir}: the graph changed since the run "
            f"(digest {old[:12]} -> {new[:12]}){what}; start a new run instead")

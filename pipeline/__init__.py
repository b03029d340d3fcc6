"""pipeline: declarative stage graphs with resources, caps, cancellation, drawing and resume.

Build a :class:`Graph` of :class:`Stage` values (``async def fn(ctx)``), run it
with :class:`Runner` (or :func:`run_sync` from synchronous code, which also
handles SIGINT/SIGTERM), watch it through subscribers, draw it with
:func:`to_dot`/:func:`to_mermaid`/:func:`render_image`/:func:`to_text`, and
continue a stopped or failed run with :func:`resume`. While a run goes,
:meth:`Runner.why_pending` says what a stage waits for. A graph can be one
stage of another (:func:`as_stage`); :func:`to_timeline` draws a run
as a Gantt chart. ``python -m pipeline`` (``pipeline-run``,
:mod:`pipeline.cli`) runs, resumes, draws and explains anyone's graphs from
the command line.

This package knows nothing of containers or stores; it imports nothing from
``stages``.
"""

from pipeline.active import ActivePlan, PendingReason
from pipeline.caps import CapacityLimiter, Caps, LimiterStatistics
from pipeline.context import StageContext
from pipeline.definition import (
    JSON,
    NOT_SERIALIZABLE,
    PICKLE,
    Codec,
    Graph,
    GraphBuilder,
    Resource,
    Stage,
)
from pipeline.errors import (
    CycleError,
    DefinitionError,
    DuplicateNameError,
    GraphError,
    MissingDependencyError,
    PipelineError,
    ResourceError,
    ResumeMismatch,
    RunCancelled,
    RunFailed,
    SerializationError,
    StageFailed,
    StateError,
)
from pipeline.events import (
    Collector,
    Event,
    EventKind,
    JsonLinesLog,
    JsonProgress,
    PlainProgress,
    RichProgress,
    Subscriber,
)
from pipeline.render import (
    STATE_COLORS,
    render_image,
    to_dot,
    to_mermaid,
    to_text,
    to_timeline,
)
from pipeline.resume import plan_resume, resume
from pipeline.runner import Runner
from pipeline.state import (
    MISSING,
    Run,
    RunStatus,
    StageOutcome,
    StageState,
    load_run,
    new_run_dir,
    new_run_id,
    run_token,
)
from pipeline.subgraph import as_stage
from pipeline.sync import run_sync

__all__ = [
    "JSON",
    "MISSING",
    "NOT_SERIALIZABLE",
    "PICKLE",
    "STATE_COLORS",
    "ActivePlan",
    "CapacityLimiter",
    "Caps",
    "Codec",
    "Collector",
    "CycleError",
    "DefinitionError",
    "DuplicateNameError",
    "Event",
    "EventKind",
    "Graph",
    "GraphBuilder",
    "GraphError",
    "JsonLinesLog",
    "JsonProgress",
    "PlainProgress",
    "LimiterStatistics",
    "MissingDependencyError",
    "PendingReason",
    "PipelineError",
    "Resource",
    "ResourceError",
    "ResumeMismatch",
    "RichProgress",
    "Run",
    "RunCancelled",
    "RunFailed",
    "RunStatus",
    "Runner",
    "SerializationError",
    "Stage",
    "StageContext",
    "StageFailed",
    "StageOutcome",
    "StageState",
    "StateError",
    "Subscriber",
    "as_stage",
    "load_run",
    "new_run_dir",
    "new_run_id",
    "plan_resume",
    "render_image",
    "resume",
    "run_sync",
    "run_token",
    "to_dot",
    "to_mermaid",
    "to_text",
    "to_timeline",
]

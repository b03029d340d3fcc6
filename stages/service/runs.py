"""The service's run records: what a run directory holds besides the pipeline's journal.

::

    runs/<run-id>/builds.json        the builds of the run: key, keep, timeout,
                                     request file, where the request came from
    runs/<run-id>/requests/<i>.binpb each build's BuildRequest
    runs/<run-id>/nix-plan.json      a run of the Nix builder: its plan
                                     (:mod:`stages.nix.build`)

From these a later service (``ocibuild resume``, ``ocibuild shell``)
rebuilds the run's graph (:func:`load_build_specs`). :func:`build_result`
reads the outcome of one build of a finished run.

Build keys name a run's bundles (``bundles/<key>``) and are what a service
instance records as its own (:mod:`stages.service.recovery`). A run's keys
are :func:`build_key` of its id for the service's runs; a caller composing
its own graph of builds (the Nix builder) ends each key with ``-<token>``,
the random part of the run id (:func:`pipeline.run_token`).
:func:`run_keys` reads a run's keys from its directory, :func:`key_of_run`
tells a key named after a run (pruning, :mod:`stages.service.prune`, uses
both).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stages.errors import BuildFailed, ServiceError
from stages.util.dirs import state_dir as _default_state_dir
from stages.util.files import write_atomic

if TYPE_CHECKING:
    from pipeline import Run
    from stages.context import BuildSpec
    from stages.request import Build

__all__ = ["BUILDS_FILE", "build_key", "build_result", "default_state_dir", "full_stage",
           "key_of_run", "list_runs", "load_build_specs", "restart_points", "run_keys",
           "run_runtime", "save_specs", "stage_name", "stop_points"]

BUILDS_FILE = "builds.json"


def default_state_dir() -> Path:
    """``$OCIBUILD_STATE``, else /var/lib/ocibuild for root, else the user's
    state directory (:func:`stages.util.dirs.state_dir`)."""
    explicit = os.environ.get("OCIBUILD_STATE")
    if explicit:
        return Path(explicit).absolute()
    return _default_state_dir()


def build_key(run_dir: Path, i: int, n: int) -> str:
    return run_dir.name if n == 1 else f"{run_dir.name}.{i}"


def key_of_run(run_id: str, key: str) -> bool:
    """Whether build key ``key`` is named as one of run ``run_id``'s.

    The id itself or ``<id>.<i>`` (:func:`build_key`), or ending in
    ``-<token>`` (keys of graphs composed by callers; see the module
    docstring). The last rule may, rarely, match a key of another run
    whose token is the same: use it only where a wrong yes is safe.
    """
    token = run_id.rsplit("-", 1)[-1]
    return key == run_id or key.startswith(run_id + ".") or key.endswith("-" + token)


def run_keys(run_dir: Path, run: Run | None = None) -> set[str]:
    """The build keys a run directory names: its builds.json, and the stage
    names of its journal (``run``, as :func:`pipeline.load_run` reads it):
    ``KEY/STAGE``, or bare names for a run of one build keyed by the run id.

    Unreadable parts name nothing. A run that just started may name no key
    yet (no settled stage, no builds.json): see :func:`key_of_run`.
    """
    keys: set[str] = set()
    try:
        meta = json.loads((run_dir / BUILDS_FILE).read_text())
        keys.update(str(m["key"]) for m in meta)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if run is not None:
        for name in run.stages:
            keys.add(name.split("/", 1)[0] if "/" in name else run_dir.name)
    return keys


def save_specs(run_dir: Path, specs: Sequence[BuildSpec],
               sources: Sequence[str] | None, runtime: str = "runc") -> None:
    """The builds of a run, so that resume and shell can rebuild its graph
    (and run it with the same runtime)."""
    from stages.request import write_request_file

    (run_dir / "requests").mkdir(exist_ok=True)
    meta = []
    for i, spec in enumerate(specs):
        assert spec.request is not None  # the builds of a run are made from requests
        write_request_file(run_dir / "requests" / f"{i}.binpb", spec.request)
        meta.append({"key": spec.key, "keep": spec.keep, "timeout": spec.timeout,
                     "request": f"requests/{i}.binpb",
                     "source": sources[i] if sources else None, "runtime": runtime})
    write_atomic(run_dir / BUILDS_FILE, json.dumps(meta, indent=2) + "\n")


def stage_name(specs: Sequence[BuildSpec], spec: BuildSpec, stage: str) -> str:
    return stage if len(specs) == 1 else f"{spec.key}/{stage}"


def full_stage(specs: Sequence[BuildSpec], stage: str | None) -> str | None:
    """A bare stage name of a multi-build run means the last build's stage.

    For ``from_stage``, which the pipeline takes as one name.
    """
    if stage is None or len(specs) == 1 or "/" in stage:
        return stage
    return f"{specs[-1].key}/{stage}"


def stop_points(specs: Sequence[BuildSpec], stage: str | None) -> str | tuple[str, ...] | None:
    """``stop_after`` of a run: a bare stage name stops every build after that stage."""
    if stage is None or len(specs) == 1 or "/" in stage:
        return stage
    return tuple(f"{spec.key}/{stage}" for spec in specs)


def restart_points(run: Run, names: Sequence[tuple[BuildSpec, str]],
                   bundle_exists: Callable[[BuildSpec], bool]) -> list[str]:
    """Where a resume must start over for builds whose bundle is gone.

    ``names``: each build with the prefix of its stage names ("" for a run
    of one build). A build that made its bundle but did not get through
    ingest, and whose bundle was removed since (torn down after a failure,
    or lost with the runtime tmpfs), re-runs from its spec stage: the run
    and ingest stages need the bundle, and the spec names where it goes
    (the runtime directory is the service instance's own). Validate keeps
    its result.
    """
    points = []
    for spec, prefix in names:
        def state(stage: str, prefix: str = prefix):
            outcome = run.stages.get(prefix + stage)
            return None if outcome is None else outcome.state

        bundled, ingested = state("bundle"), state("ingest")
        if (bundled is not None and bundled.ok and not (ingested is not None and ingested.ok)
                and not bundle_exists(spec)):
            points.append(prefix + "spec")
    return points


def build_result(run: Run, spec: BuildSpec) -> Build:
    """The Build of one finished build of a run; BuildFailed naming the cause otherwise.

    Works for a build alone in its graph (bare stage names) and for one of
    several (names prefixed with its key).
    """
    from pipeline import RunStatus, StageState
    from stages.context import request_from_result
    from stages.ingest import build_from_result

    prefixed = f"{spec.key}/ingest" in run.stages

    def mine(name: str) -> bool:
        return name.startswith(spec.key + "/") if prefixed else "/" not in name

    outcome = run.stages.get(f"{spec.key}/ingest" if prefixed else "ingest")
    if outcome is not None and outcome.state.ok:
        request = spec.request
        if request is None:
            validate = run.stages[f"{spec.key}/validate" if prefixed else "validate"]
            request = request_from_result(validate.result["request"])
        return build_from_result(request, outcome.result)
    first = next((o for n, o in run.stages.items()
                  if o.state is StageState.FAILED and mine(n)), None)
    if first is not None:
        # The stage's exception as the cause (in the process that ran it):
        # a server answers a refused request apart from a failed build.
        raise BuildFailed(spec.key, first.error or "failed", stage=first.name,
                          run_dir=run.run_dir) from first.exception
    if run.status is RunStatus.CANCELLED:
        raise BuildFailed(spec.key, "cancelled", run_dir=run.run_dir)
    raise BuildFailed(spec.key, f"did not reach ingest (run {run.status.value})",
                      run_dir=run.run_dir)


def load_build_specs(run_dir: Path) -> list[BuildSpec]:
    """The builds of a run directory made by OciBuildService."""
    from stages.context import BuildSpec
    from stages.request import read_request_file

    try:
        meta = json.loads((run_dir / BUILDS_FILE).read_text())
    except FileNotFoundError:
        raise ServiceError(str(run_dir), "not a build run directory (no builds.json)") from None
    except ValueError as exc:
        raise ServiceError(str(run_dir), f"builds.json is not valid JSON: {exc}") from exc
    return [BuildSpec(request=read_request_file(run_dir / m["request"]), key=m["key"],
                      keep=m["keep"], timeout=m["timeout"]) for m in meta]


def run_runtime(run_dir: Path) -> str | None:
    """The runtime a run's builds ran with (runc, bwrap), as builds.json
    records it; None when it does not say (older runs: runc)."""
    try:
        meta = json.loads((run_dir / BUILDS_FILE).read_text())
        return str(meta[0]["runtime"]) if meta and "runtime" in meta[0] else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def list_runs(state_dir: Path | None = None) -> list[tuple[Path, Run | None, str]]:
    """Every run directory with its state (None and the reason when unreadable)."""
    from pipeline import load_run

    runs_dir = (state_dir or default_state_dir()) / "runs"
    out: list[tuple[Path, Run | None, str]] = []
    if not runs_dir.is_dir():
        return out
    for d in sorted(runs_dir.iterdir()):
        try:
            out.append((d, load_run(d), ""))
        except Exception as exc:  # noqa: BLE001 - a listing shows what it cannot read
            out.append((d, None, str(exc)))
    return out

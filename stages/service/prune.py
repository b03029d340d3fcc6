"""Pruning run records: which runs go (:func:`select_runs`), and their removal (:func:`prune_runs`).

``ocibuild runs --prune`` calls :func:`prune_runs` once; ``ocibuild serve``
calls it at start and then every :data:`PRUNE_INTERVAL` seconds, in a
worker thread (:func:`prune_periodically`).

A run goes when it is beyond the newest ``keep`` runs, or when it was last
active more than ``older_than`` seconds ago (either rule, or both). A run's
last activity is the later of its directory's and its journal's
modification times: the journal grows whenever a stage settles, state.json
is replaced when the run ends, and a resumed run is active again.

A running run never goes, whatever its age or rank (it still counts among
the newest ``keep``): running means a live service instance (its lock held,
:mod:`stages.service.recovery`) recorded one of its build keys
(:func:`~stages.service.recovery.live_instance_keys`; a run's keys:
:func:`~stages.service.runs.run_keys`, :func:`~stages.service.runs.key_of_run`).
That is checked when the run is chosen, and again just before it is removed.

Removal is crash-safe: the run's bundles still under ``bundles/`` (kept,
paused, or left by a crash), then the run directory, are renamed into
``trash/``, then deleted. A crash in between leaves them in the trash,
which the next service start empties; a prune deletes only what it moved
(a live service's own deletions go on in the trash meanwhile). A bundle
with anything mounted inside is not touched: its run stays, and the error
is reported.

Caveats:

- The keys of a new run are recorded just after its directory is made (no
  await between): a prune with ``keep`` 0 may, in that instant, remove a
  run that is starting (its build then fails, saying its run directory is
  gone). With ``keep`` of 1 or more the newest run is never a candidate.
- Last activity is a modification time: copying a state directory without
  keeping times makes every run new.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from stages.errors import BuildError
from stages.oci.layout import remove_bundle, trash_bundle
from stages.service.runs import key_of_run, run_keys

if TYPE_CHECKING:
    from pipeline import Run

__all__ = ["CLI_KEEP", "PRUNE_INTERVAL", "SERVE_KEEP", "SERVE_OLDER_THAN", "PruneReport",
           "PruneSettings", "PrunedRun", "Selection", "format_duration", "parse_duration",
           "prune_periodically", "prune_runs", "select_runs"]

#: ``ocibuild runs --prune`` keeps this many runs unless told otherwise.
CLI_KEEP = 100
#: ``ocibuild serve`` keeps the newest this many runs...
SERVE_KEEP = 1000
#: ... and none last active longer ago than this (seconds: 7 days).
SERVE_OLDER_THAN = 7 * 86400.0
#: How often ``ocibuild serve`` prunes (seconds), after once at start.
PRUNE_INTERVAL = 3600.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"([0-9]+)([smhd])")
JOURNAL = "journal.jsonl"  # pipeline.state's journal, the one file a run appends to


def parse_duration(text: str) -> float:
    """Seconds of ``45s``, ``90m``, ``12h`` or ``30d``; ValueError naming the forms otherwise."""
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration: use a whole number and a unit, "
                         f"s, m, h or d (45s, 90m, 12h, 30d)")
    return float(int(m[1]) * _UNITS[m[2]])


def format_duration(seconds: float) -> str:
    """A duration in its largest whole unit, rounded down: 7d, 12h, 90m -> 1h, 45s."""
    seconds = max(0, int(seconds))
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit]:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


@attrs.frozen
class PruneSettings:
    """What to keep: the newest ``keep`` runs, and/or none older than ``older_than`` seconds.

    None for both keeps everything.
    """

    keep: int | None = None
    older_than: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.keep is not None and self.keep < 0:
            raise ValueError(f"the number of runs to keep must be 0 or more, not {self.keep}")
        if self.older_than is not None and self.older_than < 0:
            raise ValueError(f"the age of runs to remove must be 0 or more, "
                             f"not {self.older_than}")

    def describe(self) -> str:
        rules = []
        if self.keep is not None:
            rules.append(f"beyond the newest {self.keep}")
        if self.older_than is not None:
            rules.append(f"last active over {format_duration(self.older_than)} ago")
        return " or ".join(rules) or "none (nothing to prune)"


@attrs.frozen
class Selection:
    """Which runs go (oldest first), which are spared because running, and how many stay."""

    remove: list[str]
    spared: list[str]
    kept: int


def select_runs(last_active: Mapping[str, float], settings: PruneSettings, *, now: float,
                is_live: Callable[[str], bool] = lambda _: False) -> Selection:
    """The runs (by id, with their last-activity times) that ``settings`` removes.

    Newest first by time (then id), the first ``settings.keep`` stay; of the
    others, and of any older than ``settings.older_than``, those that
    ``is_live`` are spared (it is asked only about those).
    """
    order = sorted(last_active, key=lambda r: (last_active[r], r), reverse=True)
    remove: list[str] = []
    spared: list[str] = []
    kept = 0
    for rank, run_id in enumerate(order):
        goes = ((settings.keep is not None and rank >= settings.keep)
                or (settings.older_than is not None
                    and now - last_active[run_id] > settings.older_than))
        if not goes:
            kept += 1
        elif is_live(run_id):
            spared.append(run_id)
        else:
            remove.append(run_id)
    return Selection(remove=remove[::-1], spared=spared[::-1], kept=kept)


@attrs.frozen
class PrunedRun:
    """One run removed (or, in a dry run, that would be)."""

    run_id: str
    #: Its status (``finished``, ``failed``, ...; ``running`` for one whose
    #: service died), or ``unreadable``.
    status: str
    last_active: float
    #: The bundles under ``bundles/`` removed with it.
    bundles: tuple[str, ...] = ()


@attrs.define
class PruneReport:
    settings: PruneSettings
    dry_run: bool = False
    removed: list[PrunedRun] = attrs.field(factory=list)
    #: Runs that would go but are running.
    spared: list[str] = attrs.field(factory=list)
    kept: int = 0
    #: One line per run that could not be removed (or not wholly).
    errors: list[str] = attrs.field(factory=list)
    #: Whether ``should_stop`` cut the prune short.
    stopped: bool = False

    @property
    def bundles(self) -> int:
        return sum(len(r.bundles) for r in self.removed)


def _last_active(run_dir: Path) -> float:
    mtime = os.stat(run_dir).st_mtime
    try:
        return max(mtime, os.stat(run_dir / JOURNAL).st_mtime)
    except FileNotFoundError:
        return mtime


def _remove_tree(path: Path) -> None:
    # stages.oci.layout's remover (refusing while anything is mounted
    # inside; not recursing on the tree's depth once it removes iteratively).
    # A trashed run directory has no ``scratch`` link for it to follow.
    remove_bundle(path)


def prune_runs(state_dir: Path, settings: PruneSettings, *, dry_run: bool = False,
               now: float | None = None,
               should_stop: Callable[[], bool] | None = None) -> PruneReport:
    """Remove the runs of ``state_dir`` that ``settings`` does not keep, with their bundles.

    See the module docstring. ``dry_run`` only reports what would go.
    ``should_stop`` is asked before each run (a service shutting down).
    Never raises for one run: its error goes into the report.
    """
    from pipeline import load_run
    from stages.service.recovery import live_instance_keys  # FUSE, runc: when used

    now = time.time() if now is None else now
    report = PruneReport(settings=settings, dry_run=dry_run)
    runs_dir = state_dir / "runs"
    bundles_dir = state_dir / "bundles"
    trash = state_dir / "trash"
    times: dict[str, float] = {}
    if runs_dir.is_dir():
        for entry in os.scandir(runs_dir):
            if entry.is_dir(follow_symlinks=False):
                try:
                    times[entry.name] = _last_active(Path(entry.path))
                except FileNotFoundError:
                    pass  # removed meanwhile
    known: dict[str, tuple[Run | None, set[str]]] = {}

    def read(run_id: str) -> tuple[Run | None, set[str]]:
        if run_id not in known:
            run_dir = runs_dir / run_id
            try:
                run: Run | None = load_run(run_dir)
            except Exception:  # noqa: BLE001 - an unreadable run is pruned like any other
                run = None
            known[run_id] = (run, run_keys(run_dir, run))
        return known[run_id]

    def running(run_id: str, live: set[str]) -> bool:
        keys = read(run_id)[1]
        return any(k in keys or key_of_run(run_id, k) for k in live)

    live = live_instance_keys(state_dir)
    selection = select_runs(times, settings, now=now, is_live=lambda r: running(r, live))
    report.spared.extend(selection.spared)
    report.kept = selection.kept
    if not selection.remove:
        return report
    try:
        bundle_names = sorted(os.listdir(bundles_dir))
    except FileNotFoundError:
        bundle_names = []

    for run_id in selection.remove:
        if should_stop is not None and should_stop():
            report.stopped = True
            break
        run, keys = read(run_id)
        bundles = tuple(b for b in bundle_names
                        if b in keys or b.removesuffix(".shell") in keys
                        or b == run_id or b.startswith(run_id + "."))
        pruned = PrunedRun(run_id=run_id, status=run.status.value if run else "unreadable",
                           last_active=times[run_id], bundles=bundles)
        if dry_run:
            report.removed.append(pruned)
            continue
        if running(run_id, live_instance_keys(state_dir)):  # resumed or started since
            report.spared.append(run_id)
            continue
        moved: list[Path] = []
        try:
            # The bundles first: a crash between leaves a run without its
            # bundles (pruned next time), never a bundle without its run.
            for b in bundles:
                moved += trash_bundle(bundles_dir / b, trash)
            moved += trash_bundle(runs_dir / run_id, trash)
        except (BuildError, OSError) as exc:
            # What was moved goes anyway (it is in the trash); the run stays.
            gone = [b for b in bundles if not (bundles_dir / b).exists()]
            report.errors.append(f"run {run_id}: not removed: {exc}"
                                 + (f" (its bundles {', '.join(gone)} were)" if gone else ""))
        else:
            report.removed.append(pruned)
        for path in moved:
            try:
                _remove_tree(path)
            except (BuildError, OSError) as exc:
                if path.exists():  # else a starting service emptied the trash meanwhile
                    report.errors.append(f"run {run_id}: {path} is left in the trash: {exc}")
    return report


async def prune_periodically(state_dir: Path, settings: PruneSettings, *,
                             interval: float = PRUNE_INTERVAL,
                             on_report: Callable[[PruneReport], None] | None = None,
                             on_error: Callable[[BaseException], None] | None = None) -> None:
    """:func:`prune_runs` now and then every ``interval`` seconds, until cancelled.

    Each prune runs in a worker thread. Cancelled, it asks the prune under
    way to stop after its current run and waits for that, so nothing of it
    runs on once this returns. A prune that fails goes to ``on_error`` and
    the next one runs as planned.
    """
    from stages.util.aio import finish_then_cancel

    while True:
        stop = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(
            prune_runs, state_dir, settings, should_stop=stop.is_set))
        try:
            report = await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            await finish_then_cancel(asyncio.wait({work}))
            raise
        except Exception as exc:  # noqa: BLE001 - reported; the service goes on
            if on_error is not None:
                on_error(exc)
        else:
            if on_report is not None:
                on_report(report)
        await asyncio.sleep(interval)

"""Pruning run records: durations, which runs go, and their removal on real directories.

Runs are real pipeline runs of tiny graphs named like the service's (one
build: bare stage names; several: ``KEY/STAGE``), with builds.json; their
ages are set through the modification times that pruning reads. Live
instances hold their lock (flock) in this process, as a service does.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import threading
import time
from pathlib import Path

import pytest
from run_records import DAY, make_run

from stages.cli import main
from stages.service import prune as prune_module
from stages.service.prune import (
    CLI_KEEP,
    SERVE_KEEP,
    SERVE_OLDER_THAN,
    PruneSettings,
    format_duration,
    parse_duration,
    prune_periodically,
    prune_runs,
    select_runs,
)
from stages.service.recovery import live_instance_keys
from stages.service.runs import key_of_run, run_keys
from stages.teardown import KEPT_MARKER

NOW = 1_800_000_000.0


# --- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("30d", 30 * DAY), ("12h", 12 * 3600), ("90m", 90 * 60), ("45s", 45), ("0s", 0),
    ("007d", 7 * DAY), ("100000h", 100000 * 3600),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", "d", "30", "3x", "1.5h", "-1d", "+1d", " 1d", "1d ", "1 d", "1D", "1dd", "1d2h",
    "1w", "٣d", "1e3s", "inf", "never",
])
def test_anything_else_is_refused_naming_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a duration: .*45s, 90m, 12h, 30d") as info:
        parse_duration(text)
    assert "\n" not in str(info.value)


def test_durations_print_in_their_largest_unit() -> None:
    assert [format_duration(s) for s in (0, 45, 90 * 60, 12 * 3600, 7 * DAY, 36 * 3600)] == \
        ["0s", "45s", "1h", "12h", "7d", "1d"]
    assert format_duration(SERVE_OLDER_THAN) == "7d" and SERVE_KEEP == 1000 and CLI_KEEP == 100


def test_negative_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="0 or more, not -1"):
        PruneSettings(keep=-1)
    with pytest.raises(ValueError, match="0 or more"):
        PruneSettings(older_than=-5.0)


# --- which runs go ------------------------------------------------------------------------


def _ages(**days: float) -> dict[str, float]:
    """Run ids with their last activity, ``days`` before NOW."""
    return {run_id: NOW - d * DAY for run_id, d in days.items()}


def test_keep_the_newest_n() -> None:
    times = _ages(a=5, b=1, c=3, d=2, e=4)
    sel = select_runs(times, PruneSettings(keep=2), now=NOW)
    assert sel.remove == ["a", "e", "c"]  # oldest first
    assert sel.kept == 2 and sel.spared == []


def test_keep_zero_and_keep_more_than_there_are() -> None:
    times = _ages(a=5, b=1)
    assert select_runs(times, PruneSettings(keep=0), now=NOW).remove == ["a", "b"]
    assert select_runs(times, PruneSettings(keep=5), now=NOW).remove == []
    assert select_runs({}, PruneSettings(keep=0), now=NOW).remove == []


def test_older_than_alone() -> None:
    times = _ages(a=8, b=6.9, c=7.01, d=0)
    sel = select_runs(times, PruneSettings(older_than=7 * DAY), now=NOW)
    assert sel.remove == ["a", "c"] and sel.kept == 2


def test_exactly_the_age_stays() -> None:
    times = {"edge": NOW - 7 * DAY}
    assert select_runs(times, PruneSettings(older_than=7 * DAY), now=NOW).remove == []


def test_both_rules_remove_what_either_removes() -> None:
    # The newest three would stay by count, but one of them is too old.
    times = _ages(new=0.5, mid=2, old=9, older=10, oldest=11)
    sel = select_runs(times, PruneSettings(keep=3, older_than=7 * DAY), now=NOW)
    assert sel.remove == ["oldest", "older", "old"] and sel.kept == 2


def test_no_rule_removes_nothing() -> None:
    assert select_runs(_ages(a=1000), PruneSettings(), now=NOW).remove == []


def test_a_live_run_is_spared_and_counts_among_the_kept() -> None:
    times = _ages(live_old=30, a=1, b=2, c=3, live_new=0)
    asked: list[str] = []

    def is_live(run_id: str) -> bool:
        asked.append(run_id)
        return run_id.startswith("live")

    sel = select_runs(times, PruneSettings(keep=2, older_than=7 * DAY), now=NOW,
                      is_live=is_live)
    # live_new and a are the newest two; live_new counts although live.
    assert sel.remove == ["c", "b"]
    assert sel.spared == ["live_old"]
    assert sel.kept == 2
    assert sorted(asked) == ["b", "c", "live_old"]  # only candidates are asked about


def test_ties_in_time_go_by_id() -> None:
    times = dict.fromkeys(["r1", "r3", "r2"], NOW - DAY)
    assert select_runs(times, PruneSettings(keep=1), now=NOW).remove == ["r1", "r2"]


def test_selection_matches_its_definition_on_random_runs() -> None:
    rng = random.Random(13)
    for _ in range(300):
        n = rng.randrange(0, 12)
        times = {f"r{i:02}": NOW - rng.choice([0, 1, 2, 7, 8, 30]) * DAY - rng.random()
                 for i in range(n)}
        live = {r for r in times if rng.random() < 0.2}
        keep = rng.choice([None, 0, 1, 3, 20])
        older = rng.choice([None, 0.0, 7 * DAY])
        sel = select_runs(times, PruneSettings(keep=keep, older_than=older), now=NOW,
                          is_live=live.__contains__)
        newest = sorted(times, key=lambda r: times[r], reverse=True)
        goes = {r for i, r in enumerate(newest)
                if (keep is not None and i >= keep)
                or (older is not None and NOW - times[r] > older)}
        assert set(sel.remove) == goes - live
        assert set(sel.spared) == goes & live
        assert sel.kept == n - len(goes)
        assert sel.remove == sorted(sel.remove, key=lambda r: times[r])


# --- keys of a run, live instances ---------------------------------------------------------


def test_keys_named_after_a_run() -> None:
    run_id = "20261129-230428-3ea2e7"
    assert key_of_run(run_id, run_id)
    assert key_of_run(run_id, run_id + ".2")
    assert key_of_run(run_id, "abcd1234-hello-3ea2e7")  # a Nix build of the run
    assert not key_of_run(run_id, "20261129-230428-3ea2e8")
    assert not key_of_run(run_id, run_id + "x")
    assert not key_of_run(run_id, "abcd1234-hello-3ea2e70")


def test_run_keys_from_builds_json_and_from_the_journal(tmp_path: Path) -> None:
    from pipeline import load_run

    one = make_run(tmp_path)
    assert run_keys(one) == {one.name} == run_keys(one, load_run(one))
    two = make_run(tmp_path, 2, builds_json=False)
    assert run_keys(two) == set()
    assert run_keys(two, load_run(two)) == {f"{two.name}.0", f"{two.name}.1"}
    (tmp_path / "junk").mkdir()
    assert run_keys(tmp_path / "junk") == set()


def make_instance(state: Path, name: str, keys: list[str], *, live: bool) -> int | None:
    """An instance directory; live: the returned fd holds its lock."""
    inst = state / "instances" / name
    (inst / "mnt").mkdir(parents=True)
    (inst / "keys").write_text("".join(k + "\n" for k in keys))
    (inst / "lock").touch()
    if not live:
        return None
    fd = os.open(inst / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_live_instance_keys(tmp_path: Path) -> None:
    assert live_instance_keys(tmp_path) == set()
    fd = make_instance(tmp_path, "1-live", ["a", "b"], live=True)
    make_instance(tmp_path, "2-dead", ["c"], live=False)
    (tmp_path / "instances" / "3-starting").mkdir()  # no lock yet
    (tmp_path / "instances" / "4-new" / "mnt").mkdir(parents=True)
    (tmp_path / "instances" / "4-new" / "lock").touch()
    fd4 = os.open(tmp_path / "instances" / "4-new" / "lock", os.O_RDWR)
    fcntl.flock(fd4, fcntl.LOCK_EX)  # live, no build yet
    try:
        assert live_instance_keys(tmp_path) == {"a", "b"}
        # The test took no lock for good: the dead one is still free.
        probe = os.open(tmp_path / "instances" / "2-dead" / "lock", os.O_RDWR)
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
        assert not (tmp_path / "instances" / "3-starting" / "lock").exists()
    finally:
        assert fd is not None
        os.close(fd)
        os.close(fd4)
    assert live_instance_keys(tmp_path) == set()


# --- removal on real directories -----------------------------------------------------------


def kept_bundle(state: Path, key: str) -> Path:
    bundle = state / "bundles" / key
    (bundle / "rootfs" / "etc").mkdir(parents=True)
    (bundle / "config.json").write_text("{}")
    (bundle / KEPT_MARKER).write_text("failed\n")
    return bundle


def test_prune_removes_old_runs_with_their_bundles_and_spares_live_ones(tmp_path: Path) -> None:
    state = tmp_path
    runs = state / "runs"
    old_failed = make_run(runs, days=10, fail=True)
    old_multi = make_run(runs, 2, days=9)
    old_live = make_run(runs, days=20)
    old_dead = make_run(runs, days=8)
    old_nix_live = make_run(runs, builds_json=False, days=12, label="nix")
    unreadable = runs / "broken"
    unreadable.mkdir()
    age_t = time.time() - 30 * DAY
    os.utime(unreadable, (age_t, age_t))
    recent = make_run(runs, days=1)
    kept_bundle(state, old_failed.name)
    kept_bundle(state, f"{old_multi.name}.1")
    kept_bundle(state, f"{old_multi.name}.1.shell")
    kept_bundle(state, old_live.name)
    kept_bundle(state, recent.name)
    kept_bundle(state, "someone-else")
    token = old_nix_live.name.rsplit("-", 1)[-1]
    fd = make_instance(state, "1-live", [old_live.name, f"abcd1234-hello-{token}"], live=True)
    make_instance(state, "2-dead", [old_dead.name], live=False)
    try:
        settings = PruneSettings(older_than=7 * DAY)
        dry = prune_runs(state, settings, dry_run=True)
        gone = [old_failed.name, old_multi.name, old_dead.name, "broken"]
        assert sorted(r.run_id for r in dry.removed) == sorted(gone)
        assert sorted(dry.spared) == sorted([old_live.name, old_nix_live.name])
        assert len(os.listdir(runs)) == 7 and not (state / "trash").exists()  # nothing moved

        report = prune_runs(state, settings)
    finally:
        assert fd is not None
        os.close(fd)
    by_id = {r.run_id: r for r in report.removed}
    assert sorted(by_id) == sorted(gone)
    assert by_id[old_failed.name].status == "failed"
    assert by_id[old_failed.name].bundles == (old_failed.name,)
    assert by_id[old_multi.name].status == "finished"
    assert by_id[old_multi.name].bundles == (f"{old_multi.name}.1", f"{old_multi.name}.1.shell")
    assert by_id["broken"].status == "unreadable"
    assert report.errors == [] and report.kept == 1 and report.bundles == 3
    assert sorted(os.listdir(runs)) == sorted([old_live.name, old_nix_live.name, recent.name])
    assert sorted(os.listdir(state / "bundles")) == sorted([old_live.name, recent.name,
                                                           "someone-else"])
    assert os.listdir(state / "trash") == []  # moved there, then deleted
    assert (state / "instances" / "2-dead").exists()  # left for the service's recovery

    # The live instance gone, its runs go too.
    again = prune_runs(state, settings)
    assert sorted(r.run_id for r in again.removed) == sorted([old_live.name,
                                                              old_nix_live.name])
    assert os.listdir(runs) == [recent.name]


def test_prune_by_count_on_a_state_dir_without_runs(tmp_path: Path) -> None:
    report = prune_runs(tmp_path, PruneSettings(keep=0))
    assert report.removed == [] and report.kept == 0 and not (tmp_path / "trash").exists()


def test_a_run_that_cannot_be_moved_stays_and_is_reported(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs", days=3)
    (tmp_path / "trash").write_text("not a directory\n")
    report = prune_runs(tmp_path, PruneSettings(keep=0))
    assert report.removed == []
    (line,) = report.errors
    assert line.startswith(f"run {run.name}: not removed: ")
    assert run.exists()


def test_a_run_started_after_the_selection_is_spared(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Liveness is read again just before each removal (a run resumed meanwhile)."""
    import stages.service.recovery as recovery

    run = make_run(tmp_path / "runs", days=3)
    calls = []
    real = recovery.live_instance_keys

    def late(state: Path) -> set[str]:
        calls.append(state)
        return real(state) if len(calls) == 1 else {run.name}

    monkeypatch.setattr(recovery, "live_instance_keys", late)
    report = prune_runs(tmp_path, PruneSettings(keep=0))
    assert report.removed == [] and report.spared == [run.name] and run.exists()


def test_should_stop_cuts_a_prune_short(tmp_path: Path) -> None:
    for d in (5, 4, 3):
        make_run(tmp_path / "runs", days=d)
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 1

    report = prune_runs(tmp_path, PruneSettings(keep=0), should_stop=should_stop)
    assert len(report.removed) == 1 and report.stopped
    assert len(os.listdir(tmp_path / "runs")) == 2


# --- the service's periodic prune ----------------------------------------------------------


async def test_periodic_prune_runs_at_start_and_again(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    await asyncio.to_thread(make_run, runs, days=3)
    reports = []
    task = asyncio.create_task(prune_periodically(tmp_path, PruneSettings(keep=0),
                                                  interval=0.05, on_report=reports.append))
    deadline = time.monotonic() + 10
    while not reports:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert len(reports[0].removed) == 1  # at start
    await asyncio.to_thread(make_run, runs)
    while not any(r.removed for r in reports[1:]):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(runs) == []


async def test_cancelled_periodic_prune_stops_its_thread_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = threading.Event()
    finished = threading.Event()

    def slow_prune(state_dir, settings, *, should_stop):
        started.set()
        deadline = time.monotonic() + 10
        while not should_stop():  # a run at a time, asking in between
            assert time.monotonic() < deadline, "never asked to stop"
            time.sleep(0.01)
        finished.set()
        return prune_module.PruneReport(settings=settings, stopped=True)

    monkeypatch.setattr(prune_module, "prune_runs", slow_prune)
    errors: list[BaseException] = []
    task = asyncio.create_task(prune_periodically(tmp_path, PruneSettings(keep=1),
                                                  on_error=errors.append))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set() and errors == []  # the thread was done when the task was


async def test_a_failing_prune_is_reported_and_the_next_one_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def flaky(state_dir, settings, *, should_stop):
        calls.append(1)
        if len(calls) == 1:
            raise PermissionError("runs/: permission denied")
        return prune_module.PruneReport(settings=settings)

    monkeypatch.setattr(prune_module, "prune_runs", flaky)
    errors: list[BaseException] = []
    reports: list = []
    task = asyncio.create_task(prune_periodically(tmp_path, PruneSettings(keep=1),
                                                  interval=0.01, on_error=errors.append,
                                                  on_report=reports.append))
    deadline = time.monotonic() + 10
    while not reports:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [str(e) for e in errors] == ["runs/: permission denied"]


# --- the options ---------------------------------------------------------------------------


def _one_error_line(capsys: pytest.CaptureFixture, code: int) -> str:
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith("ocibuild: error: ")
    return line


@pytest.mark.parametrize(("argv", "message"), [
    (["--prune", "--older-than", "3x"], "--older-than: '3x' is not a duration"),
    (["--prune", "--older-than", "1.5h"], "use a whole number and a unit, s, m, h or d"),
    (["--prune", "--keep", "-1"], "--keep must be 0 or more, not -1"),
    (["--keep", "3"], "--keep: only with --prune"),
    (["--older-than", "1d", "--dry-run"], "--older-than, --dry-run: only with --prune"),
])
def test_runs_prune_option_errors(argv: list[str], message: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    line = _one_error_line(capsys, main(["runs", "--state-dir", str(tmp_path), *argv]))
    assert message in line


@pytest.mark.parametrize(("argv", "message"), [
    (["--prune-keep", "-2"], "--prune-keep must be 0 or more, not -2"),
    (["--prune-older-than", "7days"], "--prune-older-than: '7days' is not a duration"),
    (["--no-prune", "--prune-keep", "5"], "--no-prune: not with --prune-keep"),
])
def test_serve_prune_option_errors_before_anything_starts(
        argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["serve", "--listen", f"unix://{tmp_path}/s.sock", "--state-dir",
                 str(tmp_path / "state"), *argv])
    assert message in _one_error_line(capsys, code)
    assert not (tmp_path / "state").exists() and not (tmp_path / "s.sock").exists()


def test_serve_prune_settings_from_options() -> None:
    from stages.cli import build_parser
    from stages.cli.serve_cmd import _prune_settings

    def settings(*argv: str):
        return _prune_settings(build_parser().parse_args(["serve", "-l", "[::1]:0", *argv]))

    assert settings() == PruneSettings(keep=1000, older_than=7 * DAY)
    assert settings("--prune-keep", "5") == PruneSettings(keep=5, older_than=7 * DAY)
    assert settings("--prune-older-than", "12h") == PruneSettings(keep=1000,
                                                                  older_than=12 * 3600)
    assert settings("--no-prune") is None

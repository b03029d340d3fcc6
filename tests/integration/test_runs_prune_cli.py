"""``ocibuild runs --prune`` as a user runs it, and ``ocibuild serve`` pruning by itself.

The prune tests need no container: the CLI runs as a subprocess against a
temp state directory whose runs are real pipeline runs of tiny graphs (named
like the service's, with builds.json and kept bundles), aged through their
modification times. The live instance is a real one
(:class:`stages.service.recovery.Instance`) held by this process; the dead
one is an instance whose lock was let go. The serve test starts the real
server (runc, FUSE).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import run_records
from integration_helpers import remove_state_tree
from run_records import age

from stages.request import BuildConstraints, BuildRequest
from stages.service.recovery import Instance
from stages.teardown import KEPT_MARKER

pytestmark = pytest.mark.timeout(120)

OCIBUILD = [sys.executable, "-m", "stages.cli"]
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("BUILD_SERVICE_ADDR", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR",
                        "OCIBUILD_STATE")}
    env["PYTHONPATH"] = str(REPO)
    return env


def ocibuild(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([*OCIBUILD, *args], capture_output=True, text=True, env=_env(),
                          timeout=60)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def make_run(state: Path, n_builds: int = 1, *, days: float = 0.0, fail: bool = False) -> Path:
    """A real run of ``n_builds`` tiny builds in ``state/runs``, last active ``days`` ago."""
    return run_records.make_run(state / "runs", n_builds, days=days, fail=fail)


def kept_bundle(state: Path, key: str) -> Path:
    bundle = state / "bundles" / key
    (bundle / "scratch" / "0" / "deep" / "er").mkdir(parents=True)
    (bundle / "scratch" / "0" / "deep" / "er" / "out").write_text("what the builder left\n")
    (bundle / "config.json").write_text("{}")
    (bundle / KEPT_MARKER).write_text("failed\n")
    return bundle


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OCIBUILD_RUNTIME_DIR", "")  # instances here make nothing on /dev/shm
    path = tmp_path / "state"
    path.mkdir()
    return path


def test_prune_dry_run_then_by_count_then_by_age(state: Path) -> None:
    failed = make_run(state, days=10, fail=True)
    multi = make_run(state, 2, days=9)
    live = make_run(state, days=20)
    dead = make_run(state, days=8)
    day_old = make_run(state, days=1)
    hours_old = make_run(state, days=2 / 24)
    new = make_run(state)
    for key in (failed.name, f"{multi.name}.1", live.name, "another-state-dirs-bundle"):
        kept_bundle(state, key)
    running = Instance.create(state)  # a live service: this process holds its lock
    running.record_key(live.name)
    gone = Instance.create(state)  # a service that died: its lock is free
    gone.record_key(dead.name)
    os.close(gone.lock_fd)
    try:
        everything = sorted(os.listdir(state / "runs"))
        bundles = sorted(os.listdir(state / "bundles"))

        proc = ocibuild("runs", "--state-dir", str(state), "--prune", "--older-than", "7d",
                        "--dry-run")
        lines = proc.stdout.splitlines()
        assert lines[:3] == [
            f"would remove {failed.name}  failed      last active 10d ago  with bundle "
            f"{failed.name}",
            f"would remove {multi.name}  finished    last active 9d ago  with bundle "
            f"{multi.name}.1",
            f"would remove {dead.name}  finished    last active 8d ago",
        ]
        assert lines[3] == f"spared {live.name}  running"
        assert lines[4] == (f"would remove 3 runs and 2 bundles from {state / 'runs'} "
                            f"(last active over 7d ago); kept 3, spared 1 running (dry run)")
        assert len(lines) == 5 and proc.stderr == ""
        assert sorted(os.listdir(state / "runs")) == everything
        assert sorted(os.listdir(state / "bundles")) == bundles

        proc = ocibuild("runs", "--state-dir", str(state), "--prune", "--keep", "2")
        removed = [line.split()[1] for line in proc.stdout.splitlines()
                   if line.startswith("removed ") and " runs and " not in line]
        assert removed == [failed.name, multi.name, dead.name, day_old.name]
        assert f"spared {live.name}  running" in proc.stdout
        assert proc.stdout.splitlines()[-1] == (
            f"removed 4 runs and 2 bundles from {state / 'runs'} (beyond the newest 2); "
            f"kept 2, spared 1 running")
        assert sorted(os.listdir(state / "runs")) == sorted([live.name, hours_old.name,
                                                            new.name])
        assert sorted(os.listdir(state / "bundles")) == sorted([live.name,
                                                               "another-state-dirs-bundle"])
        assert os.listdir(state / "trash") == []
        listing = ocibuild("runs", "--state-dir", str(state)).stdout
        assert [line.split()[0] for line in listing.splitlines()] == sorted(
            [live.name, hours_old.name, new.name])
    finally:
        running.close()

    # Its service gone, the old run goes, with its bundle; the recent ones stay.
    proc = ocibuild("runs", "--state-dir", str(state), "--prune", "--older-than", "12h")
    assert proc.stdout.splitlines() == [
        f"removed {live.name}  finished    last active 20d ago  with bundle {live.name}",
        f"removed 1 run and 1 bundle from {state / 'runs'} (last active over 12h ago); kept 2",
    ]
    assert sorted(os.listdir(state / "runs")) == sorted([hours_old.name, new.name])
    assert os.listdir(state / "bundles") == ["another-state-dirs-bundle"]


def test_prune_keeps_100_by_default(state: Path) -> None:
    first = make_run(state)
    for i in range(101):  # 102 runs, the copies newer than the first
        copy = state / "runs" / f"20260101-000000-{i:06x}"
        shutil.copytree(first, copy)
        age(copy, (101 - i) / 24 / 60)
    age(first, 1)
    proc = ocibuild("runs", "--state-dir", str(state), "--prune")
    assert proc.stdout.splitlines() == [
        f"removed {first.name}  finished    last active 1d ago",
        "removed 20260101-000000-000000  finished    last active 1h ago",
        f"removed 2 runs and 0 bundles from {state / 'runs'} (beyond the newest 100); kept 100",
    ]
    assert len(os.listdir(state / "runs")) == 100


@pytest.mark.parametrize(("argv", "message"), [
    (["--prune", "--older-than", "2w"], "ocibuild: error: --older-than: '2w' is not a "
                                        "duration: use a whole number and a unit, s, m, h or "
                                        "d (45s, 90m, 12h, 30d)"),
    (["--prune", "--keep", "-3"], "ocibuild: error: --keep must be 0 or more, not -3"),
    (["--dry-run"], "ocibuild: error: --dry-run: only with --prune"),
])
def test_bad_prune_options_are_one_line(state: Path, argv: list[str], message: str) -> None:
    run = make_run(state, days=100)
    proc = ocibuild("runs", "--state-dir", str(state), *argv, check=1)
    assert proc.stderr.splitlines() == [message] and proc.stdout == ""
    assert run.exists()


# --- ocibuild serve -----------------------------------------------------------------------


@pytest.fixture
def served_state():
    base = Path(tempfile.mkdtemp(prefix="ocibuild-prune-test-"))
    os.chmod(base, 0o711)
    procs: list[subprocess.Popen] = []
    try:
        yield base, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        remove_state_tree(base)


def _serve(base: Path, procs: list, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    store = f"local://{base}/store"
    proc = subprocess.Popen(
        [*OCIBUILD, "serve", "--listen", f"unix://{base}/s.sock", "--state-dir",
         str(base / "state"), "--blob-service-addr", store, "--directory-service-addr", store,
         "--jobs", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    procs.append(proc)
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    assert box and box[0].startswith("ocibuild: serving on"), (proc.poll(), stderr)
    return proc, stderr


@pytest.mark.runc
@pytest.mark.fuse
def test_serve_prunes_at_start_with_the_farm_defaults(served_state) -> None:
    base, procs = served_state
    state = base / "state"
    old = make_run(state, days=8)
    recent = make_run(state, days=6)
    kept_bundle(state, old.name)

    proc, stderr = _serve(base, procs, "--no-prune")
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert sorted(os.listdir(state / "runs")) == sorted([old.name, recent.name])

    proc, stderr = _serve(base, procs)  # defaults: the newest 1000, none over 7 days old
    deadline = time.monotonic() + 30
    # The report comes once the prune is done (the run directory goes first).
    while not any("pruned" in line for line in stderr):
        assert time.monotonic() < deadline, stderr
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert os.listdir(state / "runs") == [recent.name]
    assert not (state / "bundles" / old.name).exists()
    pruned = [line for line in stderr if "pruned" in line]
    assert pruned == ["ocibuild: pruned 1 run and 1 bundle (beyond the newest 1000 or last "
                      "active over 7d ago); kept 1\n"], stderr
    assert not re.search(r"Traceback|prune failed", "".join(stderr))


# --- a build that is running, a shell open in a kept bundle: both spared -------------------

BB_NAME = "0bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox"
BB = f"/nix/store/{BB_NAME}"
WAIT_FOR_GO = "while [ ! -e /build/go ]; do sleep 0.1; done"


async def _import_busybox(base: Path):
    from stages.castore.addresses import open_castore
    from stages.castore.ingest import ingest_path

    bb = base / "inputs" / BB_NAME
    bb.mkdir(parents=True)
    shutil.copy2("/bin/busybox", bb / "busybox")
    for applet in ("sh", "sleep"):
        (bb / applet).symlink_to("busybox")
    store = f"local://{base}/store"
    castore = open_castore(store, store)
    try:
        return await ingest_path(castore, bb)
    finally:
        await castore.aclose()


@pytest.mark.runc
@pytest.mark.fuse
def test_a_running_build_and_an_open_shell_are_spared(served_state) -> None:
    from stages.request import EnvVar, write_request_file

    base, procs = served_state
    state = base / "state"
    store = f"local://{base}/store"
    bb_node = asyncio.run(_import_busybox(base))
    env = {**_env(), "OCIBUILD_STATE": str(state), "BLOB_SERVICE_ADDR": store,
           "DIRECTORY_SERVICE_ADDR": store, "OCIBUILD_RUNTIME_DIR": ""}

    def request(name: str, script: str) -> Path:
        req = BuildRequest(
            inputs=[bb_node], command_args=[f"{BB}/sh", "-c", script], working_dir="build",
            scratch_paths=["build", "nix/store"], inputs_dir="nix/store",
            outputs=["nix/store/out"], environment_vars=[EnvVar(key="PATH", value=BB.encode())],
            constraints=BuildConstraints(system="x86_64-linux"))
        path = base / f"{name}.json"
        write_request_file(path, req)
        return path

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([*OCIBUILD, *args], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    def prune() -> str:
        proc = subprocess.run([*OCIBUILD, "runs", "--prune", "--keep", "0"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        return proc.stdout

    def live_keys() -> str:
        return "".join(p.read_text() for p in state.glob("instances/*/keys"))

    failed = start("build", "--keep-failed", str(request("failing", "exit 1")))
    assert failed.wait(60) == 1, failed.communicate()
    (kept,) = os.listdir(state / "runs")
    age(state / "runs" / kept, 30)

    shell = start("shell", kept, "--", f"{BB}/sh", "-c", f"{WAIT_FOR_GO}; echo shell-done")
    build = start("build", "--keep", str(request("waiting",
                                                 f"{WAIT_FOR_GO}; echo b > /nix/store/out")))
    deadline = time.monotonic() + 60
    while True:
        running = sorted(set(os.listdir(state / "runs")) - {kept})
        scratch = [state / "bundles" / r / "scratch" / "0" for r in running]
        if kept in live_keys() and running and all(s.is_dir() for s in scratch) \
                and running[0] in live_keys():
            break
        assert time.monotonic() < deadline, (shell.poll(), build.poll())
        assert shell.poll() is None and build.poll() is None
        time.sleep(0.1)
    (building,) = running

    out = prune()
    assert f"spared {kept}  running" in out and f"spared {building}  running" in out
    assert out.splitlines()[-1].startswith("removed 0 runs and 0 bundles")
    assert (state / "runs" / kept).is_dir() and (state / "bundles" / kept).is_dir()
    assert (state / "runs" / building).is_dir()

    for run_id in (kept, building):
        (state / "bundles" / run_id / "scratch" / "0" / "go").touch()
    shell_out, shell_err = shell.communicate(timeout=60)
    assert shell.returncode == 0 and "shell-done" in shell_out, shell_err
    build_out, build_err = build.communicate(timeout=60)
    assert build.returncode == 0, build_err

    # Both ended: nothing keeps them now.
    out = prune()
    assert out.splitlines()[-1].startswith("removed 2 runs and 2 bundles")
    assert os.listdir(state / "runs") == [] and os.listdir(state / "bundles") == []

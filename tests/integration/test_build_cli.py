"""``ocibuild build/runs/resume/shell`` as a user runs them: subprocesses, real runc and FUSE.

The module shares one state directory and local store in a traversable temp
dir; its input (a static busybox with applet links) is imported once. Also
here: a builder process SIGKILLed mid-build, and the next service start
cleaning up after it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from google.protobuf import json_format
from integration_helpers import processes_with, remove_state_tree

from stages.castore.addresses import open_castore
from stages.castore.ingest import ingest_path
from stages.proto import build_pb2
from stages.request import (
    BuildConstraints,
    BuildRequest,
    EnvVar,
    read_request_file,
    request_to_json,
    write_request_file,
)
from stages.service import OciBuildService

pytestmark = [pytest.mark.runc, pytest.mark.fuse, pytest.mark.timeout(120)]

OCIBUILD = [sys.executable, "-m", "stages.cli"]
BB_NAME = "0bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox"
BB = f"/nix/store/{BB_NAME}"
APPLETS = ("sh", "cat", "echo", "id", "pwd", "sleep", "ls")


class Cli:
    def __init__(self, base: Path, bb_node) -> None:
        self.base = base
        self.state = base / "state"
        self.store = f"local://{base}/store"
        self.bb_node = bb_node
        self.n = 0
        # The services' runtime directories (ephemeral bundles), on a tmpfs of
        # this module's own, so that tests can see them all gone.
        self.runtime = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="ocibuild-cli-rt-"))
        os.chmod(self.runtime, 0o711)

    @property
    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("BUILD_SERVICE_ADDR", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR")}
        env.update(OCIBUILD_STATE=str(self.state), BLOB_SERVICE_ADDR=self.store,
                   DIRECTORY_SERVICE_ADDR=self.store, OCIBUILD_RUNTIME_DIR=str(self.runtime),
                   PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        return env

    def run(self, *args: str, check: int | None = 0, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run([*OCIBUILD, *args], capture_output=True, text=True,
                              env=self.environ, cwd=self.base, timeout=90, **kw)
        if check is not None:
            assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
        return proc

    def request(self, script: str, *, outputs=("nix/store/out",), env=()) -> BuildRequest:
        variables = {"HOME": "/homeless-shelter", "PATH": BB, **dict(env)}
        return BuildRequest(
            inputs=[self.bb_node], command_args=[f"{BB}/sh", "-c", script],
            working_dir="build", scratch_paths=["build", "nix/store"], inputs_dir="nix/store",
            outputs=list(outputs),
            environment_vars=[EnvVar(key=k, value=v.encode()) for k, v in sorted(variables.items())],
            constraints=BuildConstraints(system="x86_64-linux"))

    def write(self, req: BuildRequest, suffix: str = ".json") -> Path:
        self.n += 1
        path = self.base / f"req{self.n}{suffix}"
        write_request_file(path, req)
        return path

    def runs(self) -> list[str]:
        return sorted(os.listdir(self.state / "runs")) if (self.state / "runs").exists() else []


async def _import(base: Path, path: Path):
    store = f"local://{base}/store"
    castore = open_castore(store, store)
    try:
        return await ingest_path(castore, path)
    finally:
        await castore.aclose()


@pytest.fixture(scope="module")
def cli():
    base = Path(tempfile.mkdtemp(prefix="ocibuild-cli-test-"))
    os.chmod(base, 0o711)
    try:
        bb = base / "inputs" / BB_NAME
        bb.mkdir(parents=True)
        shutil.copy2("/bin/busybox", bb / "busybox")
        for a in APPLETS:
            (bb / a).symlink_to("busybox")
        c = Cli(base, asyncio.run(_import(base, bb)))
        yield c
    finally:
        remove_state_tree(base)
        if "c" in locals():
            shutil.rmtree(c.runtime, ignore_errors=True)


def _parse_build(line: str) -> build_pb2.Build:
    msg = build_pb2.Build()
    json_format.Parse(line, msg)
    return msg


def _blob(cli: Cli, digest: bytes) -> bytes:
    async def get() -> bytes:
        castore = open_castore(cli.store, cli.store)
        try:
            return await castore.blobs.get(digest)
        finally:
            await castore.aclose()
    return asyncio.run(get())


# --- build, --json, several requests ------------------------------------------------------


def test_build_json_lines_parse_back(cli: Cli) -> None:
    a = cli.write(cli.request("echo a > /nix/store/out"))
    b = cli.write(cli.request("echo b > /nix/store/out"), ".txtpb")
    c = cli.write(cli.request("echo c > /nix/store/out"), ".binpb")
    proc = cli.run("build", "--json", "--jobs", "2", str(a), str(b), str(c))
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    for line, path, want in zip(lines, (a, b, c), (b"a\n", b"b\n", b"c\n")):
        msg = _parse_build(line)
        assert json.loads(request_to_json(read_request_file(path))) == \
            json.loads(json_format.MessageToJson(msg.build_request))
        assert _blob(cli, msg.outputs[0].file.digest) == want
    assert not list((cli.state / "bundles").iterdir())
    # The builds were ephemeral: their bundles were in the runtime directory,
    # which went with the service instance.
    assert list(cli.runtime.joinpath("ocibuild").iterdir()) == []
    assert list(cli.state.joinpath("instances").iterdir()) == []


def test_refused_request_is_one_line(cli: Cli) -> None:
    bad = cli.write(cli.request("true", outputs=("elsewhere/out",)))
    proc = cli.run("build", str(bad), check=1)
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("ocibuild: error:")]
    assert len(err) == 1, proc.stderr
    assert "outputs[0]" in err[0] and "[rule " in err[0] and "validate" in err[0]


def test_failing_build_exits_1_with_the_exit_code_and_log_tail(cli: Cli) -> None:
    req = cli.write(cli.request("echo goodbye-marker >&2; exit 4"))
    proc = cli.run("build", str(req), check=1)
    assert "Traceback" not in proc.stderr
    assert "exit code 4" in proc.stderr and "goodbye-marker" in proc.stderr


# --- stop-after, resume, runs -------------------------------------------------------------


def test_stop_after_bundle_then_resume(cli: Cli) -> None:
    req = cli.write(cli.request("echo resumed > /nix/store/out"))
    before = set(cli.runs())
    proc = cli.run("build", "--stop-after", "bundle", str(req))
    assert "stopped" in proc.stderr
    (run_id,) = set(cli.runs()) - before
    key = run_id
    bundle = cli.state / "bundles" / key
    config = json.loads((bundle / "config.json").read_text())
    assert config["process"]["args"][0] == f"{BB}/sh"
    assert (bundle / "rootfs" / "etc" / "passwd").exists()
    listing = cli.run("runs").stdout
    assert any(line.startswith(run_id) and "stopped" in line for line in listing.splitlines())

    proc = cli.run("resume", run_id, "--json")
    msg = _parse_build(proc.stdout.strip())
    assert _blob(cli, msg.outputs[0].file.digest) == b"resumed\n"
    assert not bundle.exists()
    listing = cli.run("runs").stdout
    assert any(line.startswith(run_id) and "finished" in line for line in listing.splitlines())


def test_resume_refuses_a_changed_graph(cli: Cli) -> None:
    req = cli.write(cli.request("echo one > /nix/store/out"))
    before = set(cli.runs())
    cli.run("build", "--stop-after", "spec", str(req))
    (run_id,) = set(cli.runs()) - before
    # Someone changes the stored request: the graph's digest changes with it.
    write_request_file(cli.state / "runs" / run_id / "requests" / "0.binpb",
                       cli.request("echo two > /nix/store/out"))
    proc = cli.run("resume", run_id, check=1)
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "graph changed" in line and run_id in line


def test_stop_after_unknown_stage(cli: Cli) -> None:
    req = cli.write(cli.request("true"))
    before = cli.runs()
    proc = cli.run("build", "--stop-after", "bundel", str(req), check=1)
    (line,) = proc.stderr.splitlines()
    assert "unknown stage 'bundel'" in line and "validate, spec, bundle" in line
    assert cli.runs() == before


# --- keep-failed and shell ----------------------------------------------------------------


def test_keep_failed_then_shell_in_the_same_sandbox(cli: Cli) -> None:
    script = ("echo state-from-the-build > /build/left-behind; "
              "cat /proc/$$/environ > /build/env0; exit 1")
    req = cli.write(cli.request(script, env=[("MARKER", "kept build")]))
    before = set(cli.runs())
    proc = cli.run("build", "--keep-failed", str(req), check=1)
    assert "exit code 1" in proc.stderr
    (run_id,) = set(cli.runs()) - before
    bundle = cli.state / "bundles" / run_id
    assert (bundle / "config.json").exists() and (bundle / ".ocibuild-kept").exists()
    try:
        shell = cli.run("shell", run_id, "--", f"{BB}/sh", "-c",
                        "cat /build/left-behind; echo $(id -u):$(id -g) $(pwd); "
                        "cat /proc/$$/environ; true")
        out = shell.stdout
        lines = out.split("\n", 2)
        assert lines[0] == "state-from-the-build"
        assert lines[1] == "1000:100 /build"
        build_env0 = (bundle / "scratch").glob("*/env0")
        (env0,) = list(build_env0)
        assert lines[2] == env0.read_text()
        assert "MARKER=kept build" in lines[2]
        # The shell left nothing: no shell bundle, no container.
        assert not Path(f"{bundle}.shell").exists()
        assert f"ocibuild-{run_id}.shell" not in subprocess.run(
            ["runc", "list", "-q"], capture_output=True, text=True).stdout.split()
        assert not list(cli.state.glob("instances/*"))
    finally:
        from stages.oci.layout import remove_bundle

        remove_bundle(bundle)


def test_keep_failed_mend_in_shell_then_resume(cli: Cli) -> None:
    script = ("echo run >> /build/runs; test -e /build/fixed || exit 3; "
              "cat /build/runs /build/fixed > /nix/store/out")
    req = cli.write(cli.request(script))
    before = set(cli.runs())
    cli.run("build", "--keep-failed", str(req), check=1)
    (run_id,) = set(cli.runs()) - before
    bundle = cli.state / "bundles" / run_id
    cli.run("shell", run_id, "--", f"{BB}/sh", "-c", "echo fixed > /build/fixed")
    proc = cli.run("resume", run_id, "--json")
    # The run stage ran again in the kept sandbox; its cleanup ran after it.
    msg = _parse_build(proc.stdout.strip())
    assert _blob(cli, msg.outputs[0].file.digest) == b"run\nrun\nfixed\n"
    assert not bundle.exists()


def test_resume_of_a_failed_run_makes_its_bundle_again(cli: Cli) -> None:
    req = cli.write(cli.request("echo the-builder-ran-again >&2; exit 5"))
    before = set(cli.runs())
    cli.run("build", str(req), check=1)
    (run_id,) = set(cli.runs()) - before
    assert not (cli.state / "bundles" / run_id).exists()
    # Torn down after the failure: resume makes a new bundle, and the builder
    # itself fails again (not runc, for want of a bundle).
    proc = cli.run("resume", run_id, check=1)
    assert "exit code 5" in proc.stderr and "the-builder-ran-again" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (cli.state / "bundles" / run_id).exists()


def test_shell_of_a_run_that_kept_nothing(cli: Cli) -> None:
    req = cli.write(cli.request("echo fine > /nix/store/out"))
    before = set(cli.runs())
    cli.run("build", str(req))
    (run_id,) = set(cli.runs()) - before
    proc = cli.run("shell", run_id, "--", f"{BB}/sh", "-c", "true", check=1)
    (line,) = proc.stderr.splitlines()
    assert "was not kept" in line and "--keep-failed" in line


# --- a builder killed with SIGKILL: its containers die with it; the next start cleans up ---


def test_sigkill_mid_build_kills_its_container_and_next_start_cleans_up(cli: Cli) -> None:
    marker = f"sleep-{os.getpid()}-{time.monotonic_ns()}"
    # (the shell stays: its command line, with the marker, is how the test finds it)
    req = cli.write(cli.request(f"echo {marker}; sleep 3600; true"))
    proc = subprocess.Popen([*OCIBUILD, "build", str(req)], env=cli.environ, cwd=cli.base,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        running = []
        while time.monotonic() < deadline and not running:
            for root in cli.state.glob("instances/*/runc"):
                out = subprocess.run(["runc", "--root", str(root), "list", "--format", "json"],
                                     capture_output=True, text=True).stdout
                running = [c for c in json.loads(out or "null") or []
                           if c["status"] == "running"]
            time.sleep(0.1)
        assert running, "the build never started its container"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = time.monotonic()
    cid = running[0]["id"]
    key = cid.removeprefix("ocibuild-")
    (inst,) = cli.state.glob("instances/*")
    mnt = inst / "mnt"
    # An ephemeral build: its bundle in the instance's runtime directory (a
    # tmpfs), its scratch in the instance's directory.
    runtime = Path(os.readlink(inst / "runtime"))
    assert (runtime / "bundles" / key / "config.json").exists()
    assert (inst / "scratch" / key).is_dir()
    # The instance's supervisor kills the container within 2 s of the owner's death.
    while processes_with(marker) and time.monotonic() < killed + 2:
        time.sleep(0.05)
    assert not processes_with(marker), "the container outlived its owner by 2 s"

    async def restart() -> list[str]:
        store = cli.store
        async with OciBuildService(cli.state, blob_address=store, directory_address=store,
                                   jobs=1) as svc:
            return svc.cleaned

    cleaned = asyncio.run(restart())
    assert f"container {cid}" not in cleaned  # the supervisor deleted it already
    assert f"runtime {runtime}" in cleaned
    assert f"instance {inst.name}" in cleaned
    assert not inst.exists()
    assert not runtime.exists()
    with open("/proc/self/mountinfo") as f:
        assert str(mnt) not in f.read()
    deadline = time.monotonic() + 5
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_with(marker)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_build_cancels_cleanly(cli: Cli, sig: signal.Signals) -> None:
    marker = f"sleep-{os.getpid()}-{time.monotonic_ns()}"
    req = cli.write(cli.request(f"echo {marker}; sleep 3600; true"))
    before = set(cli.runs())
    proc = subprocess.Popen([*OCIBUILD, "build", str(req)], env=cli.environ, cwd=cli.base,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not processes_with(marker):
            time.sleep(0.1)
        assert processes_with(marker), "the build never started its container"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert f"cancelled by {sig.name}" in err and "Traceback" not in err
    (run_id,) = set(cli.runs()) - before
    assert not (cli.state / "bundles" / run_id).exists()
    assert not list(cli.state.glob("instances/*")), "the instance was not closed"
    assert not processes_with(marker)
    with open("/proc/self/mountinfo") as f:
        assert str(cli.state) not in f.read()


def test_stop_after_stops_every_build_of_a_run(cli: Cli) -> None:
    reqs = [cli.write(cli.request(f"echo {w} > /nix/store/out")) for w in ("first", "second")]
    before = set(cli.runs())
    cli.run("build", "--stop-after", "bundle", *map(str, reqs))
    (run_id,) = set(cli.runs()) - before
    keys = [f"{run_id}.0", f"{run_id}.1"]
    for key in keys:
        assert (cli.state / "bundles" / key / "config.json").exists(), key
    proc = cli.run("resume", run_id, "--json")
    outs = [_blob(cli, _parse_build(line).outputs[0].file.digest)
            for line in proc.stdout.splitlines()]
    assert outs == [b"first\n", b"second\n"]
    for key in keys:
        assert not (cli.state / "bundles" / key).exists(), key


def test_progress_json_is_one_object_per_event(cli: Cli) -> None:
    req = cli.write(cli.request("echo first; echo second >&2; echo x > /nix/store/out"))
    proc = cli.run("build", "--progress", "json", str(req))
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    run_id = events[0]["run"]
    assert run_id in cli.runs()
    assert all({"time", "event", "run"} <= e.keys() and e["run"] == run_id for e in events)
    assert events[0]["event"] == "run_started" and events[-1]["event"] == "run_finished"
    logs = [(e["stream"], e["line"]) for e in events if e["event"] == "log" and e["stage"] == "run"]
    # (stdout and stderr are two pipes: their relative order is not kept.)
    assert sorted(logs) == [("stderr", "second"), ("stdout", "first")]
    finished = [e["stage"] for e in events if e["event"] == "stage_finished"]
    assert finished == ["validate", "spec", "bundle", "mount", "run", "ingest", "teardown"]
    ends = [e for e in events if e["event"] == "stage_finished"]
    assert all(e["build"] == run_id and e["state"] == "finished" and e["elapsed"] >= 0
               for e in ends)


def test_progress_plain_and_the_run_log(cli: Cli) -> None:
    req = cli.write(cli.request("echo hello-plain; echo x > /nix/store/out"))
    proc = cli.run("build", "--progress", "plain", str(req))
    assert "run | hello-plain\n" in proc.stderr
    assert "run: finished in " in proc.stderr and "teardown: finished in" in proc.stderr
    # (Run ids of one second sort by their random part: take it from the output.)
    run_id = re.search(r"^run (\S+): started$", proc.stderr, re.M).group(1)
    log = cli.run("log", run_id)
    assert log.stdout == "hello-plain\n"
    bad = cli.run("log", "no-such-run", check=1)
    assert bad.stderr.count("\n") == 1 and "no run 'no-such-run'" in bad.stderr


def test_log_follow_prints_while_the_build_runs(cli: Cli) -> None:
    req = cli.write(cli.request("echo before; sleep 2; echo after; echo x > /nix/store/out"))
    build = subprocess.Popen([*OCIBUILD, "build", "--progress", "plain", str(req)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=cli.environ, cwd=cli.base)
    try:
        deadline = time.monotonic() + 30
        run_id = None
        while "run | before" not in (line := build.stderr.readline()):
            assert line and time.monotonic() < deadline, "the build did not start"
            if started := re.match(r"run (\S+): started$", line.rstrip("\n")):
                run_id = started.group(1)
        assert run_id is not None
        follow = subprocess.Popen([*OCIBUILD, "log", "--follow", run_id], stdout=subprocess.PIPE,
                                  text=True, env=cli.environ, cwd=cli.base)
        assert follow.stdout is not None
        assert follow.stdout.readline() == "before\n"
        assert build.poll() is None, "the build ended before the log showed its first line"
        assert follow.stdout.readline() == "after\n"
        assert follow.wait(30) == 0  # it stops by itself when the run ends
        assert build.wait(30) == 0
    finally:
        build.kill()
        build.wait()

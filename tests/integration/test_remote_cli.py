"""``ocibuild build`` against ``ocibuild serve``: both as subprocesses, real runc and FUSE.

The server has its own store and state; the client has another store, the
only one holding the inputs (a static busybox and a data file), so every
remote build must upload them first. The same request built locally (the
client's store, a local state dir) gives the reference output.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from integration_helpers import remove_state_tree

from stages.castore.addresses import open_castore
from stages.castore.ingest import ingest_path
from stages.request import BuildConstraints, BuildRequest, EnvVar, write_request_file

pytestmark = [pytest.mark.runc, pytest.mark.fuse, pytest.mark.timeout(120)]

OCIBUILD = [sys.executable, "-m", "stages.cli"]
BB_NAME = "0bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox"
DATA_NAME = "1ddddddddddddddddddddddddddddddd-data"
BB = f"/nix/store/{BB_NAME}"


class Setup:
    def __init__(self, base: Path, nodes: list, server: subprocess.Popen, sock: Path) -> None:
        self.base = base
        self.nodes = nodes
        self.server = server
        self.sock = sock
        self.address = f"grpc+unix://{sock}"
        self.client_store = f"local://{base}/client-store"
        self.n = 0

    def environ(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("BUILD_SERVICE_ADDR", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR")}
        env.update(BLOB_SERVICE_ADDR=self.client_store, DIRECTORY_SERVICE_ADDR=self.client_store,
                   OCIBUILD_STATE=str(self.base / "local-state"),
                   PYTHONPATH=str(Path(__file__).resolve().parents[2]), **extra)
        return env

    def build(self, *args: str, remote: bool = True) -> subprocess.CompletedProcess:
        env = self.environ(**({"BUILD_SERVICE_ADDR": self.address} if remote else {}))
        return subprocess.run([*OCIBUILD, "build", *args], capture_output=True, text=True,
                              env=env, cwd=self.base, timeout=90)

    def request(self, script: str) -> Path:
        req = BuildRequest(
            inputs=self.nodes, command_args=[f"{BB}/sh", "-c", script],
            working_dir="build", scratch_paths=["build", "nix/store"], inputs_dir="nix/store",
            outputs=["nix/store/out"], environment_vars=[EnvVar(key="PATH", value=BB.encode())],
            constraints=BuildConstraints(system="x86_64-linux"),
            refscan_needles=[BB_NAME[:32], DATA_NAME[:32]])
        self.n += 1
        path = self.base / f"req{self.n}.json"
        write_request_file(path, req)
        return path

    def server_containers(self) -> list[str]:
        ids = []
        for root in self.base.glob("server-state/instances/*/runc"):
            ids += subprocess.run(["runc", "--root", str(root), "list", "-q"],
                                  capture_output=True, text=True).stdout.split()
        return ids

    def server_leftovers(self) -> list[str]:
        found = [f"container {c}" for c in self.server_containers()]
        for mnt in self.base.glob("server-state/instances/*/mnt"):
            # The content directory is always there; anything else was added.
            found += [f"mount entry {e}" for e in os.listdir(mnt) if e != ".by-digest"]
        bundles = self.base / "server-state" / "bundles"
        found += [f"bundle {b}" for b in os.listdir(bundles)] if bundles.is_dir() else []
        for runtime in self.base.glob("server-state/instances/*/runtime/bundles"):
            found += [f"bundle {b}" for b in os.listdir(runtime)]
        return found


async def _client_inputs(base: Path) -> list:
    bb = base / "inputs" / BB_NAME
    bb.mkdir(parents=True)
    shutil.copy2("/bin/busybox", bb / "busybox")
    for a in ("sh", "cat", "echo", "sleep"):
        (bb / a).symlink_to("busybox")
    data = base / "inputs" / DATA_NAME
    data.mkdir()
    (data / "greeting").write_text(f"hello from the client {time.time_ns()}\n")
    store = f"local://{base}/client-store"
    castore = open_castore(store, store)
    try:
        return [await ingest_path(castore, bb), await ingest_path(castore, data)]
    finally:
        await castore.aclose()


@pytest.fixture(scope="module")
def setup():
    base = Path(tempfile.mkdtemp(prefix="ocibuild-remote-cli-test-"))
    os.chmod(base, 0o711)
    server = None
    try:
        nodes = asyncio.run(_client_inputs(base))
        sock = base / "serve.sock"
        store = f"local://{base}/server-store"
        env = {k: v for k, v in os.environ.items()
               if k not in ("BUILD_SERVICE_ADDR", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR")}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        server = subprocess.Popen(
            [*OCIBUILD, "serve", "--listen", f"unix://{sock}", "--jobs", "2",
             "--state-dir", str(base / "server-state"), "--blob-service-addr", store,
             "--directory-service-addr", store],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(server.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(30)
        assert box and box[0].startswith("ocibuild: serving on"), (box, server.poll())
        yield Setup(base, nodes, server, sock)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(10)
        remove_state_tree(base)


def _digests_of(line: str) -> list[bytes]:
    import base64

    build = json.loads(line)
    return [base64.b64decode(next(iter(o.values()))["digest"]) for o in build["outputs"]]


def test_remote_json_equals_local_json_and_outputs_come_back(setup: Setup) -> None:
    req = setup.request(f"cat /nix/store/{DATA_NAME}/greeting > /nix/store/out; "
                        f"echo {BB} >> /nix/store/out")
    remote = setup.build("--json", str(req))
    assert remote.returncode == 0, remote.stderr
    local = setup.build("--json", str(req), remote=False)
    assert local.returncode == 0, local.stderr
    assert remote.stdout == local.stdout
    assert json.loads(remote.stdout)["outputsNeedles"] == [{"needles": ["0"]}]

    # The output was fetched into the client's store; the inputs went up to the server's.
    async def check() -> None:
        expected = (setup.base / "inputs" / DATA_NAME / "greeting").read_bytes() + \
            f"{BB}\n".encode()
        client = open_castore(setup.client_store, setup.client_store)
        server = open_castore(f"local://{setup.base}/server-store",
                              f"local://{setup.base}/server-store")
        try:
            (digest,) = _digests_of(remote.stdout)
            assert await client.blobs.get(digest) == expected
            for node in setup.nodes:
                assert await server.directories.get(node.digest) is not None
        finally:
            await client.aclose()
            await server.aclose()

    asyncio.run(check())
    assert setup.server_leftovers() == []


def test_build_service_addr_option_and_text_output(setup: Setup) -> None:
    req = setup.request("echo via-option > /nix/store/out")
    env = setup.environ()
    proc = subprocess.run([*OCIBUILD, "build", "--build-service-addr", setup.address, str(req)],
                          capture_output=True, text=True, env=env, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{req}: built (on {setup.address})\n")
    assert "nix/store/out: file " in proc.stdout


def test_failed_and_refused_builds_exit_1_with_one_line(setup: Setup) -> None:
    req = setup.request("echo broken >&2; exit 7")
    proc = setup.build(str(req))
    assert proc.returncode == 1
    assert f"ocibuild: error: {req}: build failed at stage run" in proc.stderr
    assert "exit code 7" in proc.stderr and "broken" in proc.stderr
    for flag in ("--stop-after=run", "--keep-failed", "--keep"):
        proc = setup.build(flag, str(req))
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert f"{flag.split('=')[0]} is not supported for a remote build" in proc.stderr
    proc = setup.build("--build-service-addr", "tcp://x:1", str(req))
    assert proc.returncode == 1 and "expected oci:///abs/state/dir" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_unreachable_server_is_one_clear_line(setup: Setup) -> None:
    req = setup.request("true")
    env = setup.environ(BUILD_SERVICE_ADDR=f"grpc+unix://{setup.base}/nobody.sock")
    proc = subprocess.run([*OCIBUILD, "build", str(req)], capture_output=True, text=True,
                          env=env, timeout=30)
    assert proc.returncode == 1
    assert "no socket at" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_ctrl_c_of_the_client_cancels_the_build_on_the_server(setup: Setup) -> None:
    req = setup.request("sleep 600")
    client = subprocess.Popen([*OCIBUILD, "build", str(req)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=setup.environ(BUILD_SERVICE_ADDR=setup.address))
    try:
        deadline = time.monotonic() + 30
        while not setup.server_containers():
            assert time.monotonic() < deadline and client.poll() is None, client.poll()
            time.sleep(0.05)
        client.send_signal(signal.SIGINT)
        assert client.wait(30) == 130
        deadline = time.monotonic() + 5
        while setup.server_leftovers():
            assert time.monotonic() < deadline, setup.server_leftovers()
            time.sleep(0.05)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)


def test_remote_builder_lines_arrive_while_it_runs(setup: Setup) -> None:
    req = setup.request("echo early-line; sleep 2; echo late-line > /nix/store/out")
    proc = subprocess.Popen([*OCIBUILD, "build", "--progress", "plain", str(req)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=setup.environ(BUILD_SERVICE_ADDR=setup.address), cwd=setup.base)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while "| early-line" not in (line := proc.stderr.readline()):
            assert line and time.monotonic() < deadline, "no builder line came"
        assert proc.poll() is None, "the line came only at the end of the build"
        assert line.endswith("/run | early-line\n")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "run: finished in" in err and str(setup.base) not in err
        assert out.startswith(f"{req}: built (on {setup.address})")
    finally:
        proc.kill()
        proc.wait()

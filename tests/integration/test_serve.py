"""``ocibuild serve`` as a process: ready line, SIGTERM mid-build, sockets, bad addresses.

Each test starts the real command in a subprocess (real runc and FUSE under
it) with its state and store in a traversable temp dir, and talks to it over
gRPC. Whatever a failing test leaves (a server, containers, mounts) is killed,
deleted and unmounted by the fixture.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from integration_helpers import processes_with, remove_state_tree

from stages.castore.addresses import open_castore
from stages.castore.ingest import ingest_path
from stages.errors import ServiceError
from stages.grpc.build_service import GrpcBuildService
from stages.request import BuildConstraints, BuildRequest, EnvVar

pytestmark = [pytest.mark.runc, pytest.mark.fuse, pytest.mark.timeout(120)]

OCIBUILD = [sys.executable, "-m", "stages.cli"]
BB_NAME = "0bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox"
BB = f"/nix/store/{BB_NAME}"


class Server:
    """One `ocibuild serve` subprocess; its stderr is collected for assertions."""

    def __init__(self, base: Path, *listen: str, extra: tuple[str, ...] = ()) -> None:
        self.base = base
        self.store = f"local://{base}/store"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        for k in ("BUILD_SERVICE_ADDR", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR"):
            env.pop(k, None)
        args = [a for item in listen for a in ("--listen", item)]
        self.proc = subprocess.Popen(
            [*OCIBUILD, "serve", *args, "--state-dir", str(base / "state"),
             "--blob-service-addr", self.store, "--directory-service-addr", self.store,
             "--jobs", "2", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.stderr: list[str] = []
        self._err = threading.Thread(target=self._drain_stderr, daemon=True)
        self._err.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def ready_line(self, timeout: float = 30) -> str:
        """The first stdout line (the ready line), or fail with the server's stderr."""
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        assert box and box[0], f"no ready line; rc={self.proc.poll()} {''.join(self.stderr)}"
        return box[0].rstrip("\n")

    def wait(self, timeout: float = 30) -> int:
        rc = self.proc.wait(timeout)
        self._err.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="ocibuild-serve-test-"))
    os.chmod(path, 0o711)
    servers: list[Server] = []
    try:
        yield path, servers
    finally:
        for s in servers:
            s.kill()
        remove_state_tree(path)


def _start(base_and_servers, *listen: str) -> Server:
    base, servers = base_and_servers
    server = Server(base, *listen)
    servers.append(server)
    return server


async def _import_busybox(base: Path):
    bb = base / "inputs" / BB_NAME
    bb.mkdir(parents=True)
    shutil.copy2("/bin/busybox", bb / "busybox")
    for a in ("sh", "sleep", "echo"):
        (bb / a).symlink_to("busybox")
    store = f"local://{base}/store"
    castore = open_castore(store, store)
    try:
        return await ingest_path(castore, bb)
    finally:
        await castore.aclose()


def _request(bb_node, script: str) -> BuildRequest:
    return BuildRequest(
        inputs=[bb_node], command_args=[f"{BB}/sh", "-c", script],
        working_dir="build", scratch_paths=["build", "nix/store"], inputs_dir="nix/store",
        outputs=["nix/store/out"], environment_vars=[EnvVar(key="PATH", value=BB.encode())],
        constraints=BuildConstraints(system="x86_64-linux"))


def _mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(base) in line]


def _containers(base: Path) -> list[str]:
    ids = []
    for root in base.glob("state/instances/*/runc"):
        ids += subprocess.run(["runc", "--root", str(root), "list", "-q"],
                              capture_output=True, text=True).stdout.split()
    return ids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_build_cancels_cleans_and_exits_0(base, sig: signal.Signals) -> None:
    path, _ = base
    bb_node = asyncio.run(_import_busybox(path))
    sock = path / "s.sock"
    server = _start(base, f"unix://{sock}")
    assert server.ready_line() == f"ocibuild: serving on unix://{sock}"
    marker = str(7000 + os.getpid() % 1000)

    async def scenario() -> tuple[BaseException | None, bytes]:
        address = f"grpc+unix://{sock}"
        remote = open_castore(address, address)
        kept = await remote.blobs.put(b"uploaded before the shutdown\n")
        await remote.aclose()
        async with GrpcBuildService(address) as svc:
            task = asyncio.create_task(svc.do_build(_request(bb_node, f"sleep {marker}")))
            deadline = time.monotonic() + 20
            while not (_containers(path) and processes_with(f"sleep {marker}")):
                assert time.monotonic() < deadline, "the builder did not start"
                assert not task.done(), task
                await asyncio.sleep(0.05)
            server.proc.send_signal(sig)
            try:
                await asyncio.wait_for(task, 30)
            except BaseException as exc:  # noqa: BLE001 - the error is what we check
                return exc, kept
            return None, kept

    error, kept = asyncio.run(scenario())
    assert server.wait(30) == 0, "".join(server.stderr)
    assert isinstance(error, ServiceError), error
    assert "shutting down" in str(error)
    assert "shutting down" in "".join(server.stderr)
    # Nothing left: no container (the instance and its runc root are gone), no
    # builder process, no mount, no bundle, no socket.
    assert list((path / "state" / "instances").iterdir()) == []
    assert processes_with(f"sleep {marker}") == []
    assert _mounts_under(path) == []
    assert list((path / "state" / "bundles").iterdir()) == []
    assert not sock.exists()

    # The store is whole: what was uploaded is still there, readable.
    async def read_back() -> bytes:
        store = f"local://{path}/store"
        castore = open_castore(store, store)
        try:
            return await castore.blobs.get(kept)
        finally:
            await castore.aclose()

    assert asyncio.run(read_back()) == b"uploaded before the shutdown\n"


def test_stale_socket_is_replaced_and_a_live_one_refused(base) -> None:
    path, _ = base
    sock = path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))  # bound, never listening, closed: a dead server's file
    stale.close()
    assert sock.exists()
    first = _start(base, f"unix://{sock}", "127.0.0.1:0")
    line = first.ready_line()
    assert line.startswith(f"ocibuild: serving on unix://{sock}, 127.0.0.1:")
    port = int(line.rsplit(":", 1)[1])
    assert port > 0

    second = _start(base, f"unix://{sock}")
    assert second.wait(30) == 1
    err = "".join(second.stderr)
    assert "another server is live on this socket" in err
    assert "Traceback" not in err
    assert sock.exists(), "the refused server removed the live server's socket"

    # The first still answers, over TCP too.
    async def ping() -> None:
        async with GrpcBuildService(f"grpc+http://127.0.0.1:{port}", connect_timeout=5) as svc:
            await svc.wait_ready()

    asyncio.run(ping())
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0, "".join(first.stderr)
    assert not sock.exists()


@pytest.mark.parametrize("listen, message", [
    ("unix://relative.sock", "needs an absolute path"),
    ("localhost", "listen on unix:///abs/path or host:port"),
    ("http://localhost:1", "no other scheme"),
    ("localhost:99999", "is not a number from 0 to 65535"),
    ("unix:///no/such/dir/s.sock", "does not exist"),
], ids=["relative-unix", "no-port", "scheme", "bad-port", "missing-dir"])
def test_bad_listen_addresses_fail_with_one_line(base, listen: str, message: str) -> None:
    server = _start(base, listen)
    assert server.wait(30) == 1
    err = "".join(server.stderr)
    assert message in err
    assert err.startswith("ocibuild: error: ") and err.count("\n") == 1, err


def test_a_file_that_is_not_a_socket_is_not_replaced(base) -> None:
    path, _ = base
    victim = path / "precious"
    victim.write_text("keep me\n")
    server = _start(base, f"unix://{victim}")
    assert server.wait(30) == 1
    assert "is not a socket" in "".join(server.stderr)
    assert victim.read_text() == "keep me\n"


def test_sigkill_of_serve_kills_its_containers_within_2s(base) -> None:
    path, _ = base
    bb_node = asyncio.run(_import_busybox(path))
    sock = path / "s.sock"
    server = _start(base, f"unix://{sock}")
    assert server.ready_line() == f"ocibuild: serving on unix://{sock}"
    marker = str(8000 + os.getpid() % 1000)

    async def scenario() -> float:
        async with GrpcBuildService(f"grpc+unix://{sock}") as svc:
            task = asyncio.create_task(svc.do_build(_request(bb_node, f"sleep {marker}")))
            deadline = time.monotonic() + 20
            while not processes_with(f"sleep {marker}"):
                assert time.monotonic() < deadline, "the builder did not start"
                await asyncio.sleep(0.05)
            server.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(ServiceError):
                await asyncio.wait_for(task, 30)
            return killed

    killed = asyncio.run(scenario())
    while processes_with(f"sleep {marker}") and time.monotonic() < killed + 2:
        time.sleep(0.05)
    assert processes_with(f"sleep {marker}") == [], "a container outlived serve by 2 s"
    assert _containers(path) == []
    # The next server on the state directory removes what is left (once the
    # killed one's janitor is done: it waits for it).
    server.proc.wait(10)
    again = _start(base, f"unix://{path / 's2.sock'}")
    assert again.ready_line().startswith("ocibuild: serving on")
    again.proc.send_signal(signal.SIGTERM)
    assert again.wait(30) == 0
    left = [(p.name, sorted(str(f.relative_to(p)) for f in p.rglob("*")))
            for p in (path / "state" / "instances").iterdir()]
    assert left == []
    assert _mounts_under(path) == []

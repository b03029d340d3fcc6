"""``serve()`` in-process with real runc and FUSE, driven over gRPC.

One server for the module (stages.grpc.serve.serve, jobs=2) on a unix socket in a
traversable temp dir, over a local store holding a static busybox. Clients
are GrpcBuildService (builds) and the gRPC castore client (reading outputs,
remote builds); health and reflection are checked with grpc's own stubs.
After the module, the server is stopped and nothing may remain: no
container, no FUSE mount, no bundle, no socket.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import attrs
import grpc
import pytest
import pytest_asyncio

from stages.castore.addresses import open_castore
from stages.castore.ingest import ingest_path
from stages.castore.nodes import FileNode
from stages.errors import BuildFailed, RequestError
from stages.grpc.build_service import GrpcBuildService
from stages.grpc.serve import serve
from stages.request import BuildConstraints, BuildRequest, EnvVar

pytestmark = [pytest.mark.runc, pytest.mark.fuse,
              pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

BB_NAME = "0bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox"
BB = f"/nix/store/{BB_NAME}"
APPLETS = ("sh", "cat", "echo", "sleep")
SERVICE_NAMES = ("tvix.castore.v1.BlobService", "tvix.castore.v1.DirectoryService",
                 "tvix.build.v1.BuildService")


class Env:
    def __init__(self, base: Path, bb_node, sock: Path) -> None:
        self.base = base
        self.bb_node = bb_node
        self.sock = sock
        self.address = f"grpc+unix://{sock}"
        self.state = base / "state"

    def request(self, script: str, inputs=None) -> BuildRequest:
        return BuildRequest(
            inputs=[self.bb_node] if inputs is None else inputs,
            command_args=[f"{BB}/sh", "-c", script],
            working_dir="build", scratch_paths=["build", "nix/store"], inputs_dir="nix/store",
            outputs=["nix/store/out"],
            environment_vars=[EnvVar(key="PATH", value=BB.encode())],
            constraints=BuildConstraints(system="x86_64-linux"))

    def runc_ids(self) -> list[str]:
        ids = []
        for root in self.state.glob("instances/*/runc"):
            ids += subprocess.run(["runc", "--root", str(root), "list", "-q"],
                                  capture_output=True, text=True).stdout.split()
        return ids

    def leftovers(self) -> list[str]:
        """Containers, build subtrees in the FUSE mount, bundles: what a build leaves."""
        found = [f"container {c}" for c in self.runc_ids()]
        for mnt in self.state.glob("instances/*/mnt"):
            # The content directory is always there; anything else was added.
            found += [f"mount entry {e}" for e in os.listdir(mnt) if e != ".by-digest"]
        bundles = self.state / "bundles"
        if bundles.is_dir():
            found += [f"bundle {b}" for b in os.listdir(bundles)]
        # Ephemeral bundles, on the instances' runtime tmpfs.
        for runtime in self.state.glob("instances/*/runtime/bundles"):
            found += [f"bundle {b}" for b in os.listdir(runtime)]
        return found


def _bb_tree(base: Path) -> Path:
    bb = base / "inputs" / BB_NAME
    bb.mkdir(parents=True)
    shutil.copy2("/bin/busybox", bb / "busybox")
    for a in APPLETS:
        (bb / a).symlink_to("busybox")
    return bb


def _sleeping(marker: str) -> list[str]:
    """Pids of processes whose command line holds ``marker`` (a builder's sleep)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read().replace(b"\0", b" "):
                    found.append(pid)
        except OSError:
            continue
    return found


def _mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(base) in line]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env():
    base = Path(tempfile.mkdtemp(prefix="ocibuild-grpc-build-test-"))
    os.chmod(base, 0o711)
    store = f"local://{base}/store"
    stop = asyncio.Event()
    ready: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    task = None
    try:
        castore = open_castore(store, store)
        try:
            bb_node = await ingest_path(castore, _bb_tree(base))
        finally:
            await castore.aclose()
        sock = base / "ocibuild.sock"
        task = asyncio.create_task(serve(
            [f"unix://{sock}"], state_dir=base / "state", blob_address=store,
            directory_address=store, jobs=2, stop=stop, ready=ready.set_result,
            handle_signals=False))
        done, _ = await asyncio.wait([task, ready], timeout=30,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert ready in done, f"server did not become ready: {task}"
        assert ready.result() == [f"unix://{sock}"]
        yield Env(base, bb_node, sock)
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0
        assert not sock.exists(), "the socket file survived"
        assert list((base / "state" / "instances").iterdir()) == []
        assert _mounts_under(base) == []
    finally:
        if task is not None and not task.done():
            stop.set()
            await asyncio.wait_for(task, 30)
        shutil.rmtree(base, ignore_errors=True)


async def test_health_serves_every_service(env: Env) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"unix://{env.sock}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", *SERVICE_NAMES):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_three_services(env: Env) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    def ask() -> tuple[list[str], list[str]]:
        with grpc.insecure_channel(f"unix://{env.sock}") as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            services = list(db.get_services())
            from google.protobuf.descriptor_pool import DescriptorPool

            pool = DescriptorPool(db)
            methods = [m.name for m in
                       pool.FindServiceByName("tvix.build.v1.BuildService").methods]
            return services, methods

    services, methods = await asyncio.to_thread(ask)
    for name in SERVICE_NAMES:
        assert name in services
    assert methods == ["DoBuild", "DoBuildStream"]


async def test_a_hundred_builds_with_jobs_2(env: Env) -> None:
    async with GrpcBuildService(env.address) as svc:
        builds = await asyncio.gather(*(svc.do_build(env.request(f"echo {i} > /nix/store/out"))
                                        for i in range(100)))
    remote = open_castore(env.address, env.address)
    try:
        for i, build in enumerate(builds):
            (node,) = build.outputs
            assert isinstance(node, FileNode)
            assert await remote.blobs.get(node.digest) == f"{i}\n".encode()
    finally:
        await remote.aclose()
    assert env.leftovers() == []


async def test_refused_and_failed_builds(env: Env) -> None:
    async with GrpcBuildService(env.address) as svc:
        bad = env.request("true")
        with pytest.raises(RequestError) as info:
            await svc.do_build(attrs.evolve(bad, working_dir="../escape"))
        assert info.value.field == "working_dir"
        with pytest.raises(BuildFailed) as failed:
            await svc.do_build(env.request("echo oops >&2; exit 3"))
        assert failed.value.stage == "run"
        assert "exit code 3" in str(failed.value)
        assert "oops" in str(failed.value)
    assert env.leftovers() == []


async def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_cancelled_client_cancels_the_build_and_teardown_runs(env: Env) -> None:
    async with GrpcBuildService(env.address) as svc:
        task = asyncio.create_task(svc.do_build(env.request("sleep 60; echo x > /nix/store/out")))
        await _wait_for(lambda: env.runc_ids(), 20, "the build's container")
        assert any(os.listdir(m) for m in env.state.glob("instances/*/mnt"))
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await _wait_for(lambda: not env.leftovers(), 5, "the teardown (container, mount, bundle)")
    assert time.monotonic() - started < 5


async def test_remote_build_uploads_inputs_and_fetches_outputs(env: Env) -> None:
    import attrs
    import blake3

    from stages.grpc.remote import remote_build

    local = open_castore("memory://", "memory://")  # the client's own store
    remote = open_castore(env.address, env.address)
    svc = GrpcBuildService(env.address)
    try:
        data_dir = env.base / "client-data"
        data_dir.mkdir()
        payload = f"only in the client's store {time.time_ns()}\n".encode()
        (data_dir / "payload").write_bytes(payload)
        data = attrs.evolve(await ingest_path(local, data_dir),
                            name=b"1ddddddddddddddddddddddddddddddd-data")
        assert await ingest_path(local, env.base / "inputs" / BB_NAME) == env.bb_node
        digest = blake3.blake3(payload).digest()
        assert not await remote.blobs.has(digest)
        req = env.request(f"cat /nix/store/{data.name.decode()}/payload > /nix/store/out",
                          inputs=[env.bb_node, data])
        build = await remote_build(req, local=local, remote_build=svc, remote_castore=remote,
                                   fetch_outputs=True)
        (out,) = build.outputs
        assert out.digest == digest
        assert await remote.blobs.has(digest)
        assert await local.blobs.get(out.digest) == payload
    finally:
        await svc.aclose()
        await remote.aclose()
        await local.aclose()
    assert env.leftovers() == []


async def test_requests_refused_after_validation_are_not_internal(env: Env) -> None:
    # Raw gRPC, to see the status codes themselves (GrpcBuildService turns
    # them back into errors): refusals are the request's fault, never INTERNAL.
    from stages.proto import rpc_build_pb2_grpc
    from stages.request import request_to_proto

    missing = FileNode(name=b"missing", digest=bytes(32), size=1)
    d = env.bb_node
    wrong_size = type(d)(name=d.name, digest=d.digest, size=d.size + 1)
    cases = [
        (env.request("true", inputs=[env.bb_node, missing]),
         grpc.StatusCode.FAILED_PRECONDITION, "inputs[1]"),
        (env.request("true", inputs=[wrong_size]), grpc.StatusCode.INVALID_ARGUMENT,
         "inputs[0].size"),
        (attrs.evolve(env.request("true"), environment_vars=[
            EnvVar(key="PATH", value=BB.encode()), EnvVar(key="X", value=b"\xff")]),
         grpc.StatusCode.INVALID_ARGUMENT, "environment_vars[1].value"),
        (attrs.evolve(env.request("true"), constraints=BuildConstraints(
            system="x86_64-linux", available_ro_paths=["/var/lib"])),
         grpc.StatusCode.INVALID_ARGUMENT, "constraints.available_ro_paths[0]"),
    ]
    async with grpc.aio.insecure_channel(f"unix://{env.sock}") as channel:
        stub = rpc_build_pb2_grpc.BuildServiceStub(channel)
        for request, code, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.DoBuild(request_to_proto(request))
            assert info.value.code() is code, (field, info.value.details())
            meta = dict(info.value.trailing_metadata() or ())
            assert meta.get("ocibuild-field") == field
            assert str(env.base) not in (info.value.details() or ""), "a host path leaked"
    assert env.leftovers() == []


# --- DoBuildStream ---------------------------------------------------------------


async def _stream(env: Env, request: BuildRequest) -> list[tuple[float, object]]:
    """Every message of a DoBuildStream call, as events, with when each arrived."""
    from stages.grpc.build_service import event_from_proto
    from stages.proto import rpc_build_pb2_grpc
    from stages.request import request_to_proto

    async with grpc.aio.insecure_channel(f"unix://{env.sock}") as ch:
        stub = rpc_build_pb2_grpc.BuildServiceStub(ch)
        return [(time.monotonic(), event_from_proto(msg))
                async for msg in stub.DoBuildStream(request_to_proto(request), timeout=60)]


async def test_stream_sends_stages_and_lines_as_they_happen(env: Env) -> None:
    from stages.service import events as ev

    got = await _stream(env, env.request(
        "echo one; sleep 1.5; echo two >&2; sleep 0.3; printf 'no newline'; "
        "echo x > /nix/store/out"))
    events = [e for _, e in got]
    assert isinstance(events[0], ev.Started) and events[0].build_id
    assert isinstance(events[-1], ev.Finished)
    assert isinstance(events[-1].build.outputs[0], FileNode)
    logs = [(e.stream, e.data) for e in events if isinstance(e, ev.LogLine)]
    assert logs == [("stdout", b"one\n"), ("stderr", b"two\n"), ("stdout", b"no newline")]
    stages = [(e.name, e.state) for e in events if isinstance(e, ev.StageChanged)]
    names = [n for n, s in stages if s == "finished"]
    assert names == ["validate", "spec", "bundle", "mount", "run", "ingest", "teardown"]
    # Every stage starts before it finishes, the run stage's lines come between.
    run_started = events.index(next(e for e in events if isinstance(e, ev.StageChanged)
                                    and e.name == "run" and e.state == "started"))
    run_finished = events.index(next(e for e in events if isinstance(e, ev.StageChanged)
                                     and e.name == "run" and e.state == "finished"))
    first_line = next(i for i, e in enumerate(events) if isinstance(e, ev.LogLine))
    assert run_started < first_line < run_finished
    assert next(e for e in events if isinstance(e, ev.StageChanged) and e.name == "run"
                and e.state == "finished").elapsed >= 1.5
    # Streamed, not batched: the first line arrived while the builder slept.
    arrived = {id(e): t for t, e in got}
    first = next(e for e in events if isinstance(e, ev.LogLine))
    assert arrived[id(events[-1])] - arrived[id(first)] >= 1.0
    assert env.leftovers() == []


async def test_stream_of_a_failing_build_ends_with_failed(env: Env) -> None:
    from stages.service import events as ev

    events = [e for _, e in await _stream(env, env.request("echo oops >&2; exit 3"))]
    last = events[-1]
    assert isinstance(last, ev.Failed)
    assert last.stage == "run" and last.exit_code == 3 and "oops" in last.message
    assert str(env.state) not in last.message  # the server's paths are not shown
    # The client raises BuildFailed, after passing on what came before.
    seen: list[object] = []
    async with GrpcBuildService(env.address) as svc:
        with pytest.raises(BuildFailed) as info:
            await svc.stream_build(env.request("echo oops >&2; exit 3"), seen.append)
    assert info.value.stage == "run" and "exit code 3" in str(info.value)
    assert any(isinstance(e, ev.LogLine) and e.data == b"oops\n" for e in seen)
    # A request refused before it starts is a status, as for DoBuild.
    async with GrpcBuildService(env.address) as svc:
        with pytest.raises(RequestError) as refused:
            await svc.stream_build(attrs.evolve(env.request("true"), working_dir="../x"),
                                   seen.append)
    assert refused.value.field == "working_dir"
    assert env.leftovers() == []


async def test_closing_the_stream_cancels_the_build(env: Env) -> None:
    from stages.grpc.build_service import event_from_proto
    from stages.proto import rpc_build_pb2_grpc
    from stages.request import request_to_proto
    from stages.service import events as ev

    marker = str(7000 + os.getpid() % 1000)
    async with grpc.aio.insecure_channel(f"unix://{env.sock}") as ch:
        stub = rpc_build_pb2_grpc.BuildServiceStub(ch)
        call = stub.DoBuildStream(request_to_proto(
            env.request(f"echo started; sleep {marker}")))
        async for msg in call:
            event = event_from_proto(msg)
            if isinstance(event, ev.LogLine) and event.data == b"started\n":
                break
        assert _sleeping(f"sleep {marker}"), "the builder is not running"
        call.cancel()
    await _wait_for(lambda: not _sleeping(f"sleep {marker}") and not env.leftovers(), 10,
                    "the cancelled build's container, mounts and bundle to go")

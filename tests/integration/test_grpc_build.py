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
    assert methods == ["DoBuild"]


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

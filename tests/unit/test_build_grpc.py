"""DoBuild over gRPC with fake build services: status codes, translation, cancel, shutdown.

A real grpc.aio server on a unix socket in a temp dir; the build services are
in-process fakes, so no root, runc or FUSE is needed. Raw stubs check the
wire (codes, messages); GrpcBuildService checks the client's translation.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from stages.castore.nodes import FileNode
from stages.errors import BuildFailed, RequestError, ServiceError
from stages.grpc.build_service import BuildServicer, GrpcBuildService, add_build_servicer
from stages.proto import rpc_build_pb2_grpc
from stages.request import Build, BuildConstraints, BuildRequest, OutputNeedles, request_to_proto
from stages.service import BuildService, open_build_service

pytestmark = pytest.mark.timeout(60)

OUT = FileNode(name=b"", digest=bytes(range(32)), size=3, executable=False)


def good_request(script: str = "true") -> BuildRequest:
    return BuildRequest(command_args=["/bin/sh", "-c", script], working_dir="build",
                        scratch_paths=["build", "nix/store"], inputs_dir="nix/store",
                        outputs=["nix/store/out"],
                        constraints=BuildConstraints(system="x86_64-linux"),
                        refscan_needles=["abc"])


class Fake(BuildService):
    """Answers by the script: ok, fail, sleep, crash."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.torn_down = asyncio.Event()

    async def do_build(self, request: BuildRequest) -> Build:
        script = request.command_args[-1]
        if script == "fail":
            raise BuildFailed("k1", "container x: builder failed (exit code 3)", stage="run")
        if script == "crash":
            raise ZeroDivisionError("boom")
        if script == "service":
            raise ServiceError("dummy://", "does not build")
        if script == "sleep":
            self.started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                await asyncio.sleep(0.2)  # a teardown that takes a moment
                self.torn_down.set()
                raise
        return Build(build_request=request, outputs=[OUT],
                     outputs_needles=[OutputNeedles(needles=(0,))])


class Server:
    def __init__(self, path: Path, server: grpc.aio.Server, servicer: BuildServicer,
                 fake: Fake) -> None:
        self.path, self.server, self.servicer, self.fake = path, server, servicer, fake

    @property
    def address(self) -> str:
        return f"grpc+unix://{self.path}"

    def stub(self, channel: grpc.aio.Channel):
        return rpc_build_pb2_grpc.BuildServiceStub(channel)


@pytest.fixture
async def server():
    tmp = Path(tempfile.mkdtemp(prefix="ocibuild-grpc-unit-"))
    path = tmp / "s.sock"
    fake = Fake()
    srv = grpc.aio.server()
    servicer = add_build_servicer(srv, fake)
    srv.add_insecure_port(f"unix://{path}")
    await srv.start()
    try:
        yield Server(path, srv, servicer, fake)
    finally:
        await srv.stop(0)
        path.unlink(missing_ok=True)
        tmp.rmdir()


async def _raw(server: Server, req) -> grpc.aio.AioRpcError | object:
    async with grpc.aio.insecure_channel(f"unix://{server.path}") as ch:
        try:
            return await server.stub(ch).DoBuild(req)
        except grpc.aio.AioRpcError as exc:
            return exc


async def test_ok_round_trips(server: Server) -> None:
    req = good_request()
    async with GrpcBuildService(server.address) as svc:
        build = await svc.do_build(req)
    assert build == Build(build_request=req, outputs=[OUT],
                          outputs_needles=[OutputNeedles(needles=(0,))])


async def test_refused_request_is_invalid_argument_naming_field_and_rule(server: Server) -> None:
    bad = request_to_proto(good_request())
    bad.outputs[:] = ["/abs/out"]
    exc = await _raw(server, bad)
    assert isinstance(exc, grpc.aio.AioRpcError)
    assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "outputs[0]" in exc.details()
    assert "[rule " in exc.details()
    async with GrpcBuildService(server.address) as svc:
        with pytest.raises(RequestError) as info:
            req = good_request()
            await svc.do_build(BuildRequest(**{**_fields(req), "outputs": ("/abs/out",)}))
    assert info.value.field == "outputs[0]"
    assert info.value.rule == exc.details().rsplit("[rule ", 1)[1].rstrip("]")
    assert server.address in str(info.value)


def _fields(req: BuildRequest) -> dict:
    import attrs

    return attrs.asdict(req, recurse=False)


async def test_bad_input_node_is_invalid_argument(server: Server) -> None:
    bad = request_to_proto(good_request())
    node = bad.inputs.add()
    node.file.name = b"x"
    node.file.digest = b"short"
    exc = await _raw(server, bad)
    assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0]" in exc.details()


async def test_failed_build_is_internal_and_comes_back_as_build_failed(server: Server) -> None:
    exc = await _raw(server, request_to_proto(good_request("fail")))
    assert exc.code() is grpc.StatusCode.INTERNAL
    assert "exit code 3" in exc.details()
    async with GrpcBuildService(server.address) as svc:
        with pytest.raises(BuildFailed) as info:
            await svc.do_build(good_request("fail"))
    assert info.value.stage == "run"
    assert info.value.key == "k1"
    assert "exit code 3" in str(info.value)


@pytest.mark.parametrize("script", ["crash", "service"])
async def test_other_failures_are_internal_service_errors(server: Server, script: str) -> None:
    exc = await _raw(server, request_to_proto(good_request(script)))
    assert exc.code() is grpc.StatusCode.INTERNAL
    async with GrpcBuildService(server.address) as svc:
        with pytest.raises(ServiceError, match="INTERNAL"):
            await svc.do_build(good_request(script))


async def test_cancelled_client_cancels_the_server_build(server: Server) -> None:
    async with GrpcBuildService(server.address) as svc:
        task = asyncio.create_task(svc.do_build(good_request("sleep")))
        await asyncio.wait_for(server.fake.started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.wait_for(server.fake.torn_down.wait(), 5)
    assert server.servicer.running == 0


async def test_shutdown_cancels_builds_and_answers_unavailable(server: Server) -> None:
    async with GrpcBuildService(server.address) as svc:
        task = asyncio.create_task(svc.do_build(good_request("sleep")))
        await asyncio.wait_for(server.fake.started.wait(), 10)
        await server.servicer.shutdown()
        assert server.fake.torn_down.is_set()
        with pytest.raises(ServiceError, match="shutting down"):
            await task
        with pytest.raises(ServiceError, match="shutting down"):
            await svc.do_build(good_request())


async def test_deadline_cancels_the_build(server: Server) -> None:
    async with GrpcBuildService(server.address, deadline=0.5) as svc:
        with pytest.raises(BuildFailed, match="deadline of 0.5 s"):
            await svc.do_build(good_request("sleep"))
    await asyncio.wait_for(server.fake.torn_down.wait(), 5)


async def test_missing_socket_fails_at_once(tmp_path: Path) -> None:
    start = time.monotonic()
    async with GrpcBuildService(f"grpc+unix://{tmp_path}/nobody.sock") as svc:
        with pytest.raises(ServiceError, match="no socket at .*nobody.sock"):
            await svc.do_build(good_request())
    assert time.monotonic() - start < 2


async def test_dead_socket_fails_after_the_connect_timeout(tmp_path: Path) -> None:
    import socket

    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))  # bound, not listening: connections are refused
    try:
        start = time.monotonic()
        async with GrpcBuildService(f"grpc+unix://{tmp_path}/dead.sock",
                                    connect_timeout=1.0) as svc:
            with pytest.raises(ServiceError, match="cannot connect within 1 s"):
                await svc.do_build(good_request())
        assert 0.9 < time.monotonic() - start < 5
    finally:
        dead.close()


@pytest.mark.parametrize("address", ["grpc+unix://relative/path", "grpc+http://", "grpc+ftp://x"])
async def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(ServiceError):
        svc = open_build_service(address)
        try:
            await svc.do_build(good_request())
        finally:
            await svc.aclose()


def test_open_build_service_dispatches_grpc() -> None:
    svc = open_build_service("grpc+unix:///run/x.sock")
    assert isinstance(svc, GrpcBuildService)
    assert svc.address == "grpc+unix:///run/x.sock"

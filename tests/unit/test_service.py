"""The build service without containers: addresses, arguments, run records, crash cleanup.

Real builds are in tests/integration/test_build.py; here only what needs no
root, runc or FUSE.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from stages.context import BuildSpec
from stages.errors import BuildFailed, ServiceError
from stages.request import BuildConstraints, BuildRequest, EnvVar
from stages.service import (
    DummyBuildService,
    OciBuildService,
    build_result,
    cleanup_dead_instances,
    default_state_dir,
    list_runs,
    load_build_specs,
    open_build_service,
)
from stages.teardown import KEPT_MARKER


def _request(script: str = "true") -> BuildRequest:
    return BuildRequest(command_args=["/bin/sh", "-c", script], working_dir="build",
                        scratch_paths=["build"], inputs_dir="nix/store", outputs=["build/out"],
                        environment_vars=[EnvVar(key="PATH", value=b"/bin")],
                        constraints=BuildConstraints(system="x86_64-linux", provide_bin_sh=True))


# --- addresses ----------------------------------------------------------------------------


async def test_dummy_refuses_every_build() -> None:
    svc = open_build_service("dummy://")
    assert isinstance(svc, DummyBuildService)
    async with svc:
        with pytest.raises(ServiceError, match="dummy build service does not build"):
            await svc.do_build(_request())


@pytest.mark.parametrize("address", ["oci://relative/dir", "oci:relative", "oci://", "oci:"],
                         ids=["netloc", "relative", "empty-netloc", "empty"])
def test_oci_needs_an_absolute_path(address: str) -> None:
    with pytest.raises(ServiceError, match="absolute path") as info:
        open_build_service(address)
    assert info.value.address == address


def test_oci_absolute_path_is_the_state_dir() -> None:
    svc = open_build_service("oci:///srv/ocibuild-state", jobs=3)
    assert isinstance(svc, OciBuildService)
    assert svc.state_dir == Path("/srv/ocibuild-state")
    assert svc.jobs == 3


@pytest.mark.parametrize("address", ["grpc+nope://x", "http://host", "bogus"])
def test_unknown_scheme_names_the_known_ones(address: str) -> None:
    with pytest.raises(ServiceError, match=r"dummy://, oci:///abs/path"):
        open_build_service(address)


def test_build_service_addr_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUILD_SERVICE_ADDR", "dummy://")
    assert isinstance(open_build_service(), DummyBuildService)
    monkeypatch.setenv("BUILD_SERVICE_ADDR", "oci:///from/the/env")
    svc = open_build_service()
    assert isinstance(svc, OciBuildService) and svc.state_dir == Path("/from/the/env")
    # An explicit address wins over the environment.
    assert isinstance(open_build_service("dummy://"), DummyBuildService)


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BUILD_SERVICE_ADDR", raising=False)
    monkeypatch.setenv("OCIBUILD_STATE", str(tmp_path / "st"))
    assert default_state_dir() == tmp_path / "st"
    svc = open_build_service()
    assert isinstance(svc, OciBuildService) and svc.state_dir == tmp_path / "st"


# --- arguments and lifetime -----------------------------------------------------------------


@pytest.mark.parametrize("jobs", [0, -1])
def test_jobs_below_one_refused(jobs: int, tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match=f"jobs must be >= 1, not {jobs}"):
        OciBuildService(tmp_path, jobs=jobs)


def test_jobs_default_is_the_number_of_cores(tmp_path: Path) -> None:
    assert OciBuildService(tmp_path).jobs == (os.cpu_count() or 1)


async def test_not_started_service_says_so(tmp_path: Path) -> None:
    svc = OciBuildService(tmp_path)
    with pytest.raises(ServiceError, match="not started; use it with 'async with'"):
        await svc.do_build(_request())
    with pytest.raises(ServiceError, match="not started"):
        await svc.resume_run(tmp_path)


async def test_untraversable_state_dir_refused_before_anything(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    svc = OciBuildService(tmp_path / "state")
    with pytest.raises(ServiceError, match="not searchable by others"):
        await svc.__aenter__()
    assert not (tmp_path / "state" / "instances").exists()


# --- run records --------------------------------------------------------------------------


def test_load_build_specs_errors(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="not a build run directory"):
        load_build_specs(tmp_path)
    (tmp_path / "builds.json").write_text("{not json")
    with pytest.raises(ServiceError, match="builds.json is not valid JSON"):
        load_build_specs(tmp_path)


def test_saved_specs_load_back(tmp_path: Path) -> None:
    from stages.service.runs import save_specs as _save_specs

    specs = [BuildSpec(request=_request("a"), key="k.0", keep="failed", timeout=2.5),
             BuildSpec(request=_request("b"), key="k.1")]
    _save_specs(tmp_path, specs, ["a.json", "b.json"])
    assert load_build_specs(tmp_path) == specs
    assert [m["source"] for m in json.loads((tmp_path / "builds.json").read_text())] == \
        ["a.json", "b.json"]


def test_list_runs_shows_unreadable_ones(tmp_path: Path) -> None:
    assert list_runs(tmp_path) == []
    (tmp_path / "runs" / "broken").mkdir(parents=True)
    ((path, run, problem),) = list_runs(tmp_path)
    assert path.name == "broken" and run is None and problem


def _run_of(tmp_path: Path, fn_by_stage: dict, specs: list[BuildSpec]):
    """A real pipeline run of the build graphs with stand-in stage functions."""
    import asyncio

    from pipeline import Graph, Runner, Stage
    from stages.graph import STAGE_NAMES

    graphs = []
    for spec in specs:
        stages, prev = [], None
        for name in STAGE_NAMES:
            async def fn(ctx, name=name):
                return await fn_by_stage.get(name, _ok)(ctx)
            stages.append(Stage(name=name, fn=fn, deps=[prev] if prev else [],
                                always=name == "teardown"))
            prev = name
        g = Graph(stages=stages)
        graphs.append(g if len(specs) == 1 else g.prefixed(spec.key))
    graph = graphs[0] if len(graphs) == 1 else Graph.compose(*graphs)
    return asyncio.run(Runner(graph, run_dir=tmp_path / "run").run())


async def _ok(ctx):
    if ctx.name.endswith("ingest"):
        return {"outputs": [{"file": {"digest": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                                      "size": "3"}}], "needles": [[0]]}
    return {}


def test_build_result_of_a_finished_build(tmp_path: Path) -> None:
    spec = BuildSpec(request=_request(), key="one")
    run = _run_of(tmp_path, {}, [spec])
    build = build_result(run, spec)
    assert build.build_request == spec.request
    assert build.outputs[0].size == 3 and build.outputs[0].digest == bytes(32)
    assert [list(n.needles) for n in build.outputs_needles] == [[0]]


def test_build_result_names_the_failed_stage_of_each_build(tmp_path: Path) -> None:
    async def boom(ctx):
        if ctx.name.startswith("b/"):
            raise RuntimeError("mount went wrong")
        return await _ok(ctx)

    specs = [BuildSpec(request=_request(), key="a"), BuildSpec(request=_request(), key="b")]
    run = _run_of(tmp_path, {"mount": boom}, specs)
    assert build_result(run, specs[0]).outputs
    with pytest.raises(BuildFailed, match="at stage b/mount.*mount went wrong") as info:
        build_result(run, specs[1])
    assert info.value.key == "b" and info.value.stage == "b/mount"


# --- crash cleanup ------------------------------------------------------------------------


async def test_cleanup_takes_dead_instances_and_spares_live_ones(tmp_path: Path) -> None:
    state = tmp_path
    (state / "bundles").mkdir()
    for key in ("dead-key", "kept-key", "live-key"):
        (state / "bundles" / key / "rootfs").mkdir(parents=True)
    (state / "bundles" / "kept-key" / KEPT_MARKER).write_text("failed\n")
    dead = state / "instances" / "111-dead"
    live = state / "instances" / "222-live"
    for inst, keys in ((dead, ["dead-key", "kept-key", "gone-key"]), (live, ["live-key"])):
        (inst / "mnt").mkdir(parents=True)
        (inst / "keys").write_text("".join(k + "\n" for k in keys))
        (inst / "lock").touch()
    fd = os.open(live / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live instance holds its lock
        removed = await cleanup_dead_instances(state)
    finally:
        os.close(fd)
    assert removed == [f"bundle {state / 'bundles' / 'dead-key'}", "instance 111-dead"]
    assert not dead.exists() and live.exists()
    assert sorted(os.listdir(state / "bundles")) == ["kept-key", "live-key"]


async def test_cleanup_of_a_state_dir_without_instances(tmp_path: Path) -> None:
    assert await cleanup_dead_instances(tmp_path) == []


def test_stop_points_of_several_builds() -> None:
    from stages.service.runs import full_stage as _full_stage
    from stages.service.runs import stop_points as _stop_points

    one = [BuildSpec(request=_request(), key="r")]
    two = [BuildSpec(request=_request(), key="r.0"), BuildSpec(request=_request(), key="r.1")]
    assert _stop_points(one, "bundle") == "bundle"
    assert _stop_points(two, "bundle") == ("r.0/bundle", "r.1/bundle")
    assert _stop_points(two, "r.0/run") == "r.0/run"
    assert _stop_points(two, None) is None
    assert _full_stage(two, "run") == "r.1/run"  # from_stage: the pipeline takes one name

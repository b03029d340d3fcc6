"""make_spec: the OCI config.json, checked against the schema and the sandbox rules."""

from __future__ import annotations

import copy

import attrs
import pytest
from hypothesis import given, settings
from strategies import valid_requests

from stages.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from stages.errors import SpecError
from stages.oci.idmap import IdMap
from stages.oci.schema import validate_config
from stages.request import BuildConstraints, BuildRequest, EnvVar
from stages.spec import SpecOptions, make_spec, mount_points

D = b"\x02" * 32
IDMAP = IdMap.single(200000, 300000)


def opts_for(req: BuildRequest, **kw) -> SpecOptions:
    return SpecOptions(
        idmap=IDMAP, rootfs="/b/rootfs",
        scratch_dirs={s: f"/b/scratch/{i}" for i, s in enumerate(req.scratch_paths)},
        input_paths={n.name: f"/fuse/{n.name.decode()}" for n in req.inputs
                     if not isinstance(n, SymlinkNode)},
        **kw)


def nix_like(**changes) -> BuildRequest:
    req = BuildRequest(
        inputs=[DirectoryNode(name=b"aaa-dep", digest=D, size=0),
                FileNode(name=b"bbb-src.sh", digest=D, size=1),
                SymlinkNode(name=b"ccc-link", target=b"aaa-dep")],
        command_args=["/nix/store/aaa-dep/bin/sh", "-e", "/nix/store/bbb-src.sh"],
        working_dir="build",
        scratch_paths=["build", "nix/store"],
        inputs_dir="nix/store",
        outputs=["nix/store/zzz-out"],
        environment_vars=[EnvVar(key="A", value=b"1"), EnvVar(key="B", value="é=ü".encode())],
        constraints=BuildConstraints(system="x86_64-linux", available_ro_paths=["/opt/x"],
                                     provide_bin_sh=True),
    )
    return attrs.evolve(req, **changes)


def spec_of(req: BuildRequest, **kw) -> dict:
    return make_spec(req, opts_for(req, **kw))


def destinations(spec: dict) -> list[str]:
    return [m["destination"] for m in spec["mounts"]]


@settings(max_examples=150, deadline=None)
@given(valid_requests())
def test_every_generated_spec_matches_the_oci_schema(req: BuildRequest) -> None:
    spec = spec_of(req)
    validate_config(spec)
    # parents are mounted before children
    dests = destinations(spec)
    for i, d in enumerate(dests):
        for j, e in enumerate(dests):
            if d != e and d.startswith(e.rstrip("/") + "/"):
                assert j < i, f"{e} must be mounted before {d}"
    # every mount below / has a mount point the bundle creates
    points = {"/" + p for p, _ in mount_points(req)}
    for d in dests:
        if d.count("/") == 1 or d.startswith(("/dev/", "/sys/", "/proc/")):
            continue
        assert d in points


BROKEN = [
    ("uid-string", lambda s: s["process"]["user"].__setitem__("uid", "1000")),
    ("no-version", lambda s: s.pop("ociVersion")),
    ("mount-dest-int", lambda s: s["mounts"][0].__setitem__("destination", 1)),
    ("namespace-bogus", lambda s: s["linux"]["namespaces"].append({"type": "bogus"})),
    ("rlimit-no-hard", lambda s: s["process"]["rlimits"][0].pop("hard")),
    ("env-not-list", lambda s: s["process"].__setitem__("env", "A=1")),
]


@pytest.mark.parametrize("breaker", [b[1] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_schema_rejects_broken_specs(breaker) -> None:
    spec = spec_of(nix_like())
    validate_config(spec)
    broken = copy.deepcopy(spec)
    breaker(broken)
    with pytest.raises(SpecError, match="oci-schema"):
        validate_config(broken)


def test_process_is_nix_like() -> None:
    req = nix_like()
    p = spec_of(req)["process"]
    assert p["user"] == {"uid": 1000, "gid": 100}
    assert p["args"] == list(req.command_args)
    assert p["env"] == ["A=1", "B=é=ü"]
    assert p["cwd"] == "/build"
    assert p["terminal"] is False
    assert p["noNewPrivileges"] is True
    assert all(v == [] for v in p["capabilities"].values())
    # Every rlimit, as this process has it (as Nix's builder gets nix's own).
    import resource

    limits = {r["type"]: (r["soft"], r["hard"]) for r in p["rlimits"]}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert limits["RLIMIT_NOFILE"] == (soft, hard)
    assert {"RLIMIT_STACK", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_AS"} <= set(limits)
    unlimited = (1 << 64) - 1
    assert limits["RLIMIT_AS"] == tuple(unlimited if v == resource.RLIM_INFINITY else v
                                        for v in resource.getrlimit(resource.RLIMIT_AS))


def test_root_hostname_and_paths() -> None:
    spec = spec_of(nix_like())
    assert spec["root"] == {"path": "/b/rootfs", "readonly": True}
    assert spec["hostname"] == "localhost"
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]
    assert "/proc/sys" in spec["linux"]["readonlyPaths"]


@pytest.mark.parametrize("network", [False, True], ids=["sandboxed", "network"])
def test_namespaces(network: bool) -> None:
    req = nix_like(constraints=BuildConstraints(system="x", network_access=network))
    kinds = [n["type"] for n in spec_of(req)["linux"]["namespaces"]]
    assert {"pid", "ipc", "uts", "mount", "user"} <= set(kinds)
    assert ("network" in kinds) is not network


def test_user_namespace_never_maps_root_to_root() -> None:
    spec = spec_of(nix_like())
    for key in ("uidMappings", "gidMappings"):
        for m in spec["linux"][key]:
            assert m["hostID"] > 0
            assert m["size"] >= 65536
            # container 0 and 1000/100 lie inside the mapping
            assert m["containerID"] == 0


def test_mount_order_and_options() -> None:
    spec = spec_of(nix_like())
    dests = destinations(spec)
    assert dests == [
        "/proc", "/dev", "/dev/pts", "/dev/shm", "/tmp",
        "/build", "/nix/store",
        "/nix/store/aaa-dep", "/nix/store/bbb-src.sh",
        "/opt/x",
        "/bin/sh",
    ]
    by = {m["destination"]: m for m in spec["mounts"]}
    assert by["/build"]["source"] == "/b/scratch/0"
    assert "rw" in by["/build"]["options"]
    for d in ("/nix/store/aaa-dep", "/nix/store/bbb-src.sh"):
        assert by[d]["source"] == "/fuse/" + d.rsplit("/", 1)[1]
        assert {"ro", "nosuid", "nodev"} <= set(by[d]["options"])
    assert {"rro", "rbind", "rnosuid", "rnodev"} <= set(by["/opt/x"]["options"]) and by["/opt/x"]["source"] == "/opt/x"
    assert by["/bin/sh"]["source"] == "/bin/busybox" and "ro" in by["/bin/sh"]["options"]


@pytest.mark.parametrize("network", [False, True], ids=["sandboxed", "network"])
def test_sys_only_with_network_access(network: bool) -> None:
    # Nix 2.8's sandbox has no /sys; with network access the host's is bound
    # read-only (sysfs needs a network namespace of our own).
    req = nix_like(constraints=BuildConstraints(system="x", network_access=network))
    spec = spec_of(req)
    validate_config(spec)
    by = {m["destination"]: m for m in spec["mounts"]}
    points = [p for p, _ in mount_points(req)]
    masked = spec["linux"]["maskedPaths"]
    assert "/proc/kcore" in masked and "/proc/acpi" in masked
    if network:
        assert by["/sys"]["source"] == "/sys" and by["/sys"]["type"] == "none"
        assert {"rbind", "rro", "rnosuid", "rnodev"} <= set(by["/sys"]["options"])
        assert "sys" in points
        assert "/sys/firmware" in masked
    else:
        assert not [d for d in by if d == "/sys" or d.startswith("/sys/")]
        assert "sys" not in points
        assert not [p for p in masked if p.startswith("/sys")]


def test_network_mounts_only_with_network() -> None:
    sandboxed = destinations(spec_of(nix_like()))
    assert not {"/etc/resolv.conf", "/etc/services", "/etc/hosts"} & set(sandboxed)
    req = nix_like(constraints=BuildConstraints(system="x", network_access=True))
    spec = spec_of(req, network_files={"/etc/resolv.conf": "/h/r", "/etc/services": "/h/s",
                                       "/etc/hosts": "/h/h"})
    by = {m["destination"]: m for m in spec["mounts"]}
    assert by["/etc/resolv.conf"]["source"] == "/h/r"
    assert by["/etc/hosts"]["source"] == "/h/h"
    assert by["/sys"]["source"] == "/sys"  # a bind: sysfs needs our own netns
    assert "/bin/sh" not in by  # provide_bin_sh false here


def test_nested_scratch_paths_parent_first() -> None:
    req = nix_like(scratch_paths=["a-b", "a/b", "a"], outputs=[], inputs=[],
                   constraints=None, inputs_dir="")
    # validation would want them sorted; make_spec orders by depth regardless
    d = destinations(spec_of(req))
    assert d.index("/a") < d.index("/a/b")


def test_non_utf8_env_value_is_refused() -> None:
    req = nix_like(environment_vars=[EnvVar(key="A", value=b"ok"),
                                     EnvVar(key="BIN", value=b"\xff\xfe")])
    with pytest.raises(SpecError) as info:
        spec_of(req)
    assert info.value.field == "environment_vars[1].value"
    assert info.value.rule == "env-utf8"
    assert "BIN" in str(info.value)


def test_missing_host_paths_are_named() -> None:
    req = nix_like()
    with pytest.raises(SpecError, match="aaa-dep"):
        make_spec(req, attrs.evolve(opts_for(req), input_paths={}))
    with pytest.raises(SpecError, match="nix/store"):
        make_spec(req, attrs.evolve(opts_for(req), scratch_dirs={"build": "/x"}))


def test_make_spec_is_pure(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert spec_of(nix_like()) == spec_of(nix_like())
    assert list(tmp_path.iterdir()) == []


def _with_inputs(n: int) -> BuildRequest:
    inputs = [FileNode(name=f"{i:05d}-{'x' * 100}".encode(), digest=D, size=1)
              for i in range(n)]
    return nix_like(inputs=inputs, command_args=["/bin/sh"])


def test_runcs_mount_message_limit_is_checked_before_runc() -> None:
    # Measured against runc 1.1 (tests/integration/test_hardening.py builds
    # just under and over it): each bind's source path and its NUL count.
    ok = _with_inputs(300)  # 300 * ~120 bytes
    spec_of(ok)
    from stages.errors import SpecError

    with pytest.raises(SpecError) as info:
        spec_of(_with_inputs(600))
    assert (info.value.field, info.value.rule) == ("inputs", "too-many-mounts")
    assert "600 inputs" in str(info.value)

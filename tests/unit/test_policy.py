"""The operator's policy, checked without a container (the attacks are in
tests/integration/test_hardening.py)."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from stages.errors import RequestError, ServiceError
from stages.oci.seccomp import DENIED, seccomp_profile
from stages.policy import Policy, check_request, parse_size
from stages.request import BuildConstraints, BuildRequest
from stages.service import OciBuildService


@pytest.mark.parametrize("timeout", [0, -5])
def test_a_timeout_must_be_positive(tmp_path: Path, timeout: float) -> None:
    with pytest.raises(ServiceError, match="positive"):
        OciBuildService(tmp_path, timeout=timeout)


def test_policy_refusals_name_the_field() -> None:
    policy = Policy(max_memory=1 << 30)
    base = BuildRequest(command_args=["/bin/true"], working_dir="build",
                        scratch_paths=["build"], inputs_dir="build")
    cases = {
        "constraints.system": BuildConstraints(system="aarch64-darwin"),
        "constraints.min_memory": BuildConstraints(system="x86_64-linux", min_memory=90 << 40),
        "constraints.network_access": BuildConstraints(system="x86_64-linux",
                                                       network_access=True),
    }
    for field, constraints in cases.items():
        req = attrs.evolve(base, constraints=constraints)
        with pytest.raises(RequestError) as info:
            check_request(req, policy)
        assert info.value.field == field


@pytest.mark.parametrize("text, size", [("512M", 512 << 20), ("8G", 8 << 30), ("1048576", 1 << 20),
                                        ("64KiB", 64 << 10), ("2t", 2 << 40)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1M", "0", "1.5G", "ten"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_ro_paths_must_lie_in_an_allowed_directory(tmp_path: Path) -> None:
    (tmp_path / "ok" / "sub").mkdir(parents=True)
    (tmp_path / "okay").mkdir()
    policy = Policy(allowed_ro_paths=[str(tmp_path / "ok")])
    assert policy.ro_source(str(tmp_path / "ok" / "sub")) == str(tmp_path / "ok" / "sub")
    assert policy.ro_source(str(tmp_path / "ok")) == str(tmp_path / "ok")
    assert policy.ro_source(str(tmp_path / "okay")) is None  # a prefix is not a parent
    assert policy.ro_source(str(tmp_path)) is None
    assert Policy().ro_source("/usr") is None  # nothing is allowed by default


def test_the_seccomp_profile_denies_and_allows_disjoint_sets() -> None:
    profile = seccomp_profile()
    allowed = {n for r in profile["syscalls"] if r["action"] == "SCMP_ACT_ALLOW"
               and "args" not in r for n in r["names"]}
    assert not allowed & set(DENIED)
    assert {"io_uring_setup", "unshare", "mount", "keyctl", "bpf"} <= set(DENIED)
    assert {"read", "write", "execve", "wait4"} <= allowed


@pytest.mark.parametrize("command", [["build", "x.json"], ["serve", "--listen", "unix:///x"]])
@pytest.mark.parametrize("timeout", ["-5", "0"])
def test_the_cli_refuses_a_timeout_that_is_not_positive(command: list[str], timeout: str,
                                                        capsys) -> None:
    from stages.cli import main

    assert main([*command, "--timeout", timeout]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--timeout must be a positive number" in err[0], err


def test_a_socket_in_an_allowed_directory_is_never_bound(tmp_path: Path) -> None:
    import socket

    (tmp_path / "ok").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "ok" / "daemon.sock"))
    try:
        policy = Policy(allowed_ro_paths=[str(tmp_path / "ok")])
        assert policy.ro_source(str(tmp_path / "ok" / "daemon.sock")) is None
        assert policy.ro_source(str(tmp_path / "ok")) == str(tmp_path / "ok")
    finally:
        sock.close()


def test_an_allowed_path_overlapping_the_state_directory_is_refused(tmp_path: Path) -> None:
    for allowed in (tmp_path, tmp_path / "state" / "runs"):
        with pytest.raises(ServiceError, match="overlaps the state directory"):
            OciBuildService(tmp_path / "state", policy=Policy(allowed_ro_paths=[str(allowed)]))


def test_a_builders_log_cannot_move_the_terminals_cursor() -> None:
    from stages.errors import RuncError

    text = str(RuncError("c", "the builder failed", exit_code=1,
                         log_tail="ok\n\x1b[1A\x1b[2Kocibuild: error: forged\r\tx\n"))
    assert "\x1b" not in text and "\r" not in text
    assert "\\x1b[1A" in text and "\tx\n" in text

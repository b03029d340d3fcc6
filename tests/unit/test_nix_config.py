"""nix.conf's sandbox paths, parsed as Nix 2.8 reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.nix.config import SandboxPath, sandbox_paths
from stages.nix.errors import NixError


def _conf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nix.conf"
    path.write_text(text)
    return path


def test_set_then_extra_entries_in_order(tmp_path: Path) -> None:
    conf = _conf(tmp_path, "sandbox = true\n"
                           "sandbox-paths = /bin/sh=/nix/store/x-busybox/bin/busybox  # a comment\n"
                           "extra-sandbox-paths = /opt/data /etc/ssl/certs=/srv/certs?\n")
    assert sandbox_paths(conf) == [
        SandboxPath("/bin/sh", "/nix/store/x-busybox/bin/busybox"),
        SandboxPath("/opt/data", "/opt/data"),
        SandboxPath("/etc/ssl/certs", "/srv/certs", optional=True),
    ]


def test_a_later_setting_replaces_an_earlier_one(tmp_path: Path) -> None:
    conf = _conf(tmp_path, "sandbox-paths = /a\nextra-sandbox-paths = /b\nsandbox-paths = /c\n")
    assert [e.target for e in sandbox_paths(conf)] == ["/c"]


def test_no_file_is_no_paths(tmp_path: Path) -> None:
    assert sandbox_paths(tmp_path / "absent.conf") == []


def test_a_relative_path_is_refused_naming_the_line(tmp_path: Path) -> None:
    conf = _conf(tmp_path, "\nextra-sandbox-paths = data\n")
    with pytest.raises(NixError, match=r"nix.conf:2: sandbox path 'data' is not absolute"):
        sandbox_paths(conf)

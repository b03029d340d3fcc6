"""Machine probes for the integration markers.

Each marker (root, fuse, runc, nix) is checked against the machine once. A
test whose marker's probe fails is skipped with the reason, except under CI
(CI=true), where it fails instead: CI must never silently skip the
integration tests.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from stages.castore.addresses import open_castore
from stages.castore.local import LocalStore

REPO = Path(__file__).resolve().parent.parent
NIX_CONF_DIR = REPO / ".nix"


@functools.cache
def _probe(marker: str) -> str | None:
    """None when the machine can run tests with this marker, else why not."""
    if marker == "root":
        return None if os.geteuid() == 0 else "needs root"
    if marker == "fuse":
        if os.geteuid() != 0:
            return "needs root to mount FUSE"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        try:
            import pyfuse3  # noqa: F401 - imported only to see that it loads
        except ImportError as exc:
            return f"pyfuse3 does not import: {exc}"
        if shutil.which("fusermount3") is None:
            return "fusermount3 is missing (apt package fuse3; run make install)"
        return None
    if marker == "runc":
        if os.geteuid() != 0:
            return "needs root to run runc"
        if shutil.which("runc") is None:
            return "runc is missing (run make install)"
        if not os.path.exists("/bin/busybox"):
            return "/bin/busybox is missing (apt package busybox-static)"
        return None
    if marker == "nix":
        if shutil.which("nix-build") is None:
            return "nix-build is missing (apt package nix-bin; run make install)"
        if not (NIX_CONF_DIR / "nix.conf").exists():
            return f"{NIX_CONF_DIR}/nix.conf is missing (run make nix-setup)"
        return None
    return None


MACHINE_MARKERS = ("root", "fuse", "runc", "nix")


def pytest_configure(config: pytest.Config) -> None:
    # Nix for the tests: the project's own config, single-user, sandboxed.
    os.environ.setdefault("NIX_CONF_DIR", str(NIX_CONF_DIR))
    os.environ.setdefault("NIX_REMOTE", "local")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    for item in items:
        for marker in MACHINE_MARKERS:
            if item.get_closest_marker(marker) is None:
                continue
            reason = _probe(marker)
            if reason is None:
                continue
            if in_ci:
                item.add_marker(pytest.mark.usefixtures("_ci_missing_capability"))
                item.user_properties.append(("ci_missing", reason))
            else:
                item.add_marker(pytest.mark.skip(reason=f"[{marker}] {reason}"))


@pytest.fixture
def _ci_missing_capability(request: pytest.FixtureRequest) -> None:
    for key, reason in request.node.user_properties:
        if key == "ci_missing":
            pytest.fail(f"CI cannot skip this test: {reason}")


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    """subprocess.run with check=True and captured output, for tests."""
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    return subprocess.run(cmd, **kw)


# --- stores: fixtures for unit and integration tests alike ---------------------

@pytest.fixture(params=["memory", "local"])
def castore(request: pytest.FixtureRequest, tmp_path: Path):
    """Each backend that lives in this process; a module may override it
    (test_grpc_castore runs the same tests through gRPC)."""
    if request.param == "memory":
        yield open_castore("memory://", "memory://")
        return
    address = f"local://{tmp_path / 'store'}"
    cs = open_castore(address, address)
    yield cs
    cs.blobs.store.close()


@pytest.fixture
def store(tmp_path: Path):
    """A fresh local store in the test's directory."""
    s = LocalStore(tmp_path / "store")
    yield s
    s.close()

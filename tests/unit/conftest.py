"""Fixtures shared by the unit tests of the stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.castore.addresses import open_castore
from stages.castore.local import LocalStore


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

"""Fixtures shared by the FUSE integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.castore.fuse import cleanup_stale_mounts


@pytest.fixture
def mountpoint(tmp_path: Path):
    """An empty directory to mount on; the test fails if a mount is left there."""
    path = tmp_path / "mnt"
    path.mkdir()
    try:
        yield path
    finally:
        left = cleanup_stale_mounts(path)
        assert not left, f"a FUSE mount was left at {left}"


@pytest.fixture
def store_address(tmp_path: Path) -> str:
    """A fresh local store in the test's directory."""
    return "local://" + str(tmp_path / "store")

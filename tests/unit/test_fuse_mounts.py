"""Pure parts of the FUSE package: mountinfo parsing, path resolution, addresses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.castore.errors import StoreError
from stages.castore.fuse import cleanup_stale_mounts
from stages.castore.fuse.mounts import _unescape, read_mountinfo, resolve_without_entering
from stages.castore.fuse.store import check_servable


@pytest.mark.parametrize("raw,expected", [
    (b"/plain/path", b"/plain/path"),
    (b"/with\\040space", b"/with space"),
    (b"/tab\\011and\\012newline", b"/tab\tand\nnewline"),
    (b"/back\\134slash", b"/back\\slash"),
    (b"/trailing\\04", b"/trailing\\04"),
], ids=["plain", "space", "tab-newline", "backslash", "short-escape"])
def test_mountinfo_unescape(raw: bytes, expected: bytes) -> None:
    assert _unescape(raw) == expected


def test_mountinfo_has_root() -> None:
    assert Path("/") in {m.mountpoint for m in read_mountinfo()}


def test_resolve_without_entering_follows_parent_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    got = resolve_without_entering(tmp_path / "alias" / "mnt")
    assert got == Path(os.path.realpath(tmp_path)) / "real" / "mnt"
    assert resolve_without_entering(Path("/")) == Path("/")


def test_cleanup_with_nothing_mounted_returns_empty(tmp_path: Path) -> None:
    assert cleanup_stale_mounts(tmp_path) == []


@pytest.mark.parametrize("address,match", [
    ("memory://", "memory://.*one process"),
    ("local://relative/dir", "local:///absolute"),
    ("local:///abs/dir?x=1", "local:///absolute"),
    ("no-scheme", "not a URL"),
    ("nope://x", "unknown store scheme 'nope'.*grpc\\+unix://.*local://"),
    ("grpc+unix://relative.sock", "grpc\\+unix:///absolute/path"),
], ids=["memory", "relative-local", "local-query", "no-scheme", "unknown", "relative-grpc"])
def test_unservable_addresses_are_refused_by_name(address: str, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        check_servable(address)


@pytest.mark.parametrize("address", ["local:///var/lib/store", "grpc+unix:///run/c.sock",
                                     "grpc+http://[::1]:5000"])
def test_local_and_grpc_addresses_are_servable(address: str) -> None:
    check_servable(address)  # checked, not opened: nothing listens there

"""Pure parts of the FUSE package: mountinfo parsing, path resolution, addresses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.castore.errors import StoreError
from stages.castore.fuse import cleanup_stale_mounts
from stages.castore.fuse.mounts import _unescape, read_mountinfo, resolve_without_entering
from stages.castore.fuse.store import check_address


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
    ("memory://", "memory://"),
    ("grpc+unix:///run/castore.sock", "grpc\\+unix"),
    ("local://relative/dir", "local:///absolute"),
    ("no-scheme", "not a URL"),
], ids=["memory", "grpc", "relative-local", "no-scheme"])
def test_unservable_addresses_are_refused_by_name(address: str, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        check_address(address)


def test_local_address_gives_its_directory() -> None:
    assert check_address("local:///var/lib/store") == Path("/var/lib/store")

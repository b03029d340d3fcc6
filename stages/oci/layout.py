"""Where a build's pieces live on the host, inside its bundle directory.

::

    <bundle>/config.json        the OCI runtime spec
    <bundle>/rootfs/            the read-only root: etc/, mount points
    <bundle>/scratch/<i>/       host side of scratch_paths[i], writable by the builder
    <bundle>/build.log          the builder's stdout and stderr

A path of the build root (relative, as in a request) lives in the scratch
directory of its longest scratch-path prefix, or else in the rootfs.

A bundle is removed whole, or moved into a trash directory to be deleted
later (:func:`remove_bundle`, :func:`trash_bundle`), never while anything is
mounted inside it.

The scratch directories may live elsewhere (``scratch_root``): a bundle on
a tmpfs keeps what the builder writes on disk. ``<bundle>/scratch`` is then
a symlink to ``scratch_root``, for people looking at the bundle; code and
config.json use the real path.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from stages.errors import BundleError

__all__ = ["BundleLayout", "check_traversable", "is_under", "linked_scratch",
           "longest_scratch_prefix", "remove_bundle", "remove_if_small", "trash_bundle"]


def is_under(path: str, root: str) -> bool:
    """``path`` equals ``root`` or lies below it (clean relative paths)."""
    return path == root or path.startswith(root + "/")


def longest_scratch_prefix(path: str, scratch_paths: Iterable[str]) -> str | None:
    """The scratch path holding ``path``, the longest when several do."""
    best = None
    for s in scratch_paths:
        if is_under(path, s) and (best is None or len(s) > len(best)):
            best = s
    return best


def check_traversable(path: Path | str) -> None:
    """Refuse a bundle location the container's root could not reach."""
    p = Path(path).resolve()
    for d in [p, *p.parents]:
        try:
            mode = d.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & 0o001:
            raise BundleError(path, f"{d} is not searchable by others (mode "
                                    f"{mode & 0o777:o}); the container's mapped root could "
                                    f"not reach the bundle; use a directory with o+x")


@attrs.frozen
class BundleLayout:
    """Path arithmetic for one bundle directory; no I/O."""

    root: Path = attrs.field(converter=Path)
    #: Where the scratch directories are, when not in ``<root>/scratch``.
    scratch_root: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(Path))
    #: A root file system shared with other bundles, used instead of
    #: ``<root>/rootfs`` (see :mod:`stages.bundle`).
    shared_rootfs: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(Path))

    @property
    def scratch_base(self) -> Path:
        """The directory holding ``<i>/`` for each scratch path."""
        return self.scratch_root if self.scratch_root is not None else self.root / "scratch"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def rootfs(self) -> Path:
        return self.shared_rootfs if self.shared_rootfs is not None else self.root / "rootfs"

    @property
    def log(self) -> Path:
        return self.root / "build.log"

    def scratch_dir(self, scratch_paths: Sequence[str], scratch_path: str) -> Path:
        """The host directory bind-mounted at /<scratch_path>, one of the
        request's ``scratch_paths``."""
        return self.scratch_base / str(list(scratch_paths).index(scratch_path))

    def scratch_dirs(self, scratch_paths: Sequence[str]) -> dict[str, Path]:
        return {s: self.scratch_base / str(i) for i, s in enumerate(scratch_paths)}

    def host_path(self, scratch_paths: Sequence[str], rel: str) -> Path:
        """The host path that holds build-root path ``rel`` (clean, relative).

        Outputs are read back from here after the build.
        """
        s = longest_scratch_prefix(rel, scratch_paths)
        if s is None:
            return self.rootfs / rel if rel else self.rootfs
        tail = rel[len(s) + 1:]
        base = self.scratch_dir(scratch_paths, s)
        return base / tail if tail else base


def _mounts_under(paths: list[Path]) -> list[str]:
    """The mount points at or below any of ``paths`` (one read of mountinfo)."""
    with open("/proc/self/mountinfo", "rb") as f:
        info = f.read()
    found = []
    for path in paths:
        # mountinfo escapes space, tab, newline and backslash as octal: a path
        # free of them appears as itself, and most paths are (a quick test first).
        text = os.fsencode(path).rstrip(b"/")
        if text not in info and not any(c in text for c in b" \t\n\\"):
            continue
        prefix = str(path).rstrip("/") + "/"
        for line in info.decode("utf-8", "surrogateescape").splitlines():
            mnt = line.split()[4].encode("utf-8", "surrogateescape").decode("unicode_escape")
            if mnt == str(path) or mnt.startswith(prefix):
                found.append(mnt)
    return found


def linked_scratch(bundle_dir: Path | str) -> Path | None:
    """The scratch root of a bundle whose scratch directories live elsewhere."""
    link = Path(bundle_dir) / "scratch"
    if not link.is_symlink():
        return None
    return Path(os.readlink(link))


def _refuse_mounted(bundle: Path, parts: list[Path]) -> None:
    mounted = _mounts_under(parts)
    if mounted:
        raise BundleError(bundle, f"still mounted inside: {', '.join(mounted)}; unmount first")


def trash_bundle(bundle_dir: Path | str, trash_dir: Path | str, *,
                 scratch_trash_dir: Path | str | None = None) -> list[Path]:
    """Move a bundle into ``trash_dir`` (same filesystem) for later deletion.

    A scratch root kept elsewhere (:func:`linked_scratch`) goes into
    ``scratch_trash_dir`` (default: ``trash_dir``), on its own filesystem.
    Returns where things went (nothing when there was no bundle). Refuses,
    like :func:`remove_bundle`, while anything is mounted inside.
    """
    path = Path(bundle_dir).absolute()
    if not path.exists():
        return []
    scratch = linked_scratch(path)
    parts = [path] if scratch is None or not scratch.exists() else [path, scratch]
    _refuse_mounted(path, parts)
    dests = [Path(trash_dir), Path(scratch_trash_dir or trash_dir)]
    moved = []
    for part, trash in zip(parts, dests):
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / f"{part.name}.{uuid.uuid4().hex[:8]}"
        os.rename(part, target)
        moved.append(target)
    return moved


def remove_if_small(path: Path, limit: int = 64) -> bool:
    """Remove the tree at ``path`` if it has at most ``limit`` entries; say if it did.

    Counting stops at ``limit``, so a large tree costs only that much
    listing before it is left to the caller (for a worker thread).
    """
    count = 0
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                count += 1
                if count > limit:
                    return False
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    shutil.rmtree(path)
    return True


def remove_bundle(bundle_dir: Path | str) -> None:
    """Remove a bundle (and its linked scratch root); refuses while anything is mounted inside."""
    path = Path(bundle_dir).absolute()
    if not path.exists():
        return
    scratch = linked_scratch(path)
    parts = [path] if scratch is None or not scratch.exists() else [path, scratch]
    _refuse_mounted(path, parts)
    for part in parts:
        shutil.rmtree(part)

"""Where a build's pieces live on the host, inside its bundle directory.

::

    <bundle>/config.json        the OCI runtime spec
    <bundle>/rootfs/            the read-only root: etc/, mount points
    <bundle>/scratch/<i>/       host side of scratch_paths[i], writable by the builder
    <bundle>/build.log          the builder's stdout and stderr

A path of the build root (relative, as in a request) lives in the scratch
directory of its longest scratch-path prefix, or else in the rootfs.

The scratch directories may live elsewhere (``scratch_root``): a bundle on
a tmpfs keeps what the builder writes on disk. ``<bundle>/scratch`` is then
a symlink to ``scratch_root``, for people looking at the bundle; code and
config.json use the real path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from stages.errors import BundleError

if TYPE_CHECKING:
    from stages.request import BuildRequest

__all__ = ["BundleLayout", "check_traversable"]


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

    def scratch_dir(self, req: BuildRequest, scratch_path: str) -> Path:
        """The host directory bind-mounted at /<scratch_path>."""
        return self.scratch_base / str(req.scratch_paths.index(scratch_path))

    def scratch_dirs(self, req: BuildRequest) -> dict[str, Path]:
        return {s: self.scratch_dir(req, s) for s in req.scratch_paths}

    def host_path(self, req: BuildRequest, rel: str) -> Path:
        """The host path that holds build-root path ``rel`` (clean, relative).

        Outputs are read back from here after the build.
        """
        from stages.validate import longest_scratch_prefix

        s = longest_scratch_prefix(rel, req.scratch_paths)
        if s is None:
            return self.rootfs / rel if rel else self.rootfs
        tail = rel[len(s) + 1:]
        base = self.scratch_dir(req, s)
        return base / tail if tail else base

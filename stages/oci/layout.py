"""Where a build's pieces live on the host, inside its bundle directory.

::

    <bundle>/config.json        the OCI runtime spec
    <bundle>/rootfs/            the read-only root: etc/, mount points
    <bundle>/scratch/<i>/       host side of scratch_paths[i], writable by the builder
    <bundle>/build.log          the builder's stdout and stderr

A path of the build root (relative, as in a request) lives in the scratch
directory of its longest scratch-path prefix, or else in the rootfs.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from stages.request import BuildRequest
from stages.validate import longest_scratch_prefix

__all__ = ["BundleLayout"]


@attrs.frozen
class BundleLayout:
    """Path arithmetic for one bundle directory; no I/O."""

    root: Path = attrs.field(converter=Path)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def log(self) -> Path:
        return self.root / "build.log"

    def scratch_dir(self, req: BuildRequest, scratch_path: str) -> Path:
        """The host directory bind-mounted at /<scratch_path>."""
        return self.root / "scratch" / str(req.scratch_paths.index(scratch_path))

    def scratch_dirs(self, req: BuildRequest) -> dict[str, Path]:
        return {s: self.scratch_dir(req, s) for s in req.scratch_paths}

    def host_path(self, req: BuildRequest, rel: str) -> Path:
        """The host path that holds build-root path ``rel`` (clean, relative).

        Outputs are read back from here after the build.
        """
        s = longest_scratch_prefix(rel, req.scratch_paths)
        if s is None:
            return self.rootfs / rel if rel else self.rootfs
        tail = rel[len(s) + 1:]
        base = self.scratch_dir(req, s)
        return base / tail if tail else base

"""The mount stage: the request's inputs, read-only, through the castore FUSE mount.

Nothing is copied: the build host's mount server (one per service, see
:mod:`stages.castore.fuse`) shows the inputs under ``<mountpoint>/<key>/``,
and the spec bind-mounts each of them, read-only, at
``/<inputs_dir>/<name>`` in the container. A build sees only its own key.

The ``inputs`` resource adds the key when acquired and removes it when
released (after ``run``, or on failure or cancellation).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

if TYPE_CHECKING:
    from stages.build import BuildHost, BuildSpec

__all__ = ["inputs_mounted", "stage"]


@contextlib.asynccontextmanager
async def inputs_mounted(build: BuildSpec, host: BuildHost, _ctx: Any) -> AsyncIterator[Path]:
    """Resource factory: the build's inputs in the mount server, for as long as held."""
    path = await host.mounts.add(build.key, list(build.request.inputs))
    try:
        yield path
    finally:
        await host.mounts.remove(build.key)


async def stage(build: BuildSpec, host: BuildHost, ctx: Any) -> dict:
    path = ctx.resources["inputs"]
    names = [n.name.decode("utf-8", "surrogateescape") for n in build.request.inputs]
    ctx.log(f"{len(names)} input(s) at {path}")
    return {"path": str(path), "inputs": names}

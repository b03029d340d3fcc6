"""The mount stage: the request's inputs, read-only, through the castore FUSE mount.

Nothing is copied: the build host's mount server (one per service, see
:mod:`stages.castore.fuse`) shows the inputs under ``<mountpoint>/<key>/``,
and the spec bind-mounts each of them, read-only, at
``/<inputs_dir>/<name>`` in the container. A build sees only its own key.

The ``inputs`` resource adds the key when acquired and removes it when
released (after ``run``, or on failure or cancellation). While held, the
symlink ``<bundle>/inputs`` (:meth:`~stages.build.BuildHost.input_link`)
points at the key's subtree; config.json binds inputs through it, so a
stopped run resumed by another service instance (another mountpoint) binds
the inputs of the current mount.

The stage checks that each input's root is in the store and fails naming
the first one that is not.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from stages.castore.nodes import DirectoryNode, FileNode
from stages.errors import RequestError

if TYPE_CHECKING:
    from stages.build import BuildHost, BuildSpec
    from stages.request import BuildRequest

__all__ = ["inputs_mounted", "stage"]


@contextlib.asynccontextmanager
async def inputs_mounted(build: BuildSpec, host: BuildHost, ctx: Any) -> AsyncIterator[Path]:
    """Resource factory: the build's inputs in the mount server, for as long as held."""
    from stages.build import request_of

    path = await host.mounts.add(build.key, list(request_of(build, ctx).inputs))
    link = host.input_link(build)
    try:
        tmp = link.with_name(f".{link.name}.new")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(path, tmp)
        os.replace(tmp, link)
        yield path
    finally:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
        finally:
            await host.mounts.remove(build.key)


async def _check_in_store(req: BuildRequest, host: BuildHost) -> None:
    """Fail naming the first input whose root is not in the store.

    Only roots are checked (a directory's children are read lazily through
    FUSE); without this a missing input surfaced as runc failing to open a
    mount source with an I/O error.
    """
    for i, node in enumerate(req.inputs):
        if isinstance(node, FileNode):
            present = await host.castore.blobs.has(node.digest)
            what = "blob"
        elif isinstance(node, DirectoryNode):
            present = await host.castore.directories.get(node.digest) is not None
            what = "directory"
        else:
            continue
        if not present:
            raise RequestError(f"inputs[{i}]", "input-in-store",
                               f"{what} {node.digest.hex()} of input "
                               f"{node.name.decode('utf-8', 'replace')!r} is not in the store; "
                               f"import it first (ocibuild castore import)")


async def stage(build: BuildSpec, host: BuildHost, ctx: Any) -> dict:
    from stages.build import request_of

    req = request_of(build, ctx)
    path = ctx.resources["inputs"]
    await _check_in_store(req, host)
    names = [n.name.decode("utf-8", "surrogateescape") for n in req.inputs]
    ctx.log(f"{len(names)} input(s) at {path}")
    return {"path": str(path), "inputs": names}

"""The mount stage: the request's inputs, read-only, through the castore FUSE mount.

Nothing is copied: the build host's mount server (one per service, see
:mod:`stages.castore.fuse`) shows every directory and file of the store by
digest in its content directory, ``<mountpoint>/.by-digest/``, and the spec
bind-mounts each input from there, read-only, at ``/<inputs_dir>/<name>``
in the container. A build sees only what it binds: its own inputs.

The ``inputs`` resource makes the symlink ``<bundle>/inputs``
(:meth:`~stages.context.BuildHost.input_link`) point at the content directory
of the running mount server when acquired, and removes it when released
(after ``run``, or on failure or cancellation). config.json binds inputs
through it (``<bundle>/inputs/d-<digest>`` and the like), so a stopped run
resumed by another service instance (another mountpoint) binds the inputs
of the current mount. Nothing is asked of the mount server per build.

The stage checks that each input's root is in the store and fails naming
the first one that is not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.castore.fuse.content import content_name
from stages.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from stages.context import BuildHost, BuildSpec, StageContext, request_of
from stages.errors import RequestError

if TYPE_CHECKING:
    from stages.request import BuildRequest

__all__ = ["inputs_mounted", "stage"]


@contextlib.asynccontextmanager
async def inputs_mounted(build: BuildSpec, host: BuildHost,
                         ctx: StageContext) -> AsyncIterator[Path]:
    """Resource factory: the link to the inputs in the mount server, for as long as held.

    A mount server that died since the last build is replaced first, and
    the build's log says so.
    """
    dead = await host.mounts.revive()
    if dead is not None:
        ctx.log(f"the FUSE mount server had died (exit status {dead}); a new one serves "
                f"the inputs from now on")
    await host.mounts.ensure_running()
    path = host.mounts.content_root
    link = host.input_link(build)
    try:
        tmp = link.with_name(f".{link.name}.new")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(path, tmp)
        os.replace(tmp, link)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)


async def _check_in_store(req: BuildRequest, host: BuildHost) -> None:
    """Fail naming the first input whose root is not in the store, or whose
    size is not the stored one's (a file's bytes, a directory's entries).

    Only roots are checked (a directory's children are read lazily through
    FUSE, and checked there); without this a missing input surfaced as runc
    failing to open a mount source with an I/O error, and a mis-sized file
    as the builder's EIO.
    """
    for i, node in enumerate(req.inputs):
        name = node.name.decode("utf-8", "replace")
        if isinstance(node, FileNode):
            size = await host.castore.blobs.stat(node.digest)
            what = "blob"
        elif isinstance(node, DirectoryNode):
            directory = await host.castore.directories.get(node.digest)
            size = None if directory is None else directory.size
            what = "directory"
        else:
            continue
        if size is None:
            raise RequestError(f"inputs[{i}]", "input-in-store",
                               f"{what} {node.digest.hex()} of input {name!r} is not in the "
                               f"store; import it first (ocibuild castore import)")
        if size != node.size:
            unit = "bytes" if what == "blob" else "entries below it"
            raise RequestError(f"inputs[{i}].size", "input-size",
                               f"input {name!r} says size {node.size}, but {what} "
                               f"{node.digest.hex()} in the store has {size} {unit}")


async def stage(build: BuildSpec, host: BuildHost, ctx: StageContext) -> dict[str, Any]:
    req = request_of(build, ctx)
    path = ctx.resources["inputs"]
    await _check_in_store(req, host)
    names = [n.name.decode("utf-8", "surrogateescape") for n in req.inputs]
    ctx.log(f"{len(names)} input(s) from {path}")
    # Where each bound input comes from (symlink inputs are in the bundle).
    sources = {n.name.decode("utf-8", "surrogateescape"): content_name(n)
               for n in req.inputs if not isinstance(n, SymlinkNode)}
    return {"path": str(path), "inputs": names, "sources": sources}

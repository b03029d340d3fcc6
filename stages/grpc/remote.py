"""Remote builds: inputs up to the server's castore, DoBuild, outputs back.

A request's inputs name nodes of the client's store. Before a remote build,
:func:`remote_build` copies into the server's castore what it lacks of each
input's closure (:func:`stages.castore.copy.copy_node`), then calls DoBuild,
and optionally copies each output's closure back into the client's store, so
the Build's nodes can be read locally.

Caveats:

- Uploads happen per build; concurrent builds sharing inputs may upload the
  same blob twice (both land as one blob: the store is content-addressed).
- The server's castore must be the one its build service builds from (as
  with ``ocibuild serve``, which serves both on one address).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from stages.castore.addresses import Castore
from stages.request import Build, BuildRequest
from stages.service import BuildService

__all__ = ["remote_build", "remote_builds", "upload_inputs"]


async def upload_inputs(request: BuildRequest, *, local: Castore, remote_castore: Castore) -> int:
    """Copy what ``remote_castore`` lacks of the request's inputs; return the bytes sent."""
    from stages.castore.copy import copy_node

    sent = 0
    for node in request.inputs:
        sent += await copy_node(local, remote_castore, node)
    return sent


async def remote_build(request: BuildRequest, *, local: Castore, remote_build: BuildService,
                       remote_castore: Castore, fetch_outputs: bool) -> Build:
    """Build ``request`` on ``remote_build`` with inputs from ``local``.

    Raises what the build service raises (RequestError, BuildFailed,
    ServiceError) and castore errors for an input missing locally.
    """
    from stages.castore.copy import copy_node

    await upload_inputs(request, local=local, remote_castore=remote_castore)
    build = await remote_build.do_build(request)
    if fetch_outputs:
        for node in build.outputs:
            await copy_node(remote_castore, local, node)
    return build


async def remote_builds(requests: Sequence[BuildRequest], *, local: Castore,
                        remote_build_service: BuildService, remote_castore: Castore,
                        fetch_outputs: bool, jobs: int | None = None
                        ) -> list[Build | BaseException]:
    """Several remote builds at once (at most ``jobs`` in flight; None: all).

    Each item is the Build, or the exception that build raised; cancelling
    this cancels every build (and so, on the server, their containers).
    """
    limit = asyncio.Semaphore(jobs or max(1, len(requests)))

    async def one(req: BuildRequest) -> Build:
        async with limit:
            return await remote_build(req, local=local, remote_build=remote_build_service,
                                      remote_castore=remote_castore,
                                      fetch_outputs=fetch_outputs)

    tasks = [asyncio.ensure_future(one(r)) for r in requests]
    try:
        return list(await asyncio.gather(*tasks, return_exceptions=True))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise

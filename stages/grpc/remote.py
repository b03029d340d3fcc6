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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from stages.castore.addresses import Castore
from stages.request import Build, BuildRequest
from stages.service import BuildService

if TYPE_CHECKING:
    from stages.service.events import BuildEvent

__all__ = ["remote_build", "remote_builds", "upload_inputs"]


async def upload_inputs(request: BuildRequest, *, local: Castore, remote_castore: Castore) -> int:
    """Copy what ``remote_castore`` lacks of the request's inputs; return the bytes sent."""
    from stages.castore.copy import copy_node

    sent = 0
    for node in request.inputs:
        sent += await copy_node(local, remote_castore, node)
    return sent


async def remote_build(request: BuildRequest, *, local: Castore, remote_build: BuildService,
                       remote_castore: Castore, fetch_outputs: bool,
                       on_event: Callable[[BuildEvent], None] | None = None) -> Build:
    """Build ``request`` on ``remote_build`` with inputs from ``local``.

    With ``on_event``, the build is streamed and each event passed to it as
    it arrives (:meth:`~stages.service.BuildService.stream_build`).

    Raises what the build service raises (RequestError, BuildFailed,
    ServiceError) and castore errors for an input missing locally.
    """
    from stages.castore.copy import copy_node

    if remote_castore is local:  # the service builds from this very store
        fetch_outputs = False
    else:
        await upload_inputs(request, local=local, remote_castore=remote_castore)
    if on_event is None:
        build = await remote_build.do_build(request)
    else:
        build = await remote_build.stream_build(request, on_event)
    if fetch_outputs:
        for node in build.outputs:
            await copy_node(remote_castore, local, node)
    return build


async def remote_builds(requests: Sequence[BuildRequest], *, local: Castore,
                        remote_build_service: BuildService, remote_castore: Castore,
                        fetch_outputs: bool, jobs: int | None = None,
                        on_event: Callable[[int, BuildEvent], None] | None = None
                        ) -> list[Build | BaseException]:
    """Several remote builds at once (at most ``jobs`` in flight; None: all).

    Each item is the Build, or the exception that build raised; cancelling
    this cancels every build (and so, on the server, their containers).
    ``on_event(i, event)`` gets the events of request ``i`` as they come.
    """
    limit = asyncio.Semaphore(jobs or max(1, len(requests)))

    async def one(i: int, req: BuildRequest) -> Build:
        emit = None if on_event is None else (lambda event: on_event(i, event))
        async with limit:
            return await remote_build(req, local=local, remote_build=remote_build_service,
                                      remote_castore=remote_castore,
                                      fetch_outputs=fetch_outputs, on_event=emit)

    tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(requests)]
    try:
        return list(await asyncio.gather(*tasks, return_exceptions=True))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise

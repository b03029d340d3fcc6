"""The build service interface: ``do_build(request) -> Build``.

Implementations: :class:`~stages.service.oci.OciBuildService` (runc
containers on this machine), :class:`DummyBuildService` (``dummy://``,
refuses everything), and those of higher layers, such as the gRPC client
(:mod:`stages.grpc.build_service`). :func:`stages.service.open_build_service`
picks one by address.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from stages.errors import ServiceError

if TYPE_CHECKING:
    from collections.abc import Callable

    from stages.request import Build, BuildRequest
    from stages.service.events import BuildEvent

__all__ = ["BuildService", "DummyBuildService"]


class BuildService(abc.ABC):
    """Builds one request at a time per call; calls may run concurrently."""

    @abc.abstractmethod
    async def do_build(self, request: BuildRequest) -> Build: ...

    async def stream_build(self, request: BuildRequest,
                           emit: Callable[[BuildEvent], None]) -> Build:
        """Build as :meth:`do_build` does, passing what happens meanwhile to ``emit``
        (:mod:`stages.service.events`; the final Finished/Failed is the caller's).

        This default emits nothing while the build runs; services that watch
        their builds override it.
        """
        return await self.do_build(request)

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> BuildService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class DummyBuildService(BuildService):
    """``dummy://``: refuses every build, as tvix's dummy service does."""

    async def do_build(self, request: BuildRequest) -> Build:
        raise ServiceError("dummy://", "the dummy build service does not build anything")

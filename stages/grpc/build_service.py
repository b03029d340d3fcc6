"""The build service over gRPC (``tvix.build.v1.BuildService``): server side and client.

:class:`BuildServicer` serves any :class:`~stages.service.BuildService`;
:class:`GrpcBuildService` is a BuildService that sends each build to such a
server, chosen by address (``grpc+unix:///abs/path``, ``grpc+http://host:port``,
``grpc+https://host:port``; see :func:`stages.service.open_build_service`).

Status codes of DoBuild (the one boundary where errors become codes and back):

================================  ==================  ================================
server side                       status code         client raises
================================  ==================  ================================
request refused (RequestError)    INVALID_ARGUMENT    RequestError (same field, rule)
refused in a later stage: policy, INVALID_ARGUMENT    RequestError (same field, rule)
spec (SpecError)
input not in the store            FAILED_PRECONDITION RequestError (same field, rule)
build failed (BuildFailed)        INTERNAL            BuildFailed (same key, stage)
other BuildError (ServiceError)   INTERNAL            ServiceError
server shutting down              UNAVAILABLE         ServiceError
unreachable / connection lost     UNAVAILABLE         ServiceError
client deadline passed            DEADLINE_EXCEEDED   BuildFailed (stage None)
================================  ==================  ================================

INTERNAL for a failed build is what tvix's own gRPC wrapper returns
(``Status::internal(err.to_string())``); INVALID_ARGUMENT for a request that
does not convert is tvix's too. The status message is the whole error text
(with the build log's tail). ocibuild servers add trailing metadata so that
an ocibuild client can rebuild the exact error: ``ocibuild-error`` (the kind:
``request``, ``build-failed``, ``service``, ``shutdown``), ``ocibuild-field``,
``ocibuild-rule``, ``ocibuild-stage``, ``ocibuild-key`` and
``ocibuild-message-bin`` (the message without the prefix). From a server
without them (tvix) the client still raises the right class, with the
status message.

Cancellation: a client whose ``do_build`` is cancelled (task cancel, Ctrl-C)
cancels the RPC; gRPC then cancels the server's handler, which cancels the
build and waits for its teardown (container killed and deleted, mount and
bundle removed). :meth:`BuildServicer.shutdown` cancels every running build
the same way and answers their calls with UNAVAILABLE.

Caveats:

- The client waits at most ``connect_timeout`` (default 10 s) for the
  channel to become ready, then fails with ServiceError; DoBuild itself has
  no deadline unless ``deadline`` is given (builds can be long).
- Nothing is retried: a build is not known to be safe to run twice. The
  channel reconnects with gRPC's own backoff while waiting to be ready.
- The servicer validates the request (:func:`stages.validate.validate_request`)
  before building, so a refused request gets INVALID_ARGUMENT with the field
  and rule instead of a failed validate stage.
"""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.parse
from collections.abc import Sequence
from typing import Any

import grpc

from stages.errors import BuildError, BuildFailed, RequestError, ServiceError, SpecError

# rpc_build_pb2 registers the service's descriptor (rpc_build_pb2_grpc does not
# import it), which server reflection looks up in the default pool.
from stages.proto import build_pb2, rpc_build_pb2, rpc_build_pb2_grpc  # noqa: F401 - rpc_build_pb2 registers the service descriptor reflection serves
from stages.request import (
    Build,
    BuildRequest,
    build_from_proto,
    build_to_proto,
    request_from_proto,
    request_to_proto,
)
from stages.service import BuildService
from stages.validate import validate_request

__all__ = ["BUILD_SERVICE_NAME", "BuildServicer", "GrpcBuildService", "add_build_servicer"]

log = logging.getLogger(__name__)

BUILD_SERVICE_NAME = "tvix.build.v1.BuildService"
DEFAULT_CONNECT_TIMEOUT = 10.0

#: Refusals that depend on the server's state, not the request alone.
_PRECONDITIONS = frozenset({"input-in-store"})
_KIND = "ocibuild-error"
_FIELD = "ocibuild-field"
_RULE = "ocibuild-rule"
_STAGE = "ocibuild-stage"
_KEY = "ocibuild-key"
_MESSAGE = "ocibuild-message-bin"


# --- server --------------------------------------------------------------------


class _ShuttingDown(Exception):
    """Raised inside a handler whose build the servicer cancelled for shutdown."""


class BuildServicer(rpc_build_pb2_grpc.BuildServiceServicer):
    """DoBuild over any BuildService; see the module docstring for status codes."""

    def __init__(self, service: BuildService) -> None:
        self.service = service
        self._builds: set[asyncio.Task[Build]] = set()
        self._closing = False
        self._hidden = _host_paths(service)

    @property
    def running(self) -> int:
        """How many builds are in flight now."""
        return len(self._builds)

    async def DoBuild(self, request: build_pb2.BuildRequest,  # noqa: N802 - gRPC's name
                      context: grpc.aio.ServicerContext) -> build_pb2.Build:
        if self._closing:
            await _abort(context, grpc.StatusCode.UNAVAILABLE,
                         "the build service is shutting down", {_KIND: "shutdown"})
        try:
            req = validate_request(request_from_proto(request))
        except RequestError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc),
                         {_KIND: "request", _FIELD: exc.field, _RULE: exc.rule,
                          _MESSAGE: exc.detail.encode()}, self._hidden)
        # The build runs as a task of its own so that shutdown() can cancel it
        # apart from the handler, and the handler can still answer the call.
        task = asyncio.create_task(self.service.do_build(req))
        self._builds.add(task)
        try:
            build = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self._closing and not _current_cancelling():
                await _abort(context, grpc.StatusCode.UNAVAILABLE,
                             "the build service is shutting down; the build was cancelled",
                             {_KIND: "shutdown"})
            # The client went away (or the server stops): cancel the build and
            # let its teardown finish before this handler ends.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        except BuildFailed as exc:
            cause = _refusal(exc)
            if cause is not None:
                # Refused after validation (an input not in the store, a
                # policy, an env value the spec cannot carry): the request's fault.
                code = (grpc.StatusCode.FAILED_PRECONDITION
                        if getattr(cause, "rule", "") in _PRECONDITIONS
                        else grpc.StatusCode.INVALID_ARGUMENT)
                await _abort(context, code, str(cause),
                             {_KIND: "request", _FIELD: cause.field, _RULE: cause.rule,
                              _MESSAGE: cause.detail.encode()}, self._hidden)
            await _abort(context, grpc.StatusCode.INTERNAL, str(exc),
                         {_KIND: "build-failed", _KEY: exc.key, _STAGE: exc.stage or "",
                          _MESSAGE: _failure_message(exc).encode()}, self._hidden)
        except BuildError as exc:
            await _abort(context, grpc.StatusCode.INTERNAL, str(exc),
                         {_KIND: "service", _MESSAGE: str(exc).encode()}, self._hidden)
        except Exception as exc:
            log.exception("DoBuild failed unexpectedly")
            await _abort(context, grpc.StatusCode.INTERNAL,
                         f"internal error of the build service: {type(exc).__name__}: {exc}",
                         {_KIND: "service"}, self._hidden)
        finally:
            self._builds.discard(task)
        return build_to_proto(build)

    async def shutdown(self) -> None:
        """Refuse new builds, cancel running ones and wait for their teardown."""
        self._closing = True
        tasks = list(self._builds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _refusal(exc: BaseException) -> RequestError | SpecError | None:
    """The RequestError or SpecError a failed build's stage raised, if any
    (through the stage's own wrapping: BuildFailed <- StageFailed <- it)."""
    cause = exc.__cause__
    for _ in range(8):
        if cause is None or isinstance(cause, RequestError | SpecError):
            return cause
        cause = cause.__cause__
    return None


def _current_cancelling() -> bool:
    """Whether the handler itself was cancelled (not only the build task under it)."""
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())


def _failure_message(exc: BuildFailed) -> str:
    # BuildFailed's text is "build failed at stage S (run R): MESSAGE"; keep MESSAGE.
    text = str(exc)
    head, sep, rest = text.partition("): ") if exc.run_dir is not None else text.partition(": ")
    return rest if sep else text


def _host_paths(service: BuildService) -> list[str]:
    """The server's own directories, which its answers never show a client."""
    paths = set()
    for attr in ("state_dir", "blob_address", "directory_address"):
        value = getattr(service, attr, None)
        if value is None:
            continue
        text = str(value)
        if "://" in text:
            text = urllib.parse.unquote(urllib.parse.urlsplit(text).path)
        if text.startswith("/") and text != "/":
            paths.update({text.rstrip("/"), os.path.realpath(text)})
    return sorted(paths, key=len, reverse=True)


def _redact(text: str, hidden: Sequence[str]) -> str:
    for path in hidden:
        text = text.replace(path, "<server>")
    return text


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str,
                 metadata: dict[str, str | bytes], hidden: Sequence[str] = ()) -> None:
    """End the call with ``code``; the server's own paths are cut out of what it says."""
    clean = {k: (_redact(v.decode(errors="replace"), hidden).encode() if isinstance(v, bytes)
                 else _redact(v, hidden)) for k, v in metadata.items()}
    context.set_trailing_metadata(tuple(clean.items()))
    await context.abort(code, _redact(details, hidden))


def add_build_servicer(server: grpc.aio.Server, service: BuildService) -> BuildServicer:
    """Serve ``service`` as tvix.build.v1.BuildService on ``server``."""
    servicer = BuildServicer(service)
    rpc_build_pb2_grpc.add_BuildServiceServicer_to_server(servicer, server)
    return servicer


# --- client --------------------------------------------------------------------


class GrpcBuildService(BuildService):
    """A BuildService whose builds run on a gRPC server.

    ``connect_timeout`` bounds the wait for a usable connection before each
    build; ``deadline`` (None: none) bounds a whole DoBuild call. The
    channel opens on first use; :meth:`aclose` closes it.
    """

    def __init__(self, address: str, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 deadline: float | None = None) -> None:
        if connect_timeout <= 0:
            raise ServiceError(address, f"connect_timeout must be > 0, not {connect_timeout}")
        if deadline is not None and deadline <= 0:
            raise ServiceError(address, f"deadline must be > 0 or None, not {deadline}")
        self.address = address
        self.connect_timeout = connect_timeout
        self.deadline = deadline
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    def _open(self) -> Any:
        if self._stub is None:
            from stages.castore.errors import CastoreError
            from stages.grpc.channels import channel_for

            try:
                self._channel = channel_for(self.address)
            except CastoreError as exc:
                raise ServiceError(self.address, str(exc)) from exc
            self._stub = rpc_build_pb2_grpc.BuildServiceStub(self._channel)
        return self._stub

    async def wait_ready(self) -> None:
        """Wait until the channel is connected; ServiceError after connect_timeout."""
        stub = self._open()
        assert self._channel is not None and stub is not None
        if self._channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return
        if self.address.startswith("grpc+unix://"):
            path = urllib.parse.urlsplit(self.address).path
            if not os.path.exists(path):
                raise ServiceError(self.address, f"no socket at {path}; is 'ocibuild serve' "
                                                 f"running there?")
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self.connect_timeout)
        except TimeoutError:
            state = self._channel.get_state().name.lower()
            raise ServiceError(self.address,
                               f"cannot connect within {self.connect_timeout:g} s (channel "
                               f"{state}); is 'ocibuild serve' running there?") from None

    async def do_build(self, request: BuildRequest) -> Build:
        stub = self._open()
        await self.wait_ready()
        try:
            msg = await stub.DoBuild(request_to_proto(request), timeout=self.deadline)
        except grpc.aio.AioRpcError as exc:
            raise _translate(self.address, exc, self.deadline) from exc
        try:
            return build_from_proto(msg)
        except RequestError as exc:
            raise ServiceError(self.address, f"the server's Build is malformed: {exc}") from exc

    async def aclose(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()


def _translate(address: str, exc: grpc.aio.AioRpcError,
               deadline: float | None) -> BuildError:
    """A BuildError for a failed DoBuild call (the client's side of the table)."""
    code = exc.code()
    details = exc.details() or ""
    meta: dict[str, str | bytes] = {k: v for k, v in (exc.trailing_metadata() or ())}
    kind = meta.get(_KIND)
    message = meta.get(_MESSAGE)
    message = message.decode(errors="replace") if isinstance(message, bytes) else details
    where = f" (build service {address})"
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        if kind == "request":
            return RequestError(str(meta.get(_FIELD, "request")), str(meta.get(_RULE, "remote")),
                                message + where)
        return RequestError("request", "refused-by-server", details + where)
    if code is grpc.StatusCode.INTERNAL and kind in ("build-failed", None):
        return BuildFailed(str(meta.get(_KEY, "remote")), message + where,
                           stage=str(meta.get(_STAGE) or "") or None)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return BuildFailed("remote", f"no result within the deadline of {deadline:g} s; the "
                                     f"server cancels the build{where}" if deadline else
                           f"deadline exceeded{where}")
    if code is grpc.StatusCode.UNAVAILABLE:
        if kind == "shutdown":
            return ServiceError(address, f"{details} (retry once it is back)")
        return ServiceError(address, f"unavailable: {details}")
    return ServiceError(address, f"DoBuild failed with {code.name}: {details}")


def open_grpc_build_service(address: str) -> GrpcBuildService:
    """The build service at a ``grpc+...`` address (entry point of
    :func:`stages.service.open_build_service`)."""
    return GrpcBuildService(address)

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
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from stages.errors import (
    BuildError,
    BuildFailed,
    RequestError,
    ServiceError,
    SpecError,
    cause_of,
)

# rpc_build_pb2 registers the service's descriptor (rpc_build_pb2_grpc does not
# import it), which server reflection looks up in the default pool.
from stages.proto import build_pb2, rpc_build_pb2, rpc_build_pb2_grpc
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

__all__ = ["BUILD_SERVICE_NAME", "BuildServicer", "GrpcBuildService", "add_build_servicer",
           "event_from_proto", "event_to_proto"]

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
        req = await self._accept(request, context)
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
        except BuildError as exc:
            await self._abort_failure(context, exc)
        except Exception as exc:
            log.exception("DoBuild failed unexpectedly")
            await _abort(context, grpc.StatusCode.INTERNAL,
                         f"internal error of the build service: {type(exc).__name__}: {exc}",
                         {_KIND: "service"}, self._hidden)
        finally:
            self._builds.discard(task)
        return build_to_proto(build)

    async def _accept(self, request: build_pb2.BuildRequest,
                      context: grpc.aio.ServicerContext) -> BuildRequest:
        """The validated request, or the call ended (shutting down, refused)."""
        if self._closing:
            await _abort(context, grpc.StatusCode.UNAVAILABLE,
                         "the build service is shutting down", {_KIND: "shutdown"})
        try:
            return validate_request(request_from_proto(request))
        except RequestError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc),
                         {_KIND: "request", _FIELD: exc.field, _RULE: exc.rule,
                          _MESSAGE: exc.detail.encode()}, self._hidden)
            raise  # abort raises; for the type checker

    async def _abort_refusal(self, context: grpc.aio.ServicerContext, exc: BuildError) -> None:
        """End the call with INVALID_ARGUMENT/FAILED_PRECONDITION if ``exc`` is a
        refusal of the request (after validation: an input not in the store,
        a policy, an env value the spec cannot carry); return otherwise."""
        cause = _refusal(exc) if isinstance(exc, BuildFailed) else None
        if cause is None:
            return
        code = (grpc.StatusCode.FAILED_PRECONDITION
                if getattr(cause, "rule", "") in _PRECONDITIONS
                else grpc.StatusCode.INVALID_ARGUMENT)
        await _abort(context, code, str(cause),
                     {_KIND: "request", _FIELD: cause.field, _RULE: cause.rule,
                      _MESSAGE: cause.detail.encode()}, self._hidden)

    async def _abort_failure(self, context: grpc.aio.ServicerContext, exc: BuildError) -> None:
        await self._abort_refusal(context, exc)
        if isinstance(exc, BuildFailed):
            await _abort(context, grpc.StatusCode.INTERNAL, str(exc),
                         {_KIND: "build-failed", _KEY: exc.key, _STAGE: exc.stage or "",
                          _MESSAGE: exc.message.encode()}, self._hidden)
        await _abort(context, grpc.StatusCode.INTERNAL, str(exc),
                     {_KIND: "service", _MESSAGE: str(exc).encode()}, self._hidden)

    async def DoBuildStream(self, request: build_pb2.BuildRequest,  # noqa: N802 - gRPC's name
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[rpc_build_pb2.BuildEvent]:
        """DoBuild, streaming the build's events; closing the stream cancels the build."""
        from stages.service.events import final_event

        req = await self._accept(request, context)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        emit = _BoundedLogs(queue.put_nowait)
        task = asyncio.create_task(self.service.stream_build(req, emit))
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        self._builds.add(task)
        try:
            while (event := await queue.get()) is not None:
                emit.sent(event)
                yield event_to_proto(event, self._hidden)
            while not queue.empty():  # what was emitted after the last wake-up
                if (event := queue.get_nowait()) is not None:
                    yield event_to_proto(event, self._hidden)
            try:
                result: Build | BuildError = task.result()
            except asyncio.CancelledError:
                if self._closing:
                    await _abort(context, grpc.StatusCode.UNAVAILABLE,
                                 "the build service is shutting down; the build was "
                                 "cancelled", {_KIND: "shutdown"})
                raise
            except BuildError as exc:
                await self._abort_refusal(context, exc)
                result = exc
            except Exception as exc:
                log.exception("DoBuildStream failed unexpectedly")
                result = BuildError(f"internal error of the build service: "
                                    f"{type(exc).__name__}: {exc}")
            yield event_to_proto(final_event(result), self._hidden)
        finally:
            # The client closed the stream (or the server stops): the build is
            # cancelled and its teardown done before the handler ends.
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._builds.discard(task)

    async def shutdown(self) -> None:
        """Refuse new builds, cancel running ones and wait for their teardown."""
        self._closing = True
        tasks = list(self._builds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


#: Builder output a stream holds for a slow client before it drops lines
#: (the run's log file keeps them all).
STREAM_LOG_BUDGET = 16 << 20


class _BoundedLogs:
    """``emit`` for one stream: passes every event on, but builder lines only
    while fewer than STREAM_LOG_BUDGET bytes of them wait for the client; the
    lines dropped meanwhile are announced by one stderr line when it catches up.
    Stage and final events are never dropped, so a hostile builder's output
    cannot grow the server without bound."""

    def __init__(self, put: Callable[[Any], None]) -> None:
        self.put = put
        self.waiting = 0
        self.dropped = 0

    def __call__(self, event: Any) -> None:
        from stages.service.events import LogLine

        if isinstance(event, LogLine):
            if self.waiting + _cost(event) > STREAM_LOG_BUDGET:
                self.dropped += 1
                return
            self.announce()
            self.waiting += _cost(event)
        else:
            self.announce()
        self.put(event)

    def announce(self) -> None:
        """Tell the client how many lines it missed, if it missed any."""
        from stages.service.events import LogLine

        if self.dropped:
            note = (f"[ocibuild: {self.dropped} lines of builder output were not streamed "
                    f"(the client read too slowly); the run's log has them]\n").encode()
            self.dropped = 0
            event = LogLine(stream="stderr", data=note)
            self.waiting += _cost(event)
            self.put(event)

    def sent(self, event: Any) -> None:
        from stages.service.events import LogLine

        if isinstance(event, LogLine):
            self.waiting -= _cost(event)


def _cost(event: Any) -> int:
    """What a queued line costs the server: its bytes and the event around them."""
    return len(event.data) + 128


def _refusal(exc: BaseException) -> RequestError | SpecError | None:
    """The RequestError or SpecError a failed build's stage raised, if any
    (through the stage's own wrapping: BuildFailed <- StageFailed <- it)."""
    found = cause_of(exc.__cause__, (RequestError, SpecError)) if exc.__cause__ else None
    assert found is None or isinstance(found, RequestError | SpecError)
    return found


def _current_cancelling() -> bool:
    """Whether the handler itself was cancelled (not only the build task under it)."""
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())


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


_STREAMS = {"stdout": rpc_build_pb2.BuildEvent.Log.STDOUT,
            "stderr": rpc_build_pb2.BuildEvent.Log.STDERR}
_STATES = {"started": rpc_build_pb2.BuildEvent.Stage.STARTED,
           "finished": rpc_build_pb2.BuildEvent.Stage.FINISHED,
           "failed": rpc_build_pb2.BuildEvent.Stage.FAILED,
           "cancelled": rpc_build_pb2.BuildEvent.Stage.CANCELLED}


def event_to_proto(event: Any, hidden: Sequence[str] = ()) -> rpc_build_pb2.BuildEvent:
    """A :mod:`stages.service.events` value as a BuildEvent message (server paths cut)."""
    from stages.service import events as ev

    msg = rpc_build_pb2.BuildEvent(time=event.time)
    if isinstance(event, ev.Started):
        msg.started.build_id = event.build_id
    elif isinstance(event, ev.StageChanged):
        msg.stage.name = event.name
        msg.stage.state = _STATES[event.state]
        msg.stage.elapsed = event.elapsed
    elif isinstance(event, ev.LogLine):
        msg.log.stream = _STREAMS.get(event.stream, rpc_build_pb2.BuildEvent.Log.STDOUT)
        msg.log.data = event.data
    elif isinstance(event, ev.Finished):
        msg.finished.build.CopyFrom(build_to_proto(event.build))
    elif isinstance(event, ev.Failed):
        msg.failed.stage = event.stage
        msg.failed.message = _redact(event.message, hidden)
        if event.exit_code is not None:
            msg.failed.exit_code = event.exit_code
    else:
        raise TypeError(f"not a build event: {event!r}")
    return msg


def event_from_proto(msg: rpc_build_pb2.BuildEvent) -> Any:
    """A BuildEvent message as a :mod:`stages.service.events` value
    (RequestError if it is malformed)."""
    from stages.service import events as ev

    which = msg.WhichOneof("event")
    if which == "started":
        return ev.Started(build_id=msg.started.build_id, time=msg.time)
    if which == "stage":
        states = {v: k for k, v in _STATES.items()}
        if msg.stage.state not in states:
            raise RequestError("event.stage.state", "unknown-state",
                               f"unknown stage state {msg.stage.state}")
        return ev.StageChanged(name=msg.stage.name, state=states[msg.stage.state],
                               elapsed=msg.stage.elapsed, time=msg.time)
    if which == "log":
        stream = "stderr" if msg.log.stream == rpc_build_pb2.BuildEvent.Log.STDERR else "stdout"
        return ev.LogLine(stream=stream, data=msg.log.data, time=msg.time)
    if which == "finished":
        return ev.Finished(build=build_from_proto(msg.finished.build), time=msg.time)
    if which == "failed":
        code = msg.failed.exit_code if msg.failed.HasField("exit_code") else None
        return ev.Failed(stage=msg.failed.stage, message=msg.failed.message, exit_code=code,
                         time=msg.time)
    raise RequestError("event", "empty-event", "a BuildEvent with no event set")


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

    async def stream_build(self, request: BuildRequest,
                           emit: Callable[[Any], None]) -> Build:
        """DoBuildStream: each event passed to ``emit`` as it arrives; the Build,
        or BuildFailed from the stream's ``failed``. A server without the
        extension (tvix) gets DoBuild, and nothing is emitted meanwhile."""
        from stages.service import events as ev

        stub = self._open()
        await self.wait_ready()
        call = stub.DoBuildStream(request_to_proto(request), timeout=self.deadline)
        build_id = "remote"
        received = False
        try:
            async for msg in call:
                received = True
                try:
                    event = event_from_proto(msg)
                except RequestError as exc:
                    raise ServiceError(self.address,
                                       f"the server sent a malformed event: {exc}") from exc
                if isinstance(event, ev.Started):
                    build_id = event.build_id
                if isinstance(event, ev.Finished):
                    return event.build
                if isinstance(event, ev.Failed):
                    raise BuildFailed(build_id, f"{event.message} (build service "
                                                f"{self.address})", stage=event.stage or None)
                emit(event)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED and not received:
                return await self.do_build(request)  # a server without the extension
            raise _translate(self.address, exc, self.deadline) from exc
        finally:
            call.cancel()  # a no-op once the call ended; else the server cancels the build
        raise ServiceError(self.address, "the build stream ended without finished or failed")

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


def open_grpc_build_service(address: str, **kw: Any) -> GrpcBuildService:
    """The build service at a ``grpc+...`` address (entry point of
    :func:`stages.service.open_build_service`); ``kw``: connect_timeout,
    deadline. The build options of a local service (jobs, policy, stores)
    are the server's: refused here."""
    unknown = sorted(set(kw) - {"connect_timeout", "deadline"})
    if unknown:
        raise ServiceError(address, f"{', '.join(unknown)}: set on the server "
                                    f"('ocibuild serve'), not by its clients")
    return GrpcBuildService(address, **kw)

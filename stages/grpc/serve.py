"""``ocibuild serve``: castore and the build service over gRPC, on one server.

One ``grpc.aio`` server answers, on every listen address:

- ``tvix.castore.v1.BlobService`` and ``tvix.castore.v1.DirectoryService``
  over the store given (or the embedded local store);
- ``tvix.build.v1.BuildService`` over an :class:`~stages.service.OciBuildService`
  (state directory, ``jobs`` concurrent builds) building from that store;
- ``grpc.health.v1.Health`` (SERVING for ``""`` and each service name;
  NOT_SERVING once shutdown starts) and server reflection
  (``grpc.reflection.v1alpha.ServerReflection``) for standard tooling.

Listen addresses are ``unix:///abs/path`` or ``host:port`` (``[::1]:port``
for IPv6; port 0 picks a free port, and the ready line says which). When
everything listens, one line goes to stdout:
``ocibuild: serving on ADDR[, ADDR...]`` (with ``unix://`` and
``grpc+unix://``-style clients in mind, addresses as given, ports resolved).

Run records are pruned (:mod:`stages.service.prune`): once at start, then
every ``prune_interval`` seconds (default hourly), in a background task; by
default the newest 1000 runs stay, none last active over 7 days ago, and a
running run always stays. Each prune that removed something prints one line
on stderr. Shutdown stops a prune under way after its current run.

Shutdown (SIGTERM, SIGINT, or the ``stop`` event): health turns NOT_SERVING,
new builds get UNAVAILABLE, running builds are cancelled and their teardown
runs to the end (containers killed and deleted, mounts and bundles removed),
castore calls in flight get a short grace, then the service and the store
close and the socket files are removed. The store stays consistent: blobs
and directories become visible only when complete.

Caveats:

- A unix socket path that exists is removed at start when nothing answers
  on it (a dead server's leftover); a live server there, or a file that is
  not a socket, is refused.
- ``memory://`` stores are refused: the build service's mount server opens
  the store by address, and would not see this process's memory store.
- No TLS on the listening side; put a TLS proxy in front for grpc+https.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import grpc

from stages.errors import ServiceError
from stages.policy import DEFAULT_SERVE_TIMEOUT, Policy
from stages.service.prune import (
    PRUNE_INTERVAL,
    SERVE_KEEP,
    SERVE_OLDER_THAN,
    PruneReport,
    PruneSettings,
)

__all__ = ["ListenAddress", "parse_listen_address", "serve"]

# Build requests may carry additional_files; castore messages are chunked.
MAX_MESSAGE = 128 << 20
CASTORE_SERVICE_NAMES = ("tvix.castore.v1.BlobService", "tvix.castore.v1.DirectoryService")
SHUTDOWN_GRACE = 3.0
#: The longest a build of a remote client may run, by default (seconds).
DEFAULT_TIMEOUT = DEFAULT_SERVE_TIMEOUT
#: What a build farm keeps of its run records, by default.
DEFAULT_PRUNE = PruneSettings(keep=SERVE_KEEP, older_than=SERVE_OLDER_THAN)


@attrs.frozen(kw_only=True)
class ListenAddress:
    """One place to listen: a unix socket path, or a TCP host and port."""

    text: str
    unix_path: Path | None = None
    host: str | None = None
    port: int | None = None

    @property
    def bind(self) -> str:
        """The address as grpc's add_insecure_port takes it."""
        if self.unix_path is not None:
            return f"unix://{self.unix_path}"
        return f"{self.host}:{self.port}"

    def shown(self, port: int) -> str:
        if self.unix_path is not None:
            return f"unix://{self.unix_path}"
        return f"{self.host}:{port}"


def parse_listen_address(text: str) -> ListenAddress:
    """``unix:///abs/path`` or ``host:port``; ServiceError naming what is wrong."""
    if text.startswith("unix:"):
        url = urllib.parse.urlsplit(text)
        if url.netloc or not url.path.startswith("/") or url.query or url.fragment:
            raise ServiceError(text, "a unix listen address needs an absolute path: "
                                     "unix:///abs/path")
        return ListenAddress(text=text, unix_path=Path(url.path))
    if "://" in text:
        raise ServiceError(text, "listen on unix:///abs/path or host:port (no other scheme)")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ServiceError(text, "listen on unix:///abs/path or host:port")
    if host.startswith("[") != host.endswith("]"):
        raise ServiceError(text, "an IPv6 host goes in brackets: [::1]:port")
    if not port.isdigit() or int(port) > 65535:
        raise ServiceError(text, f"port {port!r} is not a number from 0 to 65535")
    return ListenAddress(text=text, host=host, port=int(port))


def _prepare_unix_socket(path: Path) -> None:
    """Remove a dead server's socket file; refuse a live one or a non-socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ServiceError(f"unix://{path}",
                               f"the directory {path.parent} does not exist") from None
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServiceError(f"unix://{path}", "exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: nothing listens
        return
    except OSError as exc:
        raise ServiceError(f"unix://{path}", f"cannot probe the existing socket: "
                                             f"{exc.strerror or exc}") from exc
    finally:
        probe.close()
    raise ServiceError(f"unix://{path}", "another server is live on this socket")


def _refuse_memory(address: str | None, what: str) -> None:
    if address and address.startswith("memory:"):
        raise ServiceError(address, f"{what}: a memory:// store cannot be served (the build "
                                    f"service's mount server opens the store by address and "
                                    f"would see another, empty store); use local:///abs/dir")


def _print_ready(addresses: Sequence[str]) -> None:
    print(f"ocibuild: serving on {', '.join(addresses)}", flush=True)


def _print_pruned(report: PruneReport) -> None:
    if report.removed:
        n, b = len(report.removed), report.bundles
        print(f"ocibuild: pruned {n} run{'' if n == 1 else 's'} and {b} "
              f"bundle{'' if b == 1 else 's'} ({report.settings.describe()}); kept {report.kept}"
              + (f", spared {len(report.spared)} running" if report.spared else ""),
              file=sys.stderr, flush=True)
    for line in report.errors:
        print(f"ocibuild: prune: {line}", file=sys.stderr, flush=True)


def _print_prune_failed(exc: BaseException) -> None:
    print(f"ocibuild: prune failed: {exc}", file=sys.stderr, flush=True)


async def serve(listen: Sequence[str], *, state_dir: Path | str | None = None,
                blob_address: str | None = None, directory_address: str | None = None,
                jobs: int | None = None, policy: Policy | None = None,
                timeout: float | None = DEFAULT_TIMEOUT,
                prune: PruneSettings | None = DEFAULT_PRUNE,
                prune_interval: float = PRUNE_INTERVAL, stop: asyncio.Event | None = None,
                ready: Callable[[list[str]], None] | None = None,
                handle_signals: bool = True, grace: float = SHUTDOWN_GRACE) -> int:
    """Serve castore and builds until SIGTERM/SIGINT (or ``stop`` is set); return 0.

    ``policy`` is what remote requests may have (default: the defaults of
    :class:`~stages.policy.Policy`, no host paths, no network); ``timeout``
    bounds every build (default :data:`DEFAULT_TIMEOUT`; None: unbounded).
    ``prune`` is what of the run records to keep (default
    :data:`DEFAULT_PRUNE`; None: no pruning), pruned at start and every
    ``prune_interval`` seconds.
    ``ready`` receives the addresses listened on, once serving (default:
    print the ready line). With ``handle_signals``, SIGTERM and SIGINT
    start the shutdown described in the module docstring.
    """
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from stages.castore.addresses import open_castore
    from stages.grpc.build_service import BUILD_SERVICE_NAME, add_build_servicer
    from stages.grpc.castore_server import add_castore_servicers
    from stages.service import OciBuildService, default_state_dir
    from stages.service.prune import prune_periodically

    if not listen:
        raise ServiceError("serve", "nothing to listen on: give at least one --listen ADDR")
    addresses = [parse_listen_address(a) for a in listen]
    _refuse_memory(blob_address, "blob service")
    _refuse_memory(directory_address, "directory service")
    for a in addresses:
        if a.unix_path is not None:
            _prepare_unix_socket(a.unix_path)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if handle_signals:
        def on_signal(sig: signal.Signals) -> None:
            if not stop.is_set():
                print(f"ocibuild: {sig.name}: shutting down; cancelling running builds",
                      file=sys.stderr, flush=True)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)

    bound: list[Path] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            castore = open_castore(blob_address, directory_address)
            stack.push_async_callback(castore.aclose)
            svc = OciBuildService(state_dir or default_state_dir(), blob_address=blob_address,
                                  directory_address=directory_address, jobs=jobs,
                                  policy=policy, timeout=timeout)
            await stack.enter_async_context(svc)

            server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                              ("grpc.max_send_message_length", MAX_MESSAGE)])
            add_castore_servicers(server, castore)
            servicer = add_build_servicer(server, svc)
            health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            names = [*CASTORE_SERVICE_NAMES, BUILD_SERVICE_NAME]
            for name in ("", *names):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            reflection.enable_server_reflection(
                [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

            shown = []
            for a in addresses:
                try:
                    port = server.add_insecure_port(a.bind)
                except RuntimeError as exc:
                    raise ServiceError(a.text, f"cannot listen: {exc}") from exc
                if not port and a.unix_path is None:
                    raise ServiceError(a.text, "cannot listen (address in use or not local?)")
                if a.unix_path is not None:
                    bound.append(a.unix_path)
                shown.append(a.shown(port))
            await server.start()
            pruning = None
            if prune is not None:
                pruning = asyncio.create_task(prune_periodically(
                    svc.state_dir, prune, interval=prune_interval, on_report=_print_pruned,
                    on_error=_print_prune_failed), name="ocibuild-prune")
            try:
                (ready or _print_ready)(shown)
                await stop.wait()
            finally:
                if pruning is not None:  # stops after the run it is removing, if any
                    pruning.cancel()
                    await asyncio.gather(pruning, return_exceptions=True)
                # Order matters: refuse and cancel builds first (their handlers
                # answer UNAVAILABLE), then stop the server with a grace for
                # castore calls in flight, then close the service (exit stack).
                await health_servicer.enter_graceful_shutdown()
                await servicer.shutdown()
                await server.stop(grace)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        for path in bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return 0

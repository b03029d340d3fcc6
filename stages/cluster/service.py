"""A Ray cluster as a build service: :class:`RayBuildService` (``ray://`` addresses).

``ray://auto`` joins the cluster this machine is part of (``ray.init("auto")``:
``$RAY_ADDRESS``, else the local cluster); ``ray://HOST:PORT`` goes through
Ray Client. On :meth:`~RayBuildService.start` the service starts one
:class:`~stages.cluster.node.BuildNode` actor on every alive node that
offers the custom resource ``ocibuild`` (``ray start --resources
'{"ocibuild": N}'``: N containers at once), pinned there and holding all N.

Each build is one actor call, placed here, by the client:

- a build goes to a node with a free slot, preferring the node that already
  holds most of its inputs (it built them, or fetched them for an earlier
  build: soft affinity), else the least busy node, so builds spread;
- a build waits here while every node is full (so cancelling it costs
  nothing on the cluster);
- a node lost mid-build (its actor or raylet died): its builds run again on
  another node; the node is dropped, and taken up again when the cluster
  shows it alive (a new actor, whose service first cleans up after the dead
  one on the node's state directory);
- cancelling a build (the caller's task cancelled: Ctrl-C, SIGTERM)
  cancels its actor call and waits until the node's teardown is done.

Inputs and outputs go through the castore every node reaches
(``blob_address``, ``directory_address``: for example ``ocibuild serve``
on the head node); each node keeps a cache of it in its state directory.

Caveats:

- Ray runs any code a client sends, as the user its raylets run as: a Ray
  cluster is for trusted clients only. Here the client is the operator:
  its policy (host paths, network, limits) applies on every node.
- An actor holds all of its node's ``ocibuild`` resource while the service
  is open; a second client's builds wait until the first closes.
- A build that a lost node was running starts again from nothing on
  another node (builds are hermetic: same inputs, same outputs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from stages.errors import ServiceError
from stages.service import BuildService

if TYPE_CHECKING:
    from stages.policy import Policy
    from stages.request import Build, BuildRequest

__all__ = ["RESOURCE", "RayBuildService", "open_ray_build_service"]

log = logging.getLogger(__name__)

#: The custom resource a node offers builds with; its value: containers at once.
RESOURCE = "ocibuild"
#: The Ray namespace of the service's actors.
NAMESPACE = "ocibuild"
#: How long a cancelled build may take to tear down on its node.
CANCEL_WAIT = 30.0
#: How often a cancel is sent again while the build has not ended.
CANCEL_AGAIN = 3.0
#: Connections through Ray Client tried before giving up (see RayBuildService._connect).
CLIENT_TRIES = 3
#: How long the start waits for the other nodes once one is up.
OTHERS_WAIT = 10.0
#: How often the list of nodes is read again while a build waits for one.
REFRESH_EVERY = 2.0


@attrs.define(eq=False)
class _Node:
    node_id: str
    slots: int
    actor: Any
    starting: asyncio.Future[dict[str, Any] | None] | None = None
    info: dict[str, Any] | None = None
    running: int = 0
    lost: bool = False
    error: str = ""
    #: Digests of the inputs and outputs this node holds (built or fetched).
    holds: set[bytes] = attrs.field(factory=set)
    builds: int = 0

    @property
    def usable(self) -> bool:
        return self.info is not None and not self.lost

    @property
    def coming(self) -> bool:
        """Usable, or its service still starting."""
        return self.usable or (self.starting is not None and not self.starting.done())

    @property
    def short(self) -> str:
        return self.node_id[:12]


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # the optional dependency (pip install 'ocibuild[ray]')
        raise ServiceError("ray://", f"ray is not installed ({exc}); install "
                                     f"'ocibuild[ray]'") from None
    return ray


class RayBuildService(BuildService):
    """Builds on the nodes of a Ray cluster; see the module docstring.

    ``jobs`` caps this client's builds in flight across the cluster (None:
    the nodes' slots). ``connect_timeout`` bounds the wait for a first node.
    """

    def __init__(self, address: str, *, blob_address: str | None,
                 directory_address: str | None, policy: Policy | None = None,
                 timeout: float | None = None, state_dir: str | None = None,
                 connect_timeout: float = 60.0) -> None:
        url = urllib.parse.urlsplit(address)
        if url.scheme != "ray" or not url.netloc or url.path not in ("", "/"):
            raise ServiceError(address, "a Ray address is ray://auto or ray://HOST:PORT "
                                        "(Ray Client)")
        if not blob_address or not directory_address:
            raise ServiceError(address, "builds on Ray need a castore every node reaches: "
                                        "give --blob-service-addr and --directory-service-addr "
                                        "(for example grpc+http://HEAD:PORT of 'ocibuild serve')")
        for what, addr in (("blob", blob_address), ("directory", directory_address)):
            if addr.startswith("memory:"):
                raise ServiceError(address, f"the {what} store {addr} lives in this process; "
                                            f"the nodes cannot reach it")
        self.address = address
        self.ray_address = "auto" if url.netloc == "auto" else f"ray://{url.netloc}"
        self.blob_address = blob_address
        self.directory_address = directory_address
        self.policy = policy
        self.timeout = timeout
        self.state_dir = state_dir
        self.connect_timeout = connect_timeout
        self.nodes: dict[str, _Node] = {}
        self._changed: asyncio.Condition | None = None
        self._we_started_ray = False
        self._refreshed = 0.0
        self._closed = False

    # -- lifetime -----------------------------------------------------------------

    async def __aenter__(self) -> RayBuildService:
        await self.start()
        return self

    async def start(self) -> None:
        """Connect and start the nodes' services; ServiceError when none starts."""
        ray = _ray()
        self._changed = asyncio.Condition()
        if not ray.is_initialized():
            await self._connect(ray)
            self._we_started_ray = True
        try:
            await self._refresh()
            if not self.nodes:
                raise ServiceError(self.address, f"no alive node of the cluster offers the "
                                                 f"{RESOURCE!r} resource (ray start --resources "
                                                 f"'{{\"{RESOURCE}\": N}}' or ocibuild ray-worker)")
            await self._wait_first_node()
        except BaseException:
            await self.aclose()
            raise

    async def _connect(self, ray: Any) -> None:
        """ray.init, in a thread (in the main one it would take SIGTERM from us).

        Ray Client's server side fails a few percent of first connections
        ("Initialization failure from server", ray-project/ray#63202): those
        are tried again, up to :data:`CLIENT_TRIES` times.
        """
        logging.getLogger("ray").setLevel(logging.ERROR)  # its notes are not ours to print
        for attempt in range(1, CLIENT_TRIES + 1):
            try:
                await asyncio.to_thread(
                    ray.init, address=self.ray_address, namespace=NAMESPACE,
                    logging_level=logging.ERROR, log_to_driver=False, configure_logging=False)
                return
            except ConnectionAbortedError as exc:
                if attempt == CLIENT_TRIES or not self.ray_address.startswith("ray://"):
                    raise ServiceError(self.address, f"cannot connect to the Ray cluster: "
                                                     f"{_one_line(exc)}") from None
                await asyncio.sleep(0.5 * attempt)
            except Exception as exc:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError...
                raise ServiceError(self.address, f"cannot connect to the Ray cluster: "
                                                 f"{_one_line(exc)}") from None

    async def _wait_first_node(self) -> None:
        """Until a node is up, then a little longer for the others
        (:data:`OTHERS_WAIT`), so that the first builds spread."""
        starting = [n.starting for n in self.nodes.values() if n.starting is not None]
        deadline = time.monotonic() + self.connect_timeout
        while not any(n.usable for n in self.nodes.values()):
            pending = [t for t in starting if not t.done()]
            if not pending:
                errors = "; ".join(f"{n.short}: {n.error}" for n in self.nodes.values())
                raise ServiceError(self.address, f"no node's build service started ({errors})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServiceError(self.address, f"no node's build service started within "
                                                 f"{self.connect_timeout:g} s (are the nodes' "
                                                 f"{RESOURCE!r} resources held by another "
                                                 f"client?)")
            await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        pending = [t for t in starting if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=min(OTHERS_WAIT, self.connect_timeout))

    async def aclose(self) -> None:
        """Stop every node's service (waiting for its teardown) and let go of Ray."""
        if self._closed:
            return
        self._closed = True
        ray = _ray()
        nodes = list(self.nodes.values())
        for node in nodes:
            if node.starting is not None and not node.starting.done():
                node.starting.cancel()
        stops = [asyncio.ensure_future(_await_ref(node.actor.stop.remote()))
                 for node in nodes if node.usable]
        if stops:
            _done, late = await asyncio.wait(stops, timeout=CANCEL_WAIT)
            if late:
                log.warning("%d node(s) did not stop their build service within %g s; "
                            "killing their actors (the next service there cleans up)",
                            len(late), CANCEL_WAIT)
        for node in nodes:
            with contextlib.suppress(Exception):
                ray.kill(node.actor, no_restart=True)
        self.nodes.clear()
        if self._we_started_ray and ray.is_initialized():
            await asyncio.to_thread(ray.shutdown)

    # -- nodes --------------------------------------------------------------------

    async def _refresh(self) -> None:
        """Start an actor on each alive node that offers the resource and has none."""
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from stages.cluster.node import BuildNode, NodeConfig

        self._refreshed = time.monotonic()
        listed = await asyncio.to_thread(ray.nodes)
        alive = {n["NodeID"]: int(n.get("Resources", {}).get(RESOURCE, 0))
                 for n in listed if n.get("Alive")}
        for node_id, node in list(self.nodes.items()):
            if node_id not in alive and not node.lost:
                self._lose(node, "the node left the cluster")
        for node_id, slots in alive.items():
            if slots < 1 or node_id in self.nodes:
                continue
            config = NodeConfig(blob_address=self.blob_address,
                                directory_address=self.directory_address, jobs=slots,
                                policy=self.policy, timeout=self.timeout,
                                state_dir=self.state_dir)
            actor = ray.remote(BuildNode).options(
                resources={RESOURCE: slots}, num_cpus=0, max_restarts=0,
                max_concurrency=1000, max_task_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(config)
            node = _Node(node_id=node_id, slots=slots, actor=actor)
            node.starting = asyncio.ensure_future(self._start_node(node))
            self.nodes[node_id] = node

    async def _start_node(self, node: _Node) -> dict[str, Any] | None:
        try:
            info = await _await_ref(node.actor.start.remote())
        except Exception as exc:  # noqa: BLE001 - what the node raised, told and kept
            node.lost = True  # kept in self.nodes: not started there again
            node.error = _one_line(exc)
            log.warning("ray node %s: the build service did not start: %s", node.short,
                        node.error)
            await self._notify()
            return None
        node.info = info
        if info.get("cleaned"):
            log.info("ray node %s cleaned up after dead instances: %s", node.short,
                     info["cleaned"])
        await self._notify()
        return info

    def _lose(self, node: _Node, why: str) -> None:
        if not node.lost:
            log.warning("ray node %s lost: %s", node.short, why)
        node.lost = True
        # A node that comes back (same id, alive again) gets a new actor.
        self.nodes.pop(node.node_id, None)

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _acquire(self, request: BuildRequest) -> _Node:
        """A node with a free slot for ``request`` (waits while all are full)."""
        assert self._changed is not None
        wanted = {d for n in request.inputs if (d := getattr(n, "digest", None))}
        async with self._changed:
            while True:
                if self._closed:
                    raise ServiceError(self.address, "the build service is closed")
                free = [n for n in self.nodes.values() if n.usable and n.running < n.slots]
                if free:
                    node = max(free, key=lambda n: (len(wanted & n.holds),
                                                    -n.running / n.slots, -n.builds))
                    node.running += 1
                    return node
                if not any(n.coming for n in self.nodes.values()):
                    await self._refresh()
                    if not any(n.coming for n in self.nodes.values()):
                        raise ServiceError(self.address, f"no node offering {RESOURCE!r} is "
                                                         f"left in the cluster")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), REFRESH_EVERY)
                if time.monotonic() - self._refreshed > REFRESH_EVERY:
                    await self._refresh()

    async def _release(self, node: _Node) -> None:
        node.running -= 1
        await self._notify()

    # -- building -----------------------------------------------------------------

    async def do_build(self, request: BuildRequest) -> Build:
        return await self.stream_build(request, lambda _event: None)

    async def stream_build(self, request: BuildRequest,
                           emit: Callable[[Any], None]) -> Build:
        """Build on some node, passing its events to ``emit``; again elsewhere
        when the node is lost meanwhile."""
        ray = _ray()
        from stages.request import request_to_proto
        from stages.service.events import LogLine

        if self._changed is None:
            raise ServiceError(self.address, "the service is not started; use it with "
                                             "'async with'")
        wire = request_to_proto(request).SerializeToString()
        attempts = 0
        while True:
            node = await self._acquire(request)
            attempts += 1
            try:
                build = await self._build_on(node, request, wire, emit)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                self._lose(node, _first_line(exc))
                emit(LogLine(stream="stderr", data=(
                    f"[ocibuild: ray node {node.short} was lost mid-build; building again on "
                    f"another node]\n").encode()))
                if attempts > 8:
                    raise ServiceError(self.address, f"the build was lost with {attempts} "
                                                     f"nodes in turn; giving up") from None
                continue
            finally:
                await self._release(node)
            node.builds += 1
            node.holds.update(d for n in (*request.inputs, *build.outputs)
                              if (d := getattr(n, "digest", None)))
            return build

    async def _build_on(self, node: _Node, request: BuildRequest, wire: bytes,
                        emit: Callable[[Any], None]) -> Build:
        from stages.cluster.node import build_from_bytes, raise_outcome
        from stages.grpc.build_service import event_from_proto
        from stages.proto import rpc_build_pb2

        build_id = secrets.token_hex(8)
        ref = node.actor.build.remote(build_id, wire)
        done_ref = asyncio.ensure_future(_await_ref(ref))
        cursor = 0
        try:
            while True:
                poll = asyncio.ensure_future(_await_ref(node.actor.events.remote(build_id,
                                                                                 cursor)))
                await asyncio.wait([poll, done_ref], return_when=asyncio.FIRST_COMPLETED)
                if not poll.done():
                    # The build call ended first: an error (a lost node) shows there.
                    if done_ref.exception() is not None:
                        poll.cancel()
                        raise done_ref.exception()  # type: ignore[misc]
                    await poll
                batch, ended = poll.result()
                for data in batch:
                    emit(event_from_proto(rpc_build_pb2.BuildEvent.FromString(data)))
                cursor += len(batch)
                if ended:
                    break
            outcome = await done_ref
        except asyncio.CancelledError:
            # Cancel the node's build and wait for its teardown, cancelled or not.
            await asyncio.shield(self._cancel_on(node, ref, done_ref))
            raise
        where = f"ray node {node.short}"
        if outcome[0] == "finished":
            return build_from_bytes(outcome[1])
        raise_outcome(outcome[1], outcome[2], where)
        raise AssertionError("unreachable")

    async def _cancel_on(self, node: _Node, ref: Any, done: asyncio.Future[Any]) -> None:
        """Cancel a build call and wait (up to CANCEL_WAIT) until it has ended
        on its node, asking again each CANCEL_AGAIN seconds meanwhile."""
        ray = _ray()
        deadline = time.monotonic() + CANCEL_WAIT
        while not done.done() and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
            await asyncio.wait([done], timeout=CANCEL_AGAIN)
            if not done.done():
                log.warning("ray node %s: a cancelled build is still tearing down",
                            node.short)
        if not done.done():
            done.cancel()
        elif not done.cancelled():
            done.exception()  # retrieved: it was cancelled, or lost with its node

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Per usable node: its state dir, builds here and in the actor, cache misses."""
        out = {}
        for node in list(self.nodes.values()):
            if node.usable:
                assert node.info is not None
                s = await _await_ref(node.actor.stats.remote())
                out[node.node_id] = {**node.info, **s, "client_builds": node.builds}
        return out

    @property
    def slots(self) -> int:
        """Containers the nodes run at once, together (those still starting too)."""
        return sum(n.slots for n in self.nodes.values() if not n.lost) or 1


async def _await_ref(ref: Any) -> Any:
    """An ObjectRef's value, in either Ray mode (a driver's refs are awaitable;
    Ray Client's are got in a thread)."""
    if hasattr(ref, "__await__"):
        return await ref
    ray = _ray()
    return await asyncio.to_thread(ray.get, ref)


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """The whole message of ``exc`` on one line (Ray's span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_ray_build_service(address: str, **kw: Any) -> RayBuildService:
    """The build service of a ``ray://`` address (entry point of
    :func:`stages.service.open_build_service`); ``kw``: blob_address,
    directory_address, policy, timeout, state_dir (default: the store
    addresses of ``$BLOB_SERVICE_ADDR`` and ``$DIRECTORY_SERVICE_ADDR``)."""
    kw.setdefault("blob_address", os.environ.get("BLOB_SERVICE_ADDR"))
    kw.setdefault("directory_address", os.environ.get("DIRECTORY_SERVICE_ADDR"))
    known = {"blob_address", "directory_address", "policy", "timeout", "state_dir",
             "connect_timeout"}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ServiceError(address, f"options a Ray build service does not take: "
                                    f"{', '.join(unknown)}")
    return RayBuildService(address, **kw)


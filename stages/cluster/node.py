"""One node's build service inside a Ray actor: :class:`BuildNode`.

The client (:mod:`stages.cluster.service`) starts one BuildNode per Ray
node that offers the ``ocibuild`` resource, pinned to that node and holding
all of it; the value is how many containers the node runs at once. The
actor holds an :class:`~stages.service.OciBuildService` on the node's state
directory (``$OCIBUILD_STATE`` of the raylet, else the default), so its
FUSE mount server, caps, janitor and crash recovery are those of any
local service: starting it cleans up what a dead instance on that state
directory left (a node lost with its builds, come back).

Stores: the service builds from a local castore in the state directory
(``cache/``), a cache in front of the shared castore every node reaches.
Before a build, what the cache lacks of the request's inputs is fetched
from the shared store (an input the node already has is not fetched
again); after it, the outputs' closures are copied up, so the client and
the other nodes read them there.

Calls (all of them async, so builds run concurrently in the actor's loop):

- :meth:`start` opens the service; :meth:`stop` closes it;
- :meth:`build` runs one build and returns its outcome as plain values
  (:func:`outcome_of`): errors are not raised across Ray, where they would
  arrive wrapped; the client rebuilds them (:func:`raise_outcome`);
- :meth:`events` hands the events of a running build over in batches
  (BuildEvent messages, serialized), waiting a little for new ones: Ray
  Client has no streaming calls, so the client polls.

Cancelling a :meth:`build` call (``ray.cancel``) cancels the build's task
in the actor's loop; the service's teardown (container, mount, bundle)
runs before the call ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from stages.errors import BuildError, BuildFailed, RequestError, ServiceError, SpecError, cause_of

if TYPE_CHECKING:
    from stages.castore.addresses import Castore
    from stages.policy import Policy
    from stages.request import Build
    from stages.service import OciBuildService

__all__ = ["BuildNode", "NodeConfig", "outcome_of", "raise_outcome"]

#: How long :meth:`BuildNode.events` waits for a new event before it answers empty.
POLL_WAIT = 1.0
#: Once there is an event, how long it waits for more to send them together
#: (unless the build ends first): a few calls per build, not one per event.
BATCH_WAIT = 0.05
#: How long a finished build's unread events are kept for a client that went away.
FORGET_AFTER = 60.0


@attrs.frozen(kw_only=True)
class NodeConfig:
    """What the client gives every node: the shared store, the operator's
    policy, limits. ``state_dir`` None: the node's ``$OCIBUILD_STATE`` or
    the default state directory."""

    blob_address: str
    directory_address: str
    jobs: int
    policy: Policy | None = None
    timeout: float | None = None
    state_dir: str | None = None


class _Events:
    """The events of one build, numbered, for :meth:`BuildNode.events`;
    Started names the node (``<node id>:<build key>``)."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self.items: list[bytes] = []
        self.changed = asyncio.Event()
        self.ended = asyncio.Event()
        self.done_at: float | None = None

    def append(self, event: Any) -> None:
        from stages.grpc.build_service import event_to_proto
        from stages.service.events import Started

        if isinstance(event, Started):
            event = attrs.evolve(event, build_id=f"{self.node}:{event.build_id}")
        self.items.append(event_to_proto(event).SerializeToString())
        self.changed.set()


class BuildNode:
    """The actor's class (``ray.remote(BuildNode)`` in :mod:`stages.cluster.service`)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.service: OciBuildService | None = None
        self.shared: Castore | None = None
        self.builds: dict[str, _Events] = {}
        self.node = ""
        self.cached: set[bytes] = set()  # digests whose closure the cache holds
        self.fetching: dict[bytes, asyncio.Future[None]] = {}
        self.fetched = 0  # input nodes copied from the shared store (cache misses)
        self.built = 0
        self.seconds = {"fetch": 0.0, "build": 0.0, "push": 0.0}  # summed over builds

    async def start(self) -> dict[str, Any]:
        """Open the node's service; what the client shows of the node."""
        from stages.castore.addresses import open_castore
        from stages.service import OciBuildService, default_state_dir

        cfg = self.config
        state = Path(cfg.state_dir) if cfg.state_dir else default_state_dir()
        cache = f"local://{state.absolute()}/cache"
        self.shared = open_castore(cfg.blob_address, cfg.directory_address)
        # No run records here: the client keeps each build's (and its log).
        self.service = OciBuildService(state, blob_address=cache, directory_address=cache,
                                       jobs=cfg.jobs, policy=cfg.policy, timeout=cfg.timeout,
                                       keep_runs=False)
        await self.service.__aenter__()
        try:
            import ray

            self.node = ray.get_runtime_context().get_node_id()[:12]
        except Exception:  # noqa: BLE001 - outside Ray (tests): no node id
            self.node = os.uname().nodename
        return {"node": self.node, "state_dir": str(self.service.state_dir), "pid": os.getpid(),
                "jobs": cfg.jobs, "cleaned": list(self.service.cleaned)}

    async def stop(self) -> None:
        service, self.service = self.service, None
        if service is not None:
            await service.aclose()
        if self.shared is not None:
            shared, self.shared = self.shared, None
            await shared.aclose()

    async def stats(self) -> dict[str, Any]:
        """Builds done, inputs fetched (cache misses), builds running, and the
        seconds spent fetching inputs, building and pushing outputs (summed)."""
        return {"built": self.built, "fetched": self.fetched, "running": self.running(),
                "seconds": dict(self.seconds)}

    async def _fetch(self, node: Any) -> None:
        """Make ``node``'s closure present in the cache; builds that need it at
        the same time wait for the same copy."""
        from stages.castore.copy import copy_node

        digest = getattr(node, "digest", None)
        if digest is None or digest in self.cached:
            return
        fetching = self.fetching.get(digest)
        if fetching is None:
            async def copy() -> None:
                assert self.shared is not None and self.service is not None
                assert self.service.host is not None
                if await copy_node(self.shared, self.service.host.castore, node):
                    self.fetched += 1
                self.cached.add(digest)

            fetching = self.fetching[digest] = asyncio.ensure_future(copy())
            fetching.add_done_callback(lambda _f: self.fetching.pop(digest, None))
        await asyncio.shield(fetching)

    def running(self) -> int:
        return sum(1 for e in self.builds.values() if e.done_at is None)

    async def build(self, build_id: str, request: bytes) -> tuple[Any, ...]:
        """Build one serialized BuildRequest: ``("finished", Build bytes, n)``
        or ``("failed", kind, fields, n)``; ``n`` counts the build's events."""
        from stages.castore.copy import copy_node
        from stages.proto import build_pb2
        from stages.request import build_to_proto, request_from_proto
        from stages.validate import validate_request

        events = self.builds.setdefault(build_id, _Events(self.node))
        events.node = self.node
        self._forget_old()
        try:
            if self.service is None or self.shared is None:
                raise ServiceError("ray", "the node's build service is not started")
            try:
                req = validate_request(request_from_proto(
                    build_pb2.BuildRequest.FromString(request)))
            except RequestError:
                raise
            except Exception as exc:  # a message that does not parse
                raise RequestError("request", "parse", f"not a BuildRequest: {exc}") from exc
            host = self.service.host
            assert host is not None
            began = time.perf_counter()
            for node in req.inputs:  # the cache: only what it lacks crosses over
                await self._fetch(node)
            fetched = time.perf_counter()
            build = await self.service.stream_build(req, events.append)
            built = time.perf_counter()
            for node in build.outputs:
                await copy_node(host.castore, self.shared, node)
                if (digest := getattr(node, "digest", None)) is not None:
                    self.cached.add(digest)
            self.seconds["fetch"] += fetched - began
            self.seconds["build"] += built - fetched
            self.seconds["push"] += time.perf_counter() - built
            self.built += 1
            return ("finished", build_to_proto(build).SerializeToString(), len(events.items))
        except BuildError as exc:
            kind, fields = outcome_of(exc)
            return ("failed", kind, fields, len(events.items))
        finally:
            events.done_at = time.monotonic()
            events.changed.set()
            events.ended.set()

    async def events(self, build_id: str, cursor: int,
                     wait: float = POLL_WAIT) -> tuple[list[bytes], bool]:
        """The build's events from ``cursor`` on, and whether it has ended;
        waits up to ``wait`` seconds for one when there is none yet."""
        events = self.builds.setdefault(build_id, _Events(self.node))
        if cursor >= len(events.items) and events.done_at is None:
            events.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(events.changed.wait(), wait)
        if events.done_at is None and cursor < len(events.items):
            with contextlib.suppress(TimeoutError):  # more to come with these
                await asyncio.wait_for(events.ended.wait(), BATCH_WAIT)
        done = events.done_at is not None
        batch = events.items[cursor:]
        if done and cursor + len(batch) >= len(events.items):
            self.builds.pop(build_id, None)  # all read: forget it
        return batch, done

    def _forget_old(self) -> None:
        now = time.monotonic()
        for build_id, events in list(self.builds.items()):
            if events.done_at is not None and now - events.done_at > FORGET_AFTER:
                del self.builds[build_id]


def outcome_of(exc: BuildError) -> tuple[str, dict[str, Any]]:
    """A failed build's error as plain values: ``request`` (a refusal: field,
    rule, detail), ``build-failed`` (key, stage, message, exit code) or
    ``service`` (message)."""
    from stages.service.events import exit_code_of

    refusal = cause_of(exc, (RequestError, SpecError))
    if refusal is not None:
        assert isinstance(refusal, RequestError | SpecError)
        return "request", {"field": refusal.field, "rule": refusal.rule,
                           "detail": refusal.detail}
    if isinstance(exc, BuildFailed):
        return "build-failed", {"key": exc.key, "stage": exc.stage, "message": exc.message,
                                "exit_code": exit_code_of(exc)}
    return "service", {"message": str(exc)}


def raise_outcome(kind: str, fields: dict[str, Any], where: str) -> None:
    """Raise what :func:`outcome_of` described; ``where`` names the node."""
    if kind == "request":
        raise RequestError(fields["field"], fields["rule"], f"{fields['detail']} ({where})")
    if kind == "build-failed":
        raise BuildFailed(fields["key"], f"{fields['message']} ({where})",
                          stage=fields.get("stage"))
    raise ServiceError(where, fields.get("message", "the build failed"))


def build_from_bytes(data: bytes) -> Build:
    from stages.proto import build_pb2
    from stages.request import build_from_proto

    return build_from_proto(build_pb2.Build.FromString(data))

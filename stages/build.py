"""One build as a pipeline graph: validate -> spec -> bundle -> mount -> run -> ingest -> teardown.

:func:`build_graph` turns a :class:`~stages.request.BuildRequest` into a
:class:`pipeline.Graph` whose stage functions live in the stage modules
(``stages.validate``, ``stages.spec``, ``stages.bundle``, ``stages.mount``,
``stages.run``, ``stages.ingest``, ``stages.teardown``). The graph is pure
definition: it can be drawn (``ocibuild graph``) without a service.

What a build needs from its host (a castore, the FUSE mount server, where
bundles and container state live, the id mapping) comes in a
:class:`BuildHost`, made by the build service; stage functions get it and
their :class:`BuildSpec` bound with :func:`functools.partial`, so the graph
digest sees the functions but not the host.

Resources:

- ``inputs`` (shared, kind ``inputs``): the request's inputs added to the
  mount server under the build's key. Acquired by ``mount``, used by ``run``,
  released (the key removed) once ``run`` is done, also on failure or
  cancellation.
- ``container`` (local to ``run``, kind ``container``): one runc container;
  the service caps this kind at its number of jobs.
- ``workspace`` (shared, kind ``workspace``): a slot held from ``bundle``
  through ``ingest``, capped at twice the jobs (:func:`build_caps`), so a
  long queue of builds prepares its bundles just in time.

Caveats:

- ``teardown`` runs whatever happened upstream. It removes the bundle unless
  the build is kept: ``keep="always"``, or ``keep="failed"`` and some stage
  did not finish. A run stopped with ``stop_after`` never reaches teardown,
  so its bundle stays for inspection and ``resume``.
- The key names the build on this host: mount subtree, container id and
  bundle directory. It must be unique among live builds of one host.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal, Sequence

import attrs

from pipeline import Caps, Graph, Resource, Stage
from stages.oci.layout import BundleLayout
from stages.request import BuildRequest, request_to_proto

if TYPE_CHECKING:
    from stages.castore.addresses import Castore
    from stages.castore.fuse import MountServer
    from stages.oci.idmap import IdMap

__all__ = ["STAGE_NAMES", "BuildHost", "BuildSpec", "build_caps", "build_graph",
           "graph_for_requests",
           "request_from_result", "request_of", "request_to_result"]

STAGE_NAMES = ("validate", "spec", "bundle", "mount", "run", "ingest", "teardown")
GRAPH_VERSION = "ocibuild-build-1"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Shared root file systems a service keeps at most (each a few dozen
#: inodes on the runtime tmpfs, kept until the service stops); a build with
#: a root not among them when the cap is reached gets its own.
MAX_SHARED_ROOTS = 512

Keep = Literal["never", "failed", "always"]


@attrs.frozen(kw_only=True)
class BuildSpec:
    """What one build is: the request, its key, and how to treat its bundle.

    The request is either given (``request``) or made by another stage of
    the same graph (``request_from``, that stage's full name; its result is
    :func:`request_to_result` of a BuildRequest), for builds whose inputs
    are the outputs of earlier builds. The composer of the graph links
    ``<key>/validate`` after that stage (:func:`graph_for_requests` does).
    Stages read the request with :func:`request_of`.
    """

    request: BuildRequest | None = None
    key: str = attrs.field()
    keep: Keep = "never"
    timeout: float | None = None
    request_from: str | None = None
    #: Nothing of the build outlives it (keep "never", no stop_after): its
    #: bundle may live on the host's tmpfs (BuildHost.runtime_dir), its
    #: scratch directories on disk beside. Not part of the graph digest.
    ephemeral: bool = False

    def __attrs_post_init__(self) -> None:
        if (self.request is None) == (self.request_from is None):
            raise ValueError(f"build {self.key}: give exactly one of request and request_from")
        if self.ephemeral and self.keep != "never":
            raise ValueError(f"build {self.key}: an ephemeral build keeps nothing, "
                             f"not keep={self.keep!r}")

    @key.validator
    def _check_key(self, _attr: attrs.Attribute, value: str) -> None:
        if not _KEY.fullmatch(value):
            raise ValueError(f"build key {value!r} must be 1-64 of [A-Za-z0-9_.-], "
                             f"starting with a letter or digit")


@attrs.define(kw_only=True)
class BuildHost:
    """The host side of builds: stores, the mount server, directories.

    Runtime state, shared by every build of one service; ``mounts`` is the
    running :class:`~stages.castore.fuse.MountServer`.

    Where a build's bundle lives: in ``bundles_dir``, or, for an ephemeral
    build (:attr:`BuildSpec.ephemeral`) when the host has a ``runtime_dir``
    (a tmpfs), in ``runtime_dir/bundles`` with its scratch directories in
    ``scratch_dir`` (on disk: what the builder writes can be large). A
    bundle is a few dozen small files and directories made and removed per
    build; on a disk file system that churn costs more CPU than the rest of
    the build's bookkeeping (ext4 without a journal scans recently freed
    inodes on every allocation). Such bundles share their root file systems
    where they can (:func:`stages.bundle.shared_rootfs_key`), in
    ``runtime_dir/rootfs``, at most MAX_SHARED_ROOTS of them.
    """

    castore: Castore
    mounts: MountServer
    bundles_dir: Path
    runc_root: Path
    idmap: IdMap
    busybox: Path = Path("/bin/busybox")
    #: Where discarded bundles wait to be deleted; None deletes them in place.
    trash_dir: Path | None = None
    #: A directory on a tmpfs for ephemeral bundles (bundles/, rootfs/, trash/), or None.
    runtime_dir: Path | None = None
    #: On disk: the scratch roots of ephemeral bundles (with runtime_dir).
    scratch_dir: Path | None = None
    _deleting: set[asyncio.Task[None]] = attrs.field(factory=set, init=False)
    _shared_roots: set[str] = attrs.field(factory=set, init=False)
    # (build key, on the runtime tmpfs, with the shared root) -> its layout:
    # stages ask for a build's paths a dozen times; a build's paths never change.
    _layouts: dict[tuple[str, bool, bool], BundleLayout] = attrs.field(factory=dict,
                                                                      init=False)

    def on_runtime(self, build: BuildSpec) -> bool:
        """Whether the build's bundle lives in the runtime directory (a tmpfs)."""
        return build.ephemeral and self.runtime_dir is not None and self.scratch_dir is not None

    async def discard_bundle(self, build: BuildSpec) -> None:
        """Remove a build's bundle without making the build wait for the disk.

        The bundle is renamed into the trash at once (nothing of it is left
        under its name), then deleted by a worker thread (the event loop
        goes on: deleting a tree on disk takes milliseconds even when small,
        and a large output far more); a small bundle on the runtime tmpfs is
        deleted at once, cheaper than a thread. :meth:`drain` waits for
        those deletions, and a starting service empties the trash a crash
        left behind.
        """
        from stages.bundle import remove_bundle, remove_if_small, trash_bundle

        bundle = self.bundle_dir(build)
        if self.trash_dir is None:
            remove_bundle(bundle)
            return
        trash = (self.runtime_dir / "trash" if self.on_runtime(build)  # type: ignore[operator]
                 else self.trash_dir)
        moved = trash_bundle(bundle, trash, scratch_trash_dir=self.trash_dir)
        if self.on_runtime(build) and moved and remove_if_small(moved[0]):
            moved = moved[1:]  # the skeleton, on the tmpfs: gone at once
        if not moved:
            return

        def delete() -> None:
            for path in moved:
                shutil.rmtree(path, ignore_errors=True)

        task = asyncio.create_task(asyncio.to_thread(delete))
        self._deleting.add(task)
        task.add_done_callback(self._deleting.discard)

    async def drain(self) -> None:
        """Wait until every discarded bundle is deleted."""
        while self._deleting:
            await asyncio.gather(*list(self._deleting), return_exceptions=True)

    def bundle_dir(self, build: BuildSpec) -> Path:
        return self.layout(build).root

    def layout(self, build: BuildSpec, req: BuildRequest | None = None) -> BundleLayout:
        """Where the build's bundle is; with ``req`` (the build's request),
        its shared root file system too (:meth:`shared_rootfs`), if it has one."""
        runtime = self.on_runtime(build)
        memo = (build.key, runtime, req is not None)
        found = self._layouts.get(memo)
        if found is not None:
            return found
        if not runtime:
            found = BundleLayout(self.bundles_dir / build.key)
        else:
            assert self.runtime_dir is not None and self.scratch_dir is not None
            shared = self.shared_rootfs(build, req) if req is not None else None
            found = BundleLayout(self.runtime_dir / "bundles" / build.key,
                                 self.scratch_dir / build.key, shared)
        if len(self._layouts) >= 4096:
            self._layouts.clear()
        self._layouts[memo] = found
        return found

    def shared_rootfs(self, build: BuildSpec, req: BuildRequest) -> Path | None:
        """The root file system the build shares with others, or None (its own).

        Only ephemeral bundles on the runtime tmpfs share roots. The same
        build and request give the same answer on every call.
        """
        from stages.bundle import shared_rootfs_key

        if not self.on_runtime(build):
            return None
        key = shared_rootfs_key(req, self.idmap)
        if key is None:
            return None
        if key not in self._shared_roots:
            if len(self._shared_roots) >= MAX_SHARED_ROOTS:
                return None
            self._shared_roots.add(key)
        return self.runtime_dir / "rootfs" / key  # type: ignore[operator]

    def input_link(self, build: BuildSpec) -> Path:
        """The bind sources of the build's inputs: ``<bundle>/inputs/<content name>``.

        A symlink to the mount server's content directory
        (:attr:`~stages.castore.fuse.client.MountServer.content_root`),
        (re)made by the ``inputs`` resource.
        The mount server's path belongs to one service instance, while the
        spec (config.json) outlives it in a stopped run; through this link a
        run resumed by another instance binds the inputs of its own mount.
        """
        return self.bundle_dir(build) / "inputs"


def request_to_result(request: BuildRequest) -> dict:
    """A request as a JSON stage result (proto-JSON as a dict)."""
    from google.protobuf import json_format

    return json_format.MessageToDict(request_to_proto(request))


def request_from_result(value: dict) -> BuildRequest:
    from google.protobuf import json_format

    from stages.proto import build_pb2
    from stages.request import request_from_proto

    return request_from_proto(json_format.ParseDict(value, build_pb2.BuildRequest()))


def request_of(build: BuildSpec, ctx: Any) -> BuildRequest:
    """The build's request, inside any of its stages after ``validate``."""
    if build.request is not None:
        return build.request
    return request_from_result(ctx.results["validate"]["request"])


@contextlib.asynccontextmanager
async def _workspace(_ctx: Any) -> AsyncIterator[None]:
    """A slot, nothing more: its kind's cap bounds the builds between bundle
    and ingest, so that many queued builds do not all write their bundles up
    front (flooding the disk and the threads) while two containers run."""
    yield


def workspace_cap(jobs: int) -> int:
    """How many builds may be on disk at once for ``jobs`` containers: one
    being prepared or ingested beside each running one."""
    return 2 * jobs


def build_caps(jobs: int) -> Caps:
    """The caps of a run of builds with ``jobs`` concurrent containers."""
    return Caps(kinds={"container": jobs, "workspace": workspace_cap(jobs)})


def _request_digest(request: BuildRequest) -> str:
    import hashlib

    wire = request_to_proto(request).SerializeToString(deterministic=True)
    return hashlib.sha256(wire).hexdigest()


def build_graph(build: BuildSpec, host: BuildHost | None) -> Graph:
    """The seven-stage graph of one build.

    ``host`` may be None to get a graph that can only be drawn or hashed.
    """
    from stages import bundle, ingest, mount, run, spec, teardown, validate

    def bind(fn):  # noqa: ANN001, ANN202
        return functools.partial(fn, build, host)

    inputs = Resource(name="inputs", kind="inputs", factory=bind(mount.inputs_mounted),
                      description="the request's inputs in the FUSE mount")
    container = Resource(name="container", kind="container", factory=bind(run.container),
                         description="a runc container")
    workspace = Resource(name="workspace", kind="workspace", factory=_workspace,
                         description="a slot for a build on disk, bundle to ingest")
    stages = [
        Stage(name="validate", fn=bind(validate.stage),
              description="check every rule of the request"),
        Stage(name="spec", fn=bind(spec.stage), deps=["validate"],
              description="the OCI runtime spec (config.json)"),
        Stage(name="bundle", fn=bind(bundle.stage), deps=["spec"], resources=["workspace"],
              description="bundle directory: config.json, rootfs, scratch"),
        Stage(name="mount", fn=bind(mount.stage), deps=["bundle"],
              resources=["workspace", "inputs"],
              description="inputs through FUSE, read-only"),
        Stage(name="run", fn=bind(run.stage), deps=["mount"],
              resources=["workspace", "inputs", container], timeout=None,
              description="runc run of the bundle"),
        Stage(name="ingest", fn=bind(ingest.stage), deps=["run"], resources=["workspace"],
              description="outputs into castore, reference scan"),
        # Teardown depends on every stage, not just ingest: on cancellation the
        # unstarted ones settle at once, and it must still wait for any stage
        # that is finishing its work (a bundle being written).
        Stage(name="teardown", fn=bind(teardown.stage), deps=list(STAGE_NAMES[:-1]),
              always=True,
              description="remove the bundle unless kept"),
    ]
    made = ({"request_sha256": _request_digest(build.request)} if build.request is not None
            else {"request_from": build.request_from})
    return Graph(stages=stages, resources=[workspace, inputs], version=GRAPH_VERSION,
                 params={**made, "key": build.key, "keep": build.keep,
                         "timeout": build.timeout})


def graph_for_requests(builds: list[BuildSpec], host: BuildHost | None, *,
                       stages: Sequence[Stage] = ()) -> Graph:
    """Several builds in one graph, each under the prefix of its key.

    ``stages`` are extra stages of the graph, e.g. those that make the
    requests of builds with ``request_from`` (linked before their validate).
    """
    if len(builds) == 1 and not stages and builds[0].request_from is None:
        return build_graph(builds[0], host)
    keys = [b.key for b in builds]
    if len(set(keys)) != len(keys):
        raise ValueError(f"build keys must be unique, got {keys}")
    links = {f"{b.key}/validate": [b.request_from] for b in builds if b.request_from}
    return Graph.compose(*(build_graph(b, host).prefixed(b.key) for b in builds),
                         stages=stages, links=links, version=GRAPH_VERSION)

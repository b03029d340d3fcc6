"""One build as a pipeline graph: validate -> spec -> bundle -> mount -> run -> ingest -> teardown.

:func:`build_graph` turns a :class:`~stages.request.BuildRequest` into a
:class:`pipeline.Graph` whose stage functions live in the stage modules
(``stages.validate``, ``stages.spec``, ``stages.bundle``, ``stages.mount``,
``stages.run``, ``stages.ingest``, ``stages.teardown``). The graph is pure
definition: it can be drawn (``ocibuild graph``) without a service.

What a build needs from its host (a castore, the FUSE mount server, where
bundles and container state live, the id mapping) comes in a
:class:`~stages.context.BuildHost`, made by the build service; stage
functions get it and their :class:`~stages.context.BuildSpec` bound with
:func:`functools.partial`, so the graph digest sees the functions but not
the host. Both live in :mod:`stages.context`, below the stage modules.

Resources:

- ``inputs`` (shared, kind ``inputs``): the request's inputs added to the
  mount server under the build's key. Acquired by ``mount``, used by ``run``,
  released (the key removed) once ``run`` is done, also on failure or
  cancellation.
- ``cgroup`` (shared, kind ``cgroup``, used by ``run``): the build's own
  cgroup, which holds its limits. Made before ``run`` waits for its
  container's cap and removed after the cap is given back: the kernel takes
  milliseconds to make and remove one, and the next container need not wait.
- ``container`` (local to ``run``, kind ``container``): one runc container or
  bwrap sandbox; the service caps this kind at its number of jobs.
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

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from pipeline import Caps, Graph, Resource, Stage
from stages import bundle, ingest, mount, run, spec, teardown, validate
from stages.context import BuildHost, BuildSpec
from stages.request import BuildRequest, request_to_proto

__all__ = ["GRAPH_VERSION", "STAGE_NAMES", "build_caps", "build_graph", "graph_for_requests",
           "workspace_cap"]

STAGE_NAMES = ("validate", "spec", "bundle", "mount", "run", "ingest", "teardown")
GRAPH_VERSION = "ocibuild-build-2"


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
    kinds = {"container": jobs, "workspace": workspace_cap(jobs)}
    return Caps(kinds=kinds)


def _request_digest(request: BuildRequest) -> str:
    import hashlib

    wire = request_to_proto(request).SerializeToString(deterministic=True)
    return hashlib.sha256(wire).hexdigest()


def build_graph(build: BuildSpec, host: BuildHost | None) -> Graph:
    """The seven-stage graph of one build.

    ``host`` may be None to get a graph that can only be drawn or hashed.
    """
    def bind(fn: Callable[..., Any]) -> Callable[..., Any]:
        return functools.partial(fn, build, host)

    inputs = Resource(name="inputs", kind="inputs", factory=bind(mount.inputs_mounted),
                      description="the request's inputs in the FUSE mount")
    cgroup = Resource(name="cgroup", kind="cgroup", factory=bind(run.build_cgroup),
                      description="the build's cgroup, with its limits")
    container = Resource(name="container", kind="container", factory=bind(run.container),
                         description="a runc container or a bwrap sandbox")
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
              resources=["workspace", "inputs", "cgroup", container], timeout=None,
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
    return Graph(stages=stages, resources=[workspace, inputs, cgroup], version=GRAPH_VERSION,
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

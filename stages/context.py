"""What every stage of one build shares: its spec, its host, its request.

The stage modules (:mod:`stages.validate` ... :mod:`stages.teardown`) are
called as ``fn(build, host, ctx)``: ``build`` a :class:`BuildSpec` (what
the build is), ``host`` a :class:`BuildHost` (the stores, mount server and
directories of the service running it) and ``ctx`` the pipeline's
:class:`~pipeline.StageContext`. This module sits below the stage modules
and the graph that assembles them (:mod:`stages.graph`), so each of them
imports it and none imports another's caller.

Caveats:

- The key names the build on this host: mount subtree, container id and
  bundle directory. It must be unique among live builds of one host.
- :func:`request_of` reads a request made by another stage of the graph
  (``request_from``) from the ``validate`` stage's result, so it works only
  in stages after ``validate``.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import attrs

from pipeline import StageContext
from stages.oci.cgroups import BuildCgroup
from stages.oci.layout import (
    BundleLayout,
    remove_bundle,
    remove_if_small,
    rmtree,
    trash_bundle,
)
from stages.oci.network import RESOLV_CONF
from stages.policy import Policy
from stages.request import BuildRequest, request_to_proto

if TYPE_CHECKING:
    from stages.castore.addresses import Castore
    from stages.castore.fuse import MountServer
    from stages.oci.idmap import IdMap

__all__ = ["MAX_SHARED_ROOTS", "BuildHost", "BuildSpec", "Keep", "StageContext",
           "request_from_result", "request_of", "request_to_result"]

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
    #: What the operator grants every build (host paths, network, limits).
    policy: Policy = attrs.field(factory=Policy)
    #: Where the builds' own cgroups go (``ocibuild``: ``ocibuild/<key>``, the
    #: same for every instance, so a resumed build finds its own), or None
    #: to leave the limits to runc (:mod:`stages.oci.cgroups`).
    cgroup_root: str | None = None
    #: Where builds with network access get their network namespaces (a
    #: file per build, :mod:`stages.oci.network`); None shares the host's.
    netns_dir: Path | None = None
    #: Where discarded bundles wait to be deleted; None deletes them in place.
    trash_dir: Path | None = None
    #: A directory on a tmpfs for ephemeral bundles (bundles/, rootfs/, trash/), or None.
    runtime_dir: Path | None = None
    #: On disk: the scratch roots of ephemeral bundles (with runtime_dir).
    scratch_dir: Path | None = None
    #: What runs a bundle: ``runc`` (its config.json) or ``bwrap`` (the same
    #: config.json rendered as bwrap arguments, :mod:`stages.oci.bwrap`).
    runtime: str = attrs.field(default="runc", validator=attrs.validators.in_(("runc", "bwrap")))
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
        bundle = self.bundle_dir(build)
        if self.trash_dir is None:
            remove_bundle(bundle)
            return
        if self.on_runtime(build):
            assert self.runtime_dir is not None  # on_runtime checked it
            trash = self.runtime_dir / "trash"
        else:
            trash = self.trash_dir
        moved = trash_bundle(bundle, trash, scratch_trash_dir=self.trash_dir)
        if self.on_runtime(build) and moved and remove_if_small(moved[0]):
            moved = moved[1:]  # the skeleton, on the tmpfs: gone at once
        if not moved:
            return

        def delete() -> None:
            for path in moved:
                rmtree(path, ignore_errors=True)

        task = asyncio.create_task(asyncio.to_thread(delete))
        self._deleting.add(task)
        task.add_done_callback(self._deleting.discard)

    async def drain(self) -> None:
        """Wait until every discarded bundle is deleted."""
        while self._deleting:
            await asyncio.gather(*list(self._deleting), return_exceptions=True)

    def cgroup(self, build: BuildSpec) -> BuildCgroup | None:
        """The build's own cgroup (holding its limits), if the host makes them."""
        if self.cgroup_root is None:
            return None
        return BuildCgroup(f"{self.cgroup_root}/{build.key}")

    def netns_path(self, build: BuildSpec) -> Path:
        assert self.netns_dir is not None, "the host gives builds no network namespaces"
        return self.netns_dir / build.key

    def network_files(self) -> dict[str, str]:
        """/etc files of a build with network: slirp's DNS, the host's services and hosts."""
        assert self.netns_dir is not None
        resolv = self.netns_dir.parent / "resolv.conf"
        if not resolv.exists():
            resolv.write_text(RESOLV_CONF)
        return {"/etc/resolv.conf": str(resolv), "/etc/services": "/etc/services",
                "/etc/hosts": "/etc/hosts"}

    def bundle_dir(self, build: BuildSpec) -> Path:
        return self.layout(build).root

    def layout(self, build: BuildSpec, rootfs_key: str | None = None) -> BundleLayout:
        """Where the build's bundle is; with ``rootfs_key`` (see
        :func:`stages.spec.shared_rootfs_key`), its shared root file system
        too (:meth:`shared_rootfs`), if it can have one."""
        runtime = self.on_runtime(build)
        memo = (build.key, runtime, rootfs_key is not None)
        found = self._layouts.get(memo)
        if found is not None:
            return found
        if not runtime:
            found = BundleLayout(self.bundles_dir / build.key)
        else:
            assert self.runtime_dir is not None and self.scratch_dir is not None
            shared = self.shared_rootfs(rootfs_key) if rootfs_key is not None else None
            found = BundleLayout(self.runtime_dir / "bundles" / build.key,
                                 self.scratch_dir / build.key, shared)
        if len(self._layouts) >= 4096:
            self._layouts.clear()
        self._layouts[memo] = found
        return found

    def shared_rootfs(self, key: str) -> Path | None:
        """The shared root file system named ``key``, or None when the host
        keeps MAX_SHARED_ROOTS others already (the build gets its own).

        Only ephemeral bundles on the runtime tmpfs share roots
        (:meth:`layout` asks only for those). The same key gives the same
        answer on every call.
        """
        assert self.runtime_dir is not None
        if key not in self._shared_roots:
            if len(self._shared_roots) >= MAX_SHARED_ROOTS:
                return None
            self._shared_roots.add(key)
        return self.runtime_dir / "rootfs" / key

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


def request_of(build: BuildSpec, ctx: StageContext) -> BuildRequest:
    """The build's request, inside any of its stages after ``validate``."""
    if build.request is not None:
        return build.request
    return request_from_result(ctx.results["validate"]["request"])



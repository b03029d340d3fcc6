"""The spec stage: a BuildRequest as an OCI runtime spec (config.json), pure.

:func:`make_spec` turns a validated request plus the host facts in
:class:`SpecOptions` into the config.json dict for runc 1.1 (OCI runtime spec
1.0.2). Nothing here touches the disk; every host path comes in through the
options.

The sandbox follows Nix 2.8's: uid 1000 / gid 100, hostname ``localhost``,
the request's environment and nothing else, cwd ``/<working_dir>``, a new
pid, ipc, uts, mount and user namespace, and a new network namespace. With
network access (which only the operator grants) the service gives the build
a network namespace of its own connected by slirp4netns
(``network_namespace``, :mod:`stages.oci.network`), with a resolv.conf
naming slirp's DNS and the host's services and hosts files; without a
``network_namespace`` (library callers) the host's is shared, as Nix does for
fixed-output derivations.

Mounts, in this order (a mount's parent is always mounted before it):

1. /proc, /dev (tmpfs), /dev/pts, /dev/shm: runc's defaults for a user
   namespace (``runc spec --rootless``), less /dev/mqueue, which Nix 2.8's
   sandbox does not have either. /sys only with network
   access, as a read-only rbind of the host's /sys (sysfs cannot be mounted
   in a user namespace that does not own the network namespace). Without
   network access there is no /sys at all, as in Nix 2.8's sandbox, and no
   maskedPaths entry under it.
2. /tmp: a tmpfs (runc gives a tmpfs its mount point's mode, so the bundle
   makes rootfs/tmp 1777). The tmpfs roots (/dev, /dev/shm, /tmp) belong to
   the build user (``uid=1000,gid=100``), as in Nix's sandbox.
3. The scratch paths, read-write binds, shallowest first.
4. Each input read-only (``bind, ro, nosuid, nodev``) at /<inputs_dir>/<name>.
   Symlink inputs are not mounted: the bundle creates the symlink itself.
5. The available_ro_paths, read-only recursive binds at the same path.
6. /bin/sh: the static busybox, read-only, when provide_bin_sh.
7. With network access only: /etc/resolv.conf, /etc/services, /etc/hosts.

Caveats:

- Capabilities: none at all. Nix's builder runs as uid 1000 in its user
  namespace, so its effective, permitted and ambient sets are empty after
  the uid change; Nix leaves the bounding set full, we empty it too, since
  with no_new_privileges nothing could regain a capability anyway.
- Env values are bytes on the wire, but config.json is JSON text, and runc
  (Go) would replace invalid UTF-8 by U+FFFD. A value that is not valid
  UTF-8 is therefore refused (SpecError, rule ``env-utf8``) rather than
  passed altered.
- runc sets HOME from the build user's /etc/passwd entry (/build) when the
  environment has none; every request made from a Nix derivation sets HOME
  (/homeless-shelter), so the environment is then exactly the request's.
- Resource limits (rlimits) are this process's own, all of them, as Nix's
  builder gets nix's (:func:`own_rlimits`); the operator's limits (memory,
  processes) are cgroup limits on top. They are listed explicitly because
  runc, a Go program, raises its own soft RLIMIT_NOFILE to the hard limit,
  and its children would inherit that. A limit cannot exceed this
  process's hard limit, since runc applies it inside the user namespace.
- The root is read-only; the bundle must create every mount point
  beforehand (:func:`mount_points` lists them).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from stages.castore.fuse.content import content_name
from stages.castore.nodes import FileNode, SymlinkNode
from stages.context import BuildHost, BuildSpec, StageContext, request_of
from stages.errors import SpecError
from stages.oci.idmap import BUILD_GID, BUILD_UID, IdMap
from stages.oci.layout import BundleLayout, is_under
from stages.oci.seccomp import seccomp_profile
from stages.policy import Policy
from stages.request import BuildRequest

__all__ = ["BUILD_GID", "BUILD_UID", "MASKED_PATHS", "READONLY_PATHS", "SpecOptions",
           "make_spec", "policy_options", "masked_paths", "mount_points", "stage"]

OCI_VERSION = "1.0.2"

#: As in runc's default spec.
MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

_NETWORK_FILES = ("/etc/resolv.conf", "/etc/services", "/etc/hosts")
#: The limits a build ran under, in its config.json (also where a cgroup of
#: the service holds them): for ``ocibuild shell`` and readers of a bundle.
MAX_PIDS_ANNOTATION = "org.ocibuild.max-pids"
MAX_MEMORY_ANNOTATION = "org.ocibuild.max-memory"
# tmpfs options: the build user owns the tmpfs's root, as in Nix's sandbox.
_BUILDER_OWNS = (f"uid={BUILD_UID}", f"gid={BUILD_GID}")


def _str_path(value: object) -> str:
    return str(value)


def _paths_map(value: Mapping) -> dict:
    return {k: str(v) for k, v in value.items()}


@attrs.frozen(kw_only=True)
class SpecOptions:
    """Host facts the spec needs: where things are on this machine.

    ``scratch_dirs`` maps each scratch path to its host directory;
    ``input_paths`` maps each non-symlink input's name (bytes) to the host
    path to bind (the FUSE mount's entry for it). ``network_files`` maps the
    container's /etc/resolv.conf, /etc/services and /etc/hosts to host files,
    used only with network access.
    """

    idmap: IdMap
    rootfs: str = attrs.field(converter=_str_path)
    scratch_dirs: Mapping[str, str] = attrs.field(converter=_paths_map, factory=dict)
    input_paths: Mapping[bytes, str] = attrs.field(converter=_paths_map, factory=dict)
    busybox: str = attrs.field(converter=_str_path, default="/bin/busybox")
    network_files: Mapping[str, str] = attrs.field(
        converter=_paths_map, factory=lambda: {p: p for p in _NETWORK_FILES})
    hostname: str = "localhost"
    #: (name, soft, hard) of every rlimit the builder gets; default: ours.
    rlimits: tuple[tuple[str, int, int], ...] = attrs.field(factory=lambda: own_rlimits())
    #: Requested read-only path -> the host path to bind (the operator's
    #: policy resolved it, :meth:`stages.policy.Policy.ro_source`); None
    #: binds each at its own path (for callers that checked the paths).
    ro_sources: Mapping[str, str] | None = None
    #: Limits (None: none): processes, memory (bytes), the /tmp tmpfs (bytes).
    max_pids: int | None = None
    max_memory: int | None = None
    tmp_size: int | None = None
    #: The seccomp filter of :mod:`stages.oci.seccomp`.
    seccomp: bool = True
    #: With network access: the build's own network namespace (a file the
    #: container joins, :mod:`stages.oci.network`); None shares the host's.
    network_namespace: str | None = None
    #: The container's cgroup, a child of the build's own cgroup which holds
    #: the limits (:mod:`stages.oci.cgroups`); None: runc's, with the limits.
    cgroups_path: str | None = None


_RLIMITS = ("AS", "CORE", "CPU", "DATA", "FSIZE", "LOCKS", "MEMLOCK", "MSGQUEUE", "NICE",
            "NOFILE", "NPROC", "RSS", "RTPRIO", "RTTIME", "SIGPENDING", "STACK")
_UNLIMITED = (1 << 64) - 1  # RLIM_INFINITY as the runtime spec's uint64


def own_rlimits() -> tuple[tuple[str, int, int], ...]:
    """This process's rlimits, as the runtime spec writes them (unlimited: 2**64-1)."""
    import resource

    out = []
    for name in _RLIMITS:
        which = getattr(resource, f"RLIMIT_{name}", None)
        if which is None:
            continue
        soft, hard = resource.getrlimit(which)
        out.append((f"RLIMIT_{name}", _UNLIMITED if soft == resource.RLIM_INFINITY else soft,
                    _UNLIMITED if hard == resource.RLIM_INFINITY else hard))
    return tuple(out)


def policy_options(policy: Policy, req: BuildRequest) -> dict[str, Any]:
    """The SpecOptions a service's policy sets for ``req`` (limits, host paths)."""
    sources = {}
    for i, p in enumerate(req.available_ro_paths):
        source = policy.ro_source(p)
        if source is None:  # validate refuses these; a caller that skipped it is stopped here
            raise SpecError(f"constraints.available_ro_paths[{i}]", "ro-path-not-allowed",
                            f"{p!r} is not in a directory this service lets builds read")
        sources[p] = source
    return {"ro_sources": sources, "max_pids": policy.max_pids,
            "max_memory": policy.max_memory, "tmp_size": policy.tmp_size}


def _sorted_by_depth(paths: list[str]) -> list[str]:
    return sorted(paths, key=lambda p: (p.count("/"), p))


def mount_points(req: BuildRequest) -> list[tuple[str, str]]:
    """Every mount destination the spec uses below the root, as (path, kind).

    ``path`` is relative to the build root; ``kind`` is ``"dir"`` or
    ``"file"`` (what the mount point must be). The sandbox's own /proc, /dev,
    /tmp (and /sys with network access) are included; the working directory
    too (as ``"dir"``).
    """
    points: list[tuple[str, str]] = [("proc", "dir"), ("dev", "dir")]
    if req.network_access:
        points.append(("sys", "dir"))
    points.append(("tmp", "dir"))
    points += [(s, "dir") for s in _sorted_by_depth(list(req.scratch_paths))]
    for node in req.inputs:
        if isinstance(node, SymlinkNode):
            continue
        kind = "file" if isinstance(node, FileNode) else "dir"
        points.append((f"{req.inputs_dir}/{node.name.decode()}", kind))
    for p in req.available_ro_paths:
        points.append((p[1:], "dir"))  # decided per host path by the bundle
    if req.provide_bin_sh:
        points.append(("bin/sh", "file"))
    if req.network_access:
        points += [(p[1:], "file") for p in _NETWORK_FILES]
    points.append((req.working_dir, "dir"))
    return points


def masked_paths(req: BuildRequest) -> list[str]:
    """MASKED_PATHS, less those under /sys when the sandbox has no /sys."""
    if req.network_access:
        return list(MASKED_PATHS)
    return [p for p in MASKED_PATHS if not p.startswith("/sys/")]


def _env(req: BuildRequest) -> list[str]:
    env = []
    for i, var in enumerate(req.environment_vars):
        try:
            value = var.value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(f"environment_vars[{i}].value", "env-utf8",
                            f"the value of {var.key} is not valid UTF-8 ({exc.reason} at byte "
                            f"{exc.start}); config.json cannot carry it unaltered") from exc
        env.append(f"{var.key}={value}")
    return env


def _bind(dest: str, source: str, *options: str) -> dict:
    return {"destination": dest, "type": "bind", "source": source,
            "options": ["bind", *options]}


#: runc hands the sources of a user-namespaced container's bind mounts to its
#: init in one netlink attribute, whose length is a u16: their paths (each
#: with a NUL) and a few bytes of header must fit in 65535 bytes.
MOUNT_MESSAGE_LIMIT = 65535 - 64


def _check_mount_message(req: BuildRequest, mounts: list[dict]) -> None:
    """Refuse here what runc would refuse late ("cannot serialize bytemsg")."""
    binds = [m for m in mounts if m.get("type") == "bind"
             or {"bind", "rbind"} & set(m.get("options", ()))]
    total = sum(len(m["source"].encode()) + 1 for m in binds)
    if total > MOUNT_MESSAGE_LIMIT:
        per = total // max(len(binds), 1)
        raise SpecError("inputs", "too-many-mounts",
                        f"{len(req.inputs)} inputs and {len(binds) - len(req.inputs)} other "
                        f"binds: runc passes their {total} bytes of source paths in one "
                        f"message of at most {MOUNT_MESSAGE_LIMIT}, about "
                        f"{MOUNT_MESSAGE_LIMIT // per} binds of this length")


def make_spec(req: BuildRequest, opts: SpecOptions) -> dict:
    """The config.json for a validated request, as a dict (no I/O)."""
    mounts: list[dict] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k", *_BUILDER_OWNS]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k", *_BUILDER_OWNS]},
    ]
    if req.network_access:
        mounts.append({"destination": "/sys", "type": "none", "source": "/sys",
                       "options": ["rbind", "rnosuid", "rnoexec", "rnodev", "rro"]})
    tmp_size = [f"size={opts.tmp_size}"] if opts.tmp_size is not None else []
    mounts.append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "nodev", "mode=1777", *tmp_size, *_BUILDER_OWNS]})

    for s in _sorted_by_depth(list(req.scratch_paths)):
        try:
            source = opts.scratch_dirs[s]
        except KeyError:
            raise SpecError("scratch_paths", "host-path-missing",
                            f"no host directory given for scratch path {s!r}") from None
        mounts.append(_bind(f"/{s}", source, "rw", "nosuid", "nodev"))

    for i, node in enumerate(req.inputs):
        if isinstance(node, SymlinkNode):
            continue
        try:
            source = opts.input_paths[node.name]
        except KeyError:
            raise SpecError(f"inputs[{i}]", "host-path-missing",
                            f"no host path given for input {node.name!r}") from None
        mounts.append(_bind(f"/{req.inputs_dir}/{node.name.decode()}", source,
                            "ro", "nosuid", "nodev"))

    for p in req.available_ro_paths:
        ro_source = p if opts.ro_sources is None else opts.ro_sources.get(p)
        if ro_source is None:
            raise SpecError("constraints.available_ro_paths", "host-path-missing",
                            f"no host path given for {p!r}")
        # rro/rnosuid/rnodev: read-only all the way down, mounts below too
        # (plain ro on an rbind remounts only its top).
        mounts.append({"destination": p, "type": "bind", "source": ro_source,
                       "options": ["rbind", "rro", "rnosuid", "rnodev"]})

    if req.provide_bin_sh:
        mounts.append(_bind("/bin/sh", opts.busybox, "ro", "nosuid", "nodev"))

    if req.network_access:
        for p in _NETWORK_FILES:
            mounts.append(_bind(p, opts.network_files[p], "ro", "nosuid", "nodev"))

    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user")]
    if not req.network_access:
        namespaces.append({"type": "network"})
    elif opts.network_namespace is not None:
        # The build's own, connected by slirp4netns (stages.oci.network).
        namespaces.append({"type": "network", "path": opts.network_namespace})

    linux: dict[str, Any] = {
        "uidMappings": [m.as_oci() for m in opts.idmap.uid],
        "gidMappings": [m.as_oci() for m in opts.idmap.gid],
        "namespaces": namespaces,
        "maskedPaths": masked_paths(req),
        "readonlyPaths": list(READONLY_PATHS),
    }
    annotations: dict[str, str] = {}
    resources: dict[str, Any] = {}
    if opts.max_pids is not None:
        resources["pids"] = {"limit": opts.max_pids}
        annotations[MAX_PIDS_ANNOTATION] = str(opts.max_pids)
    if opts.max_memory is not None:
        # Swap included: a build that outgrows its memory is stopped, not swapped.
        resources["memory"] = {"limit": opts.max_memory, "swap": opts.max_memory}
        annotations[MAX_MEMORY_ANNOTATION] = str(opts.max_memory)
    if opts.cgroups_path is not None:
        linux["cgroupsPath"] = opts.cgroups_path  # its parent holds the limits
    elif resources:
        linux["resources"] = resources
    if opts.seccomp:
        linux["seccomp"] = seccomp_profile()
    _check_mount_message(req, mounts)
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": BUILD_UID, "gid": BUILD_GID},
            "args": list(req.command_args),
            "env": _env(req),
            "cwd": f"/{req.working_dir}",
            "capabilities": {"bounding": [], "effective": [], "inheritable": [],
                             "permitted": [], "ambient": []},
            "rlimits": [{"type": name, "soft": soft, "hard": hard}
                        for name, soft, hard in opts.rlimits],
            "noNewPrivileges": True,
        },
        "root": {"path": opts.rootfs, "readonly": True},
        "hostname": opts.hostname,
        "mounts": mounts,
        "linux": linux,
        **({"annotations": annotations} if annotations else {}),
    }


#: Part of every shared root's key: change it whenever the bundle writer
#: (:mod:`stages.bundle`) lays out a root differently, so that no root of
#: the old layout is shared.
ROOTFS_LAYOUT = 1


def shared_rootfs_key(req: BuildRequest, idmap: IdMap) -> str | None:
    """The name of the shared root file system for ``req``, or None if it needs its own.

    Two requests with the same key get byte-identical roots from the
    writer: the key covers everything the root is made from (its mount
    points, which of them lie in scratch paths, the working directory, the
    symlink inputs, the builder's host ids). A request with an additional
    file outside its scratch paths, or with available_ro_paths (whose
    mount points take the kind of a host path, which may change), gets its
    own root.
    """
    if req.available_ro_paths or any(
            not any(is_under(f.path, sp) for sp in req.scratch_paths)
            for f in req.additional_files):
        return None
    material = json.dumps([
        ROOTFS_LAYOUT, idmap.host_uid(BUILD_UID), idmap.host_gid(BUILD_GID),
        mount_points(req), list(req.scratch_paths), req.working_dir, req.inputs_dir,
        [[n.name.hex(), n.target.hex()] for n in req.inputs if isinstance(n, SymlinkNode)],
    ])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def spec_options(layout_root: Path | str, req: BuildRequest, idmap: IdMap,
                 input_paths: Mapping[bytes, object], **kw: Any) -> SpecOptions:
    """SpecOptions for a bundle laid out by :class:`stages.oci.layout.BundleLayout`."""
    layout = BundleLayout(layout_root)
    return SpecOptions(idmap=idmap, rootfs=layout.rootfs,
                       scratch_dirs=layout.scratch_dirs(req.scratch_paths),
                       input_paths=input_paths, **kw)


def build_layout(build: BuildSpec, host: BuildHost, req: BuildRequest) -> BundleLayout:
    """Where the build's bundle is, with the root file system it shares, if any."""
    key = shared_rootfs_key(req, host.idmap) if host.on_runtime(build) else None
    return host.layout(build, key)


def build_spec_options(build: BuildSpec, host: BuildHost, req: BuildRequest) -> SpecOptions:
    """SpecOptions of one build on its host: bundle layout, FUSE paths, id map.

    Each input is bound from ``<bundle>/inputs/<content name>``
    (:mod:`stages.castore.fuse.content`), the link made by the ``inputs``
    resource.
    """
    layout = build_layout(build, host, req)
    cgroup = host.cgroup(build)
    network: dict[str, Any] = {}
    if req.network_access and host.netns_dir is not None:
        network = {"network_namespace": str(host.netns_path(build)),
                   "network_files": host.network_files()}
    # Through the link, stable across service instances (resume), to the
    # mount server's content directory.
    inputs = os.fspath(host.input_link(build))
    return SpecOptions(idmap=host.idmap, rootfs=layout.rootfs,
                       scratch_dirs=layout.scratch_dirs(req.scratch_paths),
                       input_paths={n.name: f"{inputs}/{content_name(n)}" for n in req.inputs
                                    if not isinstance(n, SymlinkNode)},
                       busybox=host.busybox, **policy_options(host.policy, req),
                       cgroups_path=cgroup.container_path if cgroup is not None else None,
                       **network)


async def stage(build: BuildSpec, host: BuildHost, ctx: StageContext) -> dict[str, Any]:
    """Pipeline stage: the config.json of the build (pure; written by ``bundle``)."""
    req = request_of(build, ctx)
    return make_spec(req, build_spec_options(build, host, req))

"""The bundle stage: the OCI bundle directory a build runs from.

:func:`write_bundle` lays out (see :mod:`stages.oci.layout`):

- ``config.json`` from :func:`stages.spec.make_spec`;
- ``rootfs/``: the read-only root, with /etc/passwd, /etc/group and
  /etc/hosts byte-identical to Nix 2.8's sandbox, and a mount point for
  everything the spec mounts;
- ``scratch/<i>/``: the host side of each scratch path;
- the request's additional_files, and its symlink inputs (which are not
  mounted: a bind mount cannot carry a symlink).

A root file system can also be *shared* (``shared_rootfs``): builds whose
roots would come out the same (:func:`shared_rootfs_key`) run from one
directory, written by the first of them; the bundle then holds no
``rootfs/`` and config.json names the shared one. The build service does
this for bundles that go with their build, on its runtime tmpfs: writing
and deleting a root is most of a bundle's cost, and runc mounts over it in
the container's own mount namespace only. The root is read-only in the
container and every mount point in it exists already, so nothing writes to
it while builds run.

Where a build-root path lands: in the scratch directory of its longest
scratch-path prefix when it lies in a scratch path (so an additional file
in ``build/`` is writable and visible at /build), otherwise in the rootfs
(read-only in the container). Validation has already kept every path inside
the build root and off the read-only mounts.

Modes and owners follow Nix 2.8's sandbox (which maps the host's root, the
owner of everything there, to the build user): everything the bundle creates,
rootfs and scratch directories alike, belongs to the host ids that the
container's uid 1000 / gid 100 map to; the root is 0750 (ROOT_MODE), the
working directory 0700 (WORKDIR_MODE), the inputs_dir 1775 (INPUTS_DIR_MODE)
when it is a scratch path (when it is also the working directory, 0700 wins),
/tmp's mount point 1777, everything else 0755 (directories) or 0644 (files).
The rootfs is mounted read-only, so owning it lets the builder write nothing.

Caveats:

- Atomic-ish: everything is written into a hidden sibling directory that is
  renamed into place at the end; on any failure it is removed, so either the
  whole bundle exists or nothing does. ``bundle_dir`` must not exist yet.
- The container's root maps to a subordinate id that owns nothing on the
  host, so every directory from / down to the bundle must be searchable by
  others (mode o+x): runc's init resolves the bind sources from inside the
  user namespace. The bundle itself is made 0711; the caller picks a parent
  that is traversable (:func:`check_traversable`).
- What runc mounts shows other owners than Nix's sandbox: /proc and the
  device nodes bound into /dev belong to the host's root, outside the
  mapping (``nobody`` inside; Nix maps the host's root to the builder). The
  tmpfs roots (/dev, /dev/shm, /tmp) are the builder's through the spec's
  mount options, the FUSE inputs when the mount server is given its ids.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stages.castore.nodes import SymlinkNode
from stages.context import BuildHost, BuildSpec, StageContext, request_of
from stages.errors import BundleError
from stages.oci.idmap import IdMap
from stages.oci.layout import BundleLayout, check_traversable, is_under
from stages.request import BuildRequest
from stages.spec import (
    BUILD_GID,
    BUILD_UID,
    SpecOptions,
    build_layout,
    build_spec_options,
    make_spec,
    mount_points,
    shared_rootfs_key,
)
from stages.util.aio import finish_then_cancel
from stages.validate import validate_request

__all__ = ["INPUTS_DIR_MODE", "NIX_GROUP", "NIX_HOSTS", "NIX_PASSWD", "ROOT_MODE", "WORKDIR_MODE",
           "stage", "write_bundle"]

# Nix 2.8's sandbox files (libstore/build/local-derivation-goal.cc), for
# sandboxUid 1000, sandboxGid 100, build dir /build. The integration test
# tests/integration/test_sandbox_vs_nix.py compares them with a real nix-build.
NIX_PASSWD = (b"root:x:0:0:Nix build user:/build:/noshell\n"
              b"nixbld:x:1000:100:Nix build user:/build:/noshell\n"
              b"nobody:x:65534:65534:Nobody:/:/noshell\n")
NIX_GROUP = b"root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n"
NIX_HOSTS = b"127.0.0.1 localhost\n::1 localhost\n"

#: Nix 2.8's modes for the sandbox's root, /build and /nix/store.
ROOT_MODE = 0o750
WORKDIR_MODE = 0o700
INPUTS_DIR_MODE = 0o1775


_UMASK_LINE = re.compile(rb"^Umask:\s*([0-7]+)$", re.MULTILINE)


def _umask() -> int | None:
    """The process's umask (Linux: without changing it), or None if unknown."""
    try:
        with open("/proc/self/status", "rb") as f:
            m = _UMASK_LINE.search(f.read())
    except OSError:
        return None
    return int(m.group(1), 8) if m else None


class _Writer:
    """Writes one bundle; host paths are ``str`` here (pathlib costs ~30% of a
    bundle's CPU, and a service writes one per build)."""

    def __init__(self, tmp: Path, final: Path, req: BuildRequest, idmap: IdMap,
                 scratch_root: Path | None = None, pretty: bool = True,
                 shared_rootfs: Path | None = None) -> None:
        self.tmp = BundleLayout(tmp, scratch_root)
        self.final = BundleLayout(final, scratch_root)
        self.req = req
        self.uid = idmap.host_uid(BUILD_UID)
        self.gid = idmap.host_gid(BUILD_GID)
        self.pretty = pretty
        self.umask = _umask()
        self.rootfs = str(self.tmp.rootfs)
        # A shared root that exists is used as it is (nothing of the root is
        # written); one that does not is written beside it, then renamed.
        self.shared_rootfs = str(shared_rootfs) if shared_rootfs is not None else None
        self.rootfs_exists = False
        if self.shared_rootfs is not None:
            self.rootfs_exists = os.path.isdir(self.shared_rootfs)
            if not self.rootfs_exists:
                self.rootfs = f"{os.path.dirname(self.shared_rootfs)}/." \
                              f"{os.path.basename(self.shared_rootfs)}.partial-{uuid.uuid4().hex[:8]}"
        self.scratch = {s: str(d) for s, d in self.tmp.scratch_dirs(req.scratch_paths).items()}
        self.existing: set[str] = set()  # directories known to exist
        if self.rootfs_exists:
            self.existing.add(self.rootfs)

    def in_rootfs(self, path: str) -> bool:
        return path == self.rootfs or path.startswith(self.rootfs + "/")

    def skip(self, path: str) -> bool:
        """Whether ``path`` is in a shared root that exists already (left as it is)."""
        return self.rootfs_exists and self.in_rootfs(path)

    def kept(self, mode: int) -> bool:
        """Whether creating with ``mode`` gives exactly it (no chmod needed after)."""
        return self.umask is not None and mode & self.umask == 0

    def mkdir(self, path: str, mode: int) -> None:
        """A new directory with ``mode`` whatever the umask (its parent has no setgid)."""
        os.mkdir(path, mode)
        if not self.kept(mode):
            os.chmod(path, mode)

    def backing(self, rel: str, *, strict: bool) -> str:
        """The host path in the temp bundle holding build-root path ``rel``.

        With ``strict`` only scratch paths strictly above ``rel`` count (the
        mount point of a scratch path lies in what is mounted below it).
        """
        best = None
        for s in self.req.scratch_paths:
            if (s != rel or not strict) and is_under(rel, s):
                if best is None or len(s) > len(best):
                    best = s
        if best is None:
            return os.path.join(self.rootfs, rel)
        tail = rel[len(best) + 1:]
        return os.path.join(self.scratch[best], tail) if tail else self.scratch[best]

    def mkdirs(self, path: str) -> None:
        """mkdir -p, 0755, the new directories owned by the builder."""
        if self.skip(path):
            return
        missing = []
        p = path
        while p not in self.existing and not os.path.exists(p):
            missing.append(p)
            p = os.path.dirname(p)
        for d in reversed(missing):
            self.mkdir(d, 0o755)
            os.chown(d, self.uid, self.gid)
        self.existing.update(missing)
        self.existing.add(path)

    def touch(self, path: str) -> None:
        if self.skip(path):
            return
        self.mkdirs(os.path.dirname(path))
        if not os.path.exists(path):
            self.write_file(path, b"")

    def write_file(self, path: str, data: bytes) -> None:
        """A new file, 0644 whatever the umask, the builder's."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if not self.kept(0o644):
                os.fchmod(fd, 0o644)
            os.fchown(fd, self.uid, self.gid)
        finally:
            os.close(fd)

    def set_dir(self, path: str, mode: int) -> None:
        if self.skip(path):
            return
        os.chmod(path, mode)
        os.chown(path, self.uid, self.gid)
        self.existing.add(path)

    def write(self, spec: SpecOptions, config: dict | None = None) -> None:
        root = str(self.tmp.root)
        # These two take their parent's setgid bit, if any: chmod always.
        os.mkdir(root, 0o711)
        os.chmod(root, 0o711)
        rootfs = self.rootfs
        if not self.rootfs_exists:
            os.mkdir(rootfs, 0o700)
            self.set_dir(rootfs, ROOT_MODE)
            etc = os.path.join(rootfs, "etc")
            self.mkdirs(etc)
            for name, data in (("passwd", NIX_PASSWD), ("group", NIX_GROUP),
                               ("hosts", NIX_HOSTS)):
                self.write_file(os.path.join(etc, name), data)

        if self.req.scratch_paths:
            base = str(self.tmp.scratch_base)
            os.mkdir(base, 0o711)
            os.chmod(base, 0o711)
            if self.tmp.scratch_root is not None:
                os.symlink(base, os.path.join(root, "scratch"))
        for s in self.req.scratch_paths:
            d = self.scratch[s]
            os.mkdir(d, 0o700)
            self.set_dir(d, INPUTS_DIR_MODE if s == self.req.inputs_dir else 0o755)

        ro_sources = {p[1:]: p if spec.ro_sources is None else spec.ro_sources.get(p, p)
                      for p in self.req.available_ro_paths}
        for rel, kind in mount_points(self.req):
            host = self.backing(rel, strict=rel in self.req.scratch_paths)
            if rel in ro_sources:
                source = ro_sources[rel]
                kind = "dir" if os.path.isdir(source) else "file"
                if not os.path.exists(source):
                    raise BundleError(self.final.root,
                                      f"available_ro_path /{rel} does not exist on this host")
            if kind == "dir":
                self.mkdirs(host)
            else:
                self.touch(host)

        # runc gives a tmpfs the mode of its mount point: /tmp must be 1777.
        if not self.rootfs_exists:
            os.chmod(os.path.join(rootfs, "tmp"), 0o1777)
        # The working directory exists now (it is a mount point), wherever it lies.
        self.set_dir(self.backing(self.req.working_dir, strict=False), WORKDIR_MODE)

        for node in self.req.inputs:
            if isinstance(node, SymlinkNode):
                host = self.backing(f"{self.req.inputs_dir}/{node.name.decode()}", strict=False)
                if self.skip(host):
                    continue
                self.mkdirs(os.path.dirname(host))
                os.symlink(node.target, os.fsencode(host))
                os.lchown(host, self.uid, self.gid)

        for f in self.req.additional_files:
            host = self.backing(f.path, strict=False)
            if self.shared_rootfs is not None and self.in_rootfs(host):
                raise BundleError(self.final.root, f"additional file {f.path} would be written "
                                                   f"into a shared root file system")
            self.mkdirs(os.path.dirname(host))
            self.write_file(host, f.contents)

        if config is None:
            config = make_spec(self.req, spec)
        # Indented for people reading a kept bundle; json's C encoder (5x
        # faster) does only the compact form.
        text = json.dumps(config, indent=2) if self.pretty else json.dumps(config)
        with open(self.tmp.config, "w") as config_file:
            config_file.write(text + "\n")

    def publish_rootfs(self) -> None:
        """Rename a newly written shared root into place (once the bundle is whole).

        Another build may have published the same root meanwhile: then this
        copy, identical, is dropped.
        """
        if self.shared_rootfs is None or self.rootfs_exists:
            return
        try:
            os.rename(self.rootfs, self.shared_rootfs)
        except OSError:
            if not os.path.isdir(self.shared_rootfs):
                raise
            shutil.rmtree(self.rootfs, ignore_errors=True)
        self.rootfs_exists = True

    def discard_partial_rootfs(self) -> None:
        if self.shared_rootfs is not None and not self.rootfs_exists:
            shutil.rmtree(self.rootfs, ignore_errors=True)


def write_bundle(bundle_dir: Path | str, req: BuildRequest, *, idmap: IdMap,
                 input_paths: Mapping[bytes, object] | None = None,
                 config: dict | None = None, scratch_root: Path | str | None = None,
                 check_parents: bool = True, pretty: bool = True,
                 shared_rootfs: Path | str | None = None, validated: bool = False,
                 **spec_options: Any) -> BundleLayout:
    """Write the whole bundle for ``req`` at ``bundle_dir`` (which must not exist).

    ``input_paths`` maps each non-symlink input's name to the host path to
    bind; ``spec_options`` go to :class:`stages.spec.SpecOptions` (busybox,
    network_files, rlimits, hostname). ``config``, when given, is written as
    config.json instead of the spec made from those options (the spec stage's
    result). ``scratch_root``, when given, is where the scratch directories
    go instead of ``<bundle>/scratch`` (which becomes a symlink to it); it
    must not exist, its parent must. ``check_parents=False`` skips
    :func:`check_traversable` of the parents, for a caller that checked
    them once for many bundles; ``pretty=False`` writes config.json on one
    line (for a bundle nobody will read). ``shared_rootfs`` is a root file
    system shared by bundles of the same :func:`shared_rootfs_key` (its
    parent must exist): used as it is when it exists, else written (as
    part of this bundle, then published). ``validated=True`` skips
    validating ``req``, for a caller that did (the service's validate stage).
    Returns the bundle's layout.
    """
    if not validated:
        validate_request(req)
    final = Path(bundle_dir).absolute()
    scratch = Path(scratch_root).absolute() if scratch_root is not None else None
    for path in (final, scratch):
        if path is None:
            continue
        if path.exists() or path.is_symlink():
            raise BundleError(path, "already exists; remove it or choose another directory")
        if not path.parent.is_dir():
            raise BundleError(path, f"parent directory {path.parent} does not exist")
        if check_parents:
            check_traversable(path.parent)
    tmp = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
    shared = Path(shared_rootfs).absolute() if shared_rootfs is not None else None
    if shared is not None and shared_rootfs_key(req, idmap) is None:
        raise BundleError(final, "this request's root file system cannot be shared "
                                 "(available_ro_paths, or an additional file outside "
                                 "the scratch paths)")
    layout = BundleLayout(final, scratch, shared)
    opts = SpecOptions(idmap=idmap, rootfs=layout.rootfs,
                       scratch_dirs=layout.scratch_dirs(req.scratch_paths),
                       input_paths=dict(input_paths or {}), **spec_options)
    writer = _Writer(tmp, final, req, idmap, scratch, pretty, shared)
    try:
        writer.write(opts, config)
        writer.publish_rootfs()
        os.rename(tmp, final)
    except BaseException as exc:
        writer.discard_partial_rootfs()
        shutil.rmtree(tmp, ignore_errors=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(exc, OSError):
            raise BundleError(final, f"cannot write the bundle: {exc}") from exc
        raise
    return layout


async def stage(build: BuildSpec, host: BuildHost, ctx: StageContext) -> dict[str, Any]:
    """Pipeline stage: write the bundle, config.json from the spec stage.

    A bundle left by an earlier attempt of the same build (resume) is
    replaced.
    """
    req = request_of(build, ctx)
    planned = build_layout(build, host, req)
    planned.root.parent.mkdir(parents=True, exist_ok=True)
    await host.discard_bundle(build)
    opts = build_spec_options(build, host, req)
    write = functools.partial(
        write_bundle, planned.root, req, idmap=host.idmap, scratch_root=planned.scratch_root,
        shared_rootfs=planned.shared_rootfs,
        check_parents=False,  # the service checked its directories when it started
        validated=True,  # by the validate stage
        input_paths=opts.input_paths, config=ctx.results["spec"], busybox=opts.busybox,
        ro_sources=opts.ro_sources)
    if host.on_runtime(build):
        # On the tmpfs a bundle takes a millisecond of CPU: cheaper here than
        # a worker thread contending for the GIL with the loop. Nobody reads
        # its config.json (the bundle goes with the build): compact.
        layout = write(pretty=False)
    else:
        # Many small file-system calls on disk: off the event loop, other
        # builds go on. A cancelled build waits for the thread, so teardown
        # sees the bundle.
        layout = await finish_then_cancel(asyncio.to_thread(write))
    return {"bundle": str(layout.root)}

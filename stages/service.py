"""The build service: ``do_build(request) -> Build``, and the OCI implementation.

:class:`OciBuildService` runs each build as the seven-stage pipeline graph
of :mod:`stages.build`, in runc containers, with inputs served by one FUSE
mount server. It caps the containers running at once (``jobs``, default:
the number of cores) and the builds between bundle and ingest (twice that),
across all its runs: concurrent ``do_build`` calls, each its own graph,
share those caps (:attr:`OciBuildService.limiters`) as the builds of one
graph do.

Addresses, as tvix spells them (``BUILD_SERVICE_ADDR``):

- ``oci:///abs/state/dir``: the OCI service keeping its state there;
- ``dummy://``: refuses every build (for wiring tests);
- without an address: ``oci://`` + ``$OCIBUILD_STATE``, else
  ``/var/lib/ocibuild`` for root, else ``$XDG_STATE_HOME/ocibuild``.

Every directory from / down to the bundles and the FUSE mountpoint must be
searchable by others (o+x): the container's mapped root reaches them from
inside its user namespace. Root's home (0700) is therefore not a default.

The state directory::

    instances/<id>/lock     flock held while service instance <id> lives
    instances/<id>/keys     the build keys it created, one a line
    instances/<id>/mnt/     its FUSE mountpoint
    instances/<id>/runc/    its runc --root (its containers only)
    instances/<id>/runtime  symlink to its runtime directory, on a tmpfs:
                            the bundles of its ephemeral builds (see below)
                            and the root file systems they share
    instances/<id>/scratch/<key>/  their scratch directories
    bundles/<key>/          bundles that may be kept; kept ones hold .ocibuild-kept
    trash/                  discarded bundles, deleted in the background
    runs/<run-id>/          pipeline run directories, with the requests

Ephemeral builds (nothing kept, no ``stop_after``: the usual case) write
their bundles into the instance's runtime directory,
``$OCIBUILD_RUNTIME_DIR/ocibuild/<id>/`` (default ``/dev/shm``, a tmpfs on
every Linux; set the variable empty to keep every bundle in the state
directory), and their scratch directories into the instance's directory on
disk: the small files of a bundle cost far less to make and delete on a
tmpfs, while what the builder writes may be large. The runtime directory is
used only if it is a real directory owned by us and writable by nobody
else, on a file system of at least 256 MiB; otherwise bundles stay on disk.

Crash recovery: a starting service takes every instance whose lock is free
(its owner died), unmounts what it left mounted, kills and deletes its
containers, removes its bundles unless kept, its runtime directory and its
directory, before it builds anything. Several services may share one state
directory.
"""

from __future__ import annotations

import abc
import asyncio
import fcntl
import json
import os
import secrets
import shutil
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import attrs

from stages.castore.addresses import Castore, open_castore
from stages.errors import BuildError, BuildFailed, ServiceError

if TYPE_CHECKING:
    from pipeline import Run, Subscriber
    from stages.build import BuildHost, BuildSpec, Keep
    from stages.request import Build, BuildRequest

# The pipeline, the build graph and the request model load when first used
# (in functions below), not with this module: a starting service spawns its
# FUSE mount server first and imports them while that boots.

__all__ = [
    "BuildService",
    "DummyBuildService",
    "OciBuildService",
    "default_state_dir",
    "open_build_service",
]

BUILDS_FILE = "builds.json"


def default_state_dir() -> Path:
    explicit = os.environ.get("OCIBUILD_STATE")
    if explicit:
        return Path(explicit).absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/ocibuild")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base).absolute() / "ocibuild"


class BuildService(abc.ABC):
    """Builds one request at a time per call; calls may run concurrently."""

    @abc.abstractmethod
    async def do_build(self, request: BuildRequest) -> Build: ...

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> BuildService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class DummyBuildService(BuildService):
    """``dummy://``: refuses every build, as tvix's dummy service does."""

    async def do_build(self, request: BuildRequest) -> Build:
        raise ServiceError("dummy://", "the dummy build service does not build anything")


# --- instances and crash recovery ---------------------------------------------


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


async def cleanup_dead_instances(state_dir: Path) -> list[str]:
    """Clean what dead service instances left behind; return what was removed."""
    from stages.bundle import remove_bundle
    from stages.castore.fuse import cleanup_stale_mounts
    from stages.oci.runc import cleanup_stale_containers
    from stages.teardown import KEPT_MARKER

    removed: list[str] = []
    instances = state_dir / "instances"
    if not instances.is_dir():
        return removed
    for inst in sorted(instances.iterdir()):
        lock = inst / "lock"
        if not inst.is_dir():
            continue
        fd = _try_lock(lock) if lock.exists() else os.open(inst, os.O_RDONLY)
        if fd is None:
            continue  # alive
        try:
            for mnt in cleanup_stale_mounts(inst / "mnt"):
                removed.append(f"mount {mnt}")
            for cid in await cleanup_stale_containers(inst / "runc"):
                removed.append(f"container {cid}")
            keys = (inst / "keys").read_text().split() if (inst / "keys").exists() else []
            for key in keys:
                bundle = state_dir / "bundles" / key
                if bundle.exists() and not (bundle / KEPT_MARKER).exists():
                    remove_bundle(bundle)
                    removed.append(f"bundle {bundle}")
            runtime = _linked_runtime(inst)
            if runtime is not None:
                shutil.rmtree(runtime, ignore_errors=True)
                removed.append(f"runtime {runtime}")
            shutil.rmtree(inst)
            removed.append(f"instance {inst.name}")
        finally:
            os.close(fd)
    return removed


# --- the OCI service ------------------------------------------------------------


RUNTIME_ENV = "OCIBUILD_RUNTIME_DIR"
DEFAULT_RUNTIME_BASE = "/dev/shm"
#: A runtime file system smaller than this is not used (Docker gives a
#: container a 64 MiB /dev/shm, which concurrent bundles could fill).
RUNTIME_MIN_BYTES = 256 << 20


def _runtime_home() -> Path | None:
    """``<base>/ocibuild``, made if missing, when it is safe to use; else None.

    Safe: a directory (not a symlink) owned by us, writable by nobody else,
    searchable by others (the container's mapped root binds from it). The
    base is shared (``/dev/shm`` is world-writable), so anything else there
    under that name is not ours to trust. A file system smaller than
    :data:`RUNTIME_MIN_BYTES` is not used either.
    """
    import stat

    from stages.oci.layout import check_traversable

    base = os.environ.get(RUNTIME_ENV, DEFAULT_RUNTIME_BASE)
    if not base or not os.path.isdir(base):
        return None
    fs = os.statvfs(base)
    if fs.f_blocks * fs.f_frsize < RUNTIME_MIN_BYTES:
        return None
    home = Path(base).absolute() / "ocibuild"
    try:
        home.mkdir(mode=0o711)
        os.chmod(home, 0o711)
    except FileExistsError:
        pass
    except OSError:
        return None
    st = os.lstat(home)
    if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid()
            or st.st_mode & 0o022 or not st.st_mode & 0o001):
        return None
    try:
        check_traversable(home)  # its parents too: bundles are checked once, here
    except BuildError:
        return None
    return home


def _linked_runtime(inst: Path) -> Path | None:
    """The runtime directory an instance made: ``<base>/ocibuild/<instance>``.

    Anything else the link might name is not ours to delete.
    """
    link = inst / "runtime"
    if not link.is_symlink():
        return None
    target = Path(os.readlink(link))
    if not target.is_absolute() or target.name != inst.name or target.parent.name != "ocibuild":
        return None
    return target


@attrs.define
class _Instance:
    """One live service instance's directories and lock."""

    dir: Path
    lock_fd: int
    #: Its runtime directory on a tmpfs (bundles/, trash/), or None.
    runtime: Path | None = None

    @classmethod
    def create(cls, state_dir: Path) -> _Instance:
        inst = state_dir / "instances" / f"{os.getpid()}-{secrets.token_hex(4)}"
        inst.mkdir(parents=True, mode=0o711)
        fd = _try_lock(inst / "lock")
        assert fd is not None
        (inst / "mnt").mkdir()
        (inst / "runc").mkdir(mode=0o700)
        (inst / "scratch").mkdir(mode=0o711)
        runtime = None
        home = _runtime_home()
        if home is not None:
            runtime = home / inst.name
            # The link first: a crash after it leaves nothing unaccounted for.
            os.symlink(runtime, inst / "runtime")
            runtime.mkdir(mode=0o711)
            (runtime / "bundles").mkdir(mode=0o711)
            (runtime / "rootfs").mkdir(mode=0o711)
        return cls(inst, fd, runtime)

    def record_key(self, key: str) -> None:
        with open(self.dir / "keys", "a") as f:
            f.write(key + "\n")

    def close(self) -> None:
        if self.runtime is not None:
            shutil.rmtree(self.runtime, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self.lock_fd)


class OciBuildService(BuildService):
    """Builds in runc containers; see the module docstring.

    Use as an async context manager: entering cleans up after dead
    instances and starts the mount server; leaving stops it.
    """

    def __init__(self, state_dir: Path | str | None = None, *,
                 blob_address: str | None = None, directory_address: str | None = None,
                 jobs: int | None = None, keep: Keep = "never", timeout: float | None = None,
                 subscribers: Iterable[Subscriber] = ()) -> None:
        self.state_dir = Path(state_dir).absolute() if state_dir else default_state_dir()
        self.blob_address = blob_address
        self.directory_address = directory_address
        self.jobs = jobs if jobs is not None else (os.cpu_count() or 1)
        if self.jobs < 1:
            raise ServiceError(str(self.state_dir), f"jobs must be >= 1, not {self.jobs}")
        self.keep = keep
        self.timeout = timeout
        self.subscribers = list(subscribers)
        self.runs_dir = self.state_dir / "runs"
        self.bundles_dir = self.state_dir / "bundles"
        self.trash_dir = self.state_dir / "trash"
        self.host: BuildHost | None = None
        self._instance: _Instance | None = None
        self._castore: Castore | None = None
        self._mounts = None
        self._limiters: dict | None = None
        self.cleaned: list[str] = []

    # -- lifetime ---------------------------------------------------------------

    async def __aenter__(self) -> OciBuildService:
        # Only what spawning the mount server needs, before it is spawned.
        from stages.castore.fuse import MountServer
        from stages.oci.idmap import BUILD_GID, BUILD_UID, load_idmap
        from stages.oci.layout import check_traversable

        try:
            for d in (self.state_dir, self.runs_dir, self.bundles_dir):
                d.mkdir(parents=True, exist_ok=True, mode=0o711)
        except OSError as exc:
            raise ServiceError(str(self.state_dir), f"cannot create the state directory: "
                                                     f"{exc.strerror}") from exc
        try:
            check_traversable(self.bundles_dir)
        except BuildError as exc:
            raise ServiceError(str(self.state_dir), str(exc)) from exc
        self._instance = _Instance.create(self.state_dir)
        try:
            idmap = load_idmap()
            # Inputs belong to the build user, as in Nix's sandbox.
            self._mounts = MountServer(self._instance.dir / "mnt",
                                       blob_address=self.blob_address,
                                       directory_address=self.directory_address,
                                       uid=idmap.host_uid(BUILD_UID),
                                       gid=idmap.host_gid(BUILD_GID))
            # The mount server boots (~0.3 s) while we open the store, clean
            # up after dead instances and the caller plans its builds; the
            # first mount waits for it.
            await self._mounts.start()
            from stages.build import BuildHost

            self._castore = open_castore(self.blob_address, self.directory_address)
            self.cleaned = await cleanup_dead_instances(self.state_dir)
            if self.trash_dir.is_dir():  # bundles discarded by services that died
                await asyncio.to_thread(_empty, self.trash_dir)
            self.host = BuildHost(castore=self._castore, mounts=self._mounts,
                                  bundles_dir=self.bundles_dir, trash_dir=self.trash_dir,
                                  runc_root=self._instance.dir / "runc", idmap=idmap,
                                  runtime_dir=self._instance.runtime,
                                  scratch_dir=self._instance.dir / "scratch")
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        try:
            if self.host is not None:
                await self.host.drain()
            if self._mounts is not None:
                mounts, self._mounts = self._mounts, None
                await mounts.__aexit__(None, None, None)
            if self._castore is not None:
                castore, self._castore = self._castore, None
                await castore.aclose()
        finally:
            if self._instance is not None:
                self._instance.close()
                self._instance = None
            self.host = None

    # -- building ---------------------------------------------------------------

    def _new_run_dir(self) -> Path:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        return self.runs_dir / run_id

    def _require_host(self) -> BuildHost:
        if self.host is None:
            raise ServiceError(str(self.state_dir), "the service is not started; "
                                                     "use it with 'async with'")
        return self.host

    async def run_builds(self, requests: Sequence[BuildRequest], *,
                         stop_after: str | None = None, keep: Keep | None = None,
                         sources: Sequence[str] | None = None,
                         subscribers: Iterable[Subscriber] = ()) -> tuple[Run, list[BuildSpec]]:
        """Build several requests as one graph; returns the run and the builds.

        ``stop_after`` names a stage to stop every build after (or, as
        ``KEY/STAGE``, one build's); the bundles then stay for inspection
        and ``resume``.
        """
        from pipeline import Runner
        from stages.build import BuildSpec, build_caps, graph_for_requests

        host = self._require_host()
        run_dir = self._new_run_dir()
        keep = keep or self.keep
        specs = [BuildSpec(request=req, key=_key(run_dir, i, len(requests)), keep=keep,
                           timeout=self.timeout,
                           ephemeral=keep == "never" and stop_after is None)
                 for i, req in enumerate(requests)]
        graph = graph_for_requests(specs, host)
        run_dir.mkdir(parents=True)
        _save_specs(run_dir, specs, sources)
        self.record_keys(spec.key for spec in specs)
        runner = Runner(graph, run_dir=run_dir, caps=build_caps(self.jobs),
                        subscribers=[*self.subscribers, *subscribers], limiters=self.limiters)
        run = await runner.run(stop_after=_stop_points(specs, stop_after))
        self._mark_paused(run, specs)
        return run, specs

    async def resume_run(self, run_dir: Path, *, from_stage: str | None = None,
                         stop_after: str | None = None,
                         subscribers: Iterable[Subscriber] = ()) -> tuple[Run, list[BuildSpec]]:
        from pipeline import resume
        from stages.build import build_caps, graph_for_requests

        host = self._require_host()
        specs = load_build_specs(run_dir)
        self.record_keys(spec.key for spec in specs)
        graph = graph_for_requests(specs, host)
        run = await resume(run_dir, graph, from_stage=_full_stage(specs, from_stage),
                           stop_after=_stop_points(specs, stop_after),
                           caps=build_caps(self.jobs), limiters=self.limiters,
                           subscribers=[*self.subscribers, *subscribers])
        self._mark_paused(run, specs)
        return run, specs

    def record_keys(self, keys: Iterable[str]) -> None:
        """Record build keys as this instance's, before their bundles exist.

        For callers that compose their own graphs of builds (the Nix
        builder): a later service cleaning up after this one, if it dies,
        removes exactly the bundles of these keys.
        """
        if self._instance is None:
            raise ServiceError(str(self.state_dir), "the service is not started; "
                                                     "use it with 'async with'")
        for key in keys:
            self._instance.record_key(key)

    def _mark_paused(self, run: Run, specs: Sequence[BuildSpec]) -> None:
        # A run that stopped before teardown keeps its bundles (for inspection,
        # `ocibuild shell` and resume): mark them so crash recovery spares them.
        from pipeline import StageState
        from stages.teardown import KEPT_MARKER

        host = self._require_host()
        for spec in specs:
            bundle = host.bundle_dir(spec)
            teardown = _stage_name(specs, spec, "teardown")
            outcome = run.stages.get(teardown)
            if bundle.exists() and (outcome is None or outcome.state is StageState.PENDING):
                (bundle / KEPT_MARKER).write_text("paused\n")

    @property
    def limiters(self) -> dict:
        """The service's caps on containers and workspaces, shared by all its runs.

        Concurrent runs (do_build calls, each its own graph) then run at most
        ``jobs`` containers between them, and prepare the next builds while
        those run, as one graph of many builds does.
        """
        if self._limiters is None:
            from pipeline import CapacityLimiter
            from stages.build import build_caps

            self._limiters = {kind: CapacityLimiter(cap, name=kind)
                              for kind, cap in build_caps(self.jobs).kinds.items()}
        return self._limiters

    async def do_build(self, request: BuildRequest) -> Build:
        """Build one request; BuildFailed (a BuildError) when it does not succeed.

        Concurrent calls share the service's :attr:`limiters`.
        """
        run, specs = await self.run_builds([request])
        return build_result(run, specs[0])


def _empty(directory: Path) -> None:
    for entry in directory.iterdir():
        shutil.rmtree(entry, ignore_errors=True)


def _key(run_dir: Path, i: int, n: int) -> str:
    return run_dir.name if n == 1 else f"{run_dir.name}.{i}"


def _save_specs(run_dir: Path, specs: Sequence[BuildSpec],
                sources: Sequence[str] | None) -> None:
    """The builds of a run, so that resume and shell can rebuild its graph."""
    from stages.request import write_request_file

    (run_dir / "requests").mkdir()
    meta = []
    for i, spec in enumerate(specs):
        write_request_file(run_dir / "requests" / f"{i}.binpb", spec.request)
        meta.append({"key": spec.key, "keep": spec.keep, "timeout": spec.timeout,
                     "request": f"requests/{i}.binpb",
                     "source": sources[i] if sources else None})
    (run_dir / BUILDS_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _stage_name(specs: Sequence[BuildSpec], spec: BuildSpec, stage: str) -> str:
    return stage if len(specs) == 1 else f"{spec.key}/{stage}"


def _full_stage(specs: Sequence[BuildSpec], stage: str | None) -> str | None:
    """A bare stage name of a multi-build run means the last build's stage.

    For ``from_stage``, which the pipeline takes as one name.
    """
    if stage is None or len(specs) == 1 or "/" in stage:
        return stage
    return f"{specs[-1].key}/{stage}"


def _stop_points(specs: Sequence[BuildSpec], stage: str | None) -> str | tuple[str, ...] | None:
    """``stop_after`` of a run: a bare stage name stops every build after that stage."""
    if stage is None or len(specs) == 1 or "/" in stage:
        return stage
    return tuple(f"{spec.key}/{stage}" for spec in specs)


def build_result(run: Run, spec: BuildSpec) -> Build:
    """The Build of one finished build of a run; BuildFailed naming the cause otherwise.

    Works for a build alone in its graph (bare stage names) and for one of
    several (names prefixed with its key).
    """
    from pipeline import RunStatus, StageState
    from stages.build import request_from_result
    from stages.ingest import build_from_result

    prefixed = f"{spec.key}/ingest" in run.stages

    def mine(name: str) -> bool:
        return name.startswith(spec.key + "/") if prefixed else "/" not in name

    outcome = run.stages.get(f"{spec.key}/ingest" if prefixed else "ingest")
    if outcome is not None and outcome.state.ok:
        request = spec.request
        if request is None:
            validate = run.stages[f"{spec.key}/validate" if prefixed else "validate"]
            request = request_from_result(validate.result["request"])
        return build_from_result(request, outcome.result)
    first = next((o for n, o in run.stages.items()
                  if o.state is StageState.FAILED and mine(n)), None)
    if first is not None:
        raise BuildFailed(spec.key, first.error or "failed", stage=first.name,
                          run_dir=run.run_dir)
    if run.status is RunStatus.CANCELLED:
        raise BuildFailed(spec.key, "cancelled", run_dir=run.run_dir)
    raise BuildFailed(spec.key, f"did not reach ingest (run {run.status.value})",
                      run_dir=run.run_dir)


def load_build_specs(run_dir: Path) -> list[BuildSpec]:
    """The builds of a run directory made by OciBuildService."""
    from stages.build import BuildSpec
    from stages.request import read_request_file

    try:
        meta = json.loads((run_dir / BUILDS_FILE).read_text())
    except FileNotFoundError:
        raise ServiceError(str(run_dir), "not a build run directory (no builds.json)") from None
    except ValueError as exc:
        raise ServiceError(str(run_dir), f"builds.json is not valid JSON: {exc}") from exc
    return [BuildSpec(request=read_request_file(run_dir / m["request"]), key=m["key"],
                      keep=m["keep"], timeout=m["timeout"]) for m in meta]


def list_runs(state_dir: Path | None = None) -> list[tuple[Path, Run | None, str]]:
    """Every run directory with its state (None and the reason when unreadable)."""
    from pipeline import load_run

    runs_dir = (state_dir or default_state_dir()) / "runs"
    out: list[tuple[Path, Run | None, str]] = []
    if not runs_dir.is_dir():
        return out
    for d in sorted(runs_dir.iterdir()):
        try:
            out.append((d, load_run(d), ""))
        except Exception as exc:  # noqa: BLE001 - a listing shows what it cannot read
            out.append((d, None, str(exc)))
    return out


def open_build_service(address: str | None = None, **kw: object) -> BuildService:
    """A build service by address (``BUILD_SERVICE_ADDR`` when None)."""
    address = address or os.environ.get("BUILD_SERVICE_ADDR")
    if not address:
        return OciBuildService(default_state_dir(), **kw)  # type: ignore[arg-type]
    url = urllib.parse.urlsplit(address)
    if url.scheme == "dummy":
        return DummyBuildService()
    if url.scheme == "oci":
        if url.netloc or not url.path.startswith("/"):
            raise ServiceError(address, "an oci:// address needs an absolute path: "
                                        "oci:///abs/state/dir")
        return OciBuildService(url.path, **kw)  # type: ignore[arg-type]
    if url.scheme in ("grpc+unix", "grpc+http", "grpc+https"):
        from stages.build_grpc import GrpcBuildService

        return GrpcBuildService(address)
    raise ServiceError(address, f"unknown build service scheme {url.scheme!r}; known: "
                                f"dummy://, oci:///abs/path, grpc+unix:///abs/path, "
                                f"grpc+http://host:port, grpc+https://host:port")

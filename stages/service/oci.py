"""The build service: ``do_build(request) -> Build``, and the OCI implementation.

:class:`OciBuildService` runs each build as the seven-stage pipeline graph
of :mod:`stages.graph`, in runc containers, with inputs served by one FUSE
mount server. It caps the containers running at once (``jobs``, default:
the number of cores) and the builds between bundle and ingest (twice that),
across all its runs: concurrent ``do_build`` calls, each its own graph,
share those caps (:attr:`OciBuildService.limiters`) as the builds of one
graph do.

Addresses (``oci:///abs/state/dir``, ``dummy://``, ...) are read by
:mod:`stages.service.addresses`.

Every directory from / down to the bundles and the FUSE mountpoint must be
searchable by others (o+x): the container's mapped root reaches them from
inside its user namespace. Root's home (0700) is therefore not a default.

The state directory::

    instances/<id>/lock     flock held while service instance <id> lives
    instances/<id>/janitor.lock  flock held while its janitor lives (runc)
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

Crash recovery (what a starting service does about dead instances on the
same state directory) is :mod:`stages.service.recovery`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stages.castore.addresses import Castore, open_castore
from stages.errors import BuildError, ServiceError
from stages.policy import Policy
from stages.service.base import BuildService
from stages.service.recovery import Instance, cleanup_dead_instances
from stages.service.runs import (
    build_key,
    build_result,
    default_state_dir,
    full_stage,
    load_build_specs,
    restart_points,
    save_specs,
    stage_name,
    stop_points,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline import Run, Subscriber
    from stages.castore.fuse import MountServer
    from stages.context import BuildHost, BuildSpec, Keep
    from stages.request import Build, BuildRequest
    from stages.service.events import BuildEvent

# The pipeline, the build graph and the request model load when first used
# (in functions below), not with this module: a starting service spawns its
# FUSE mount server first and imports them while that boots.

__all__ = ["RUNTIMES", "OciBuildService"]

#: The runtimes a service can run its builds with.
RUNTIMES = ("runc", "bwrap")


class OciBuildService(BuildService):
    """Builds in runc containers; see the module docstring.

    Use as an async context manager: entering cleans up after dead
    instances and starts the mount server; leaving stops it.
    """

    def __init__(self, state_dir: Path | str | None = None, *,
                 blob_address: str | None = None, directory_address: str | None = None,
                 jobs: int | None = None, keep: Keep = "never", timeout: float | None = None,
                 policy: Policy | None = None,
                 subscribers: Iterable[Subscriber] = (), keep_runs: bool = True,
                 runtime: str = "runc") -> None:
        self.state_dir = Path(state_dir).absolute() if state_dir else default_state_dir()
        if runtime not in RUNTIMES:
            raise ServiceError(str(self.state_dir), f"unknown runtime {runtime!r}; known: "
                                                     f"{', '.join(RUNTIMES)}")
        #: What runs the builds: runc, or bwrap (the same sandbox, :mod:`stages.oci.bwrap`).
        self.runtime = runtime
        #: Whether each run leaves its record (runs/<id>: journal, logs,
        #: requests). False: a run that keeps nothing (keep "never", no
        #: stop) runs in memory and leaves nothing behind, as on a Ray node,
        #: whose client keeps the record; ``resume`` and ``shell`` then have
        #: nothing to go on.
        self.keep_runs = keep_runs
        self.blob_address = blob_address
        self.directory_address = directory_address
        self.jobs = jobs if jobs is not None else (os.cpu_count() or 1)
        if self.jobs < 1:
            raise ServiceError(str(self.state_dir), f"jobs must be >= 1, not {self.jobs}")
        self.keep = keep
        if timeout is not None and not timeout > 0:
            raise ServiceError(str(self.state_dir), f"timeout must be a positive number of "
                                                     f"seconds, not {timeout}")
        self.timeout = timeout
        self.policy = policy if policy is not None else Policy()
        state = os.path.realpath(self.state_dir)
        for allowed in self.policy.allowed_ro_paths:
            real = os.path.realpath(allowed)
            if os.path.commonpath([state, real]) in (state, real):
                raise ServiceError(str(self.state_dir),
                                   f"--allow-ro-path {allowed} overlaps the state directory: "
                                   f"builds would read each other's scratch and inputs")
        self.subscribers = list(subscribers)
        self.runs_dir = self.state_dir / "runs"
        self.bundles_dir = self.state_dir / "bundles"
        self.trash_dir = self.state_dir / "trash"
        self.host: BuildHost | None = None
        self._instance: Instance | None = None
        self._castore: Castore | None = None
        self._mounts: MountServer | None = None
        self._limiters: dict | None = None
        self._supervisor: subprocess.Popen[bytes] | None = None
        self._warm: asyncio.Future[None] | None = None
        self.cleaned: list[str] = []

    # -- lifetime ---------------------------------------------------------------

    async def __aenter__(self) -> OciBuildService:
        # Only what spawning the mount server needs, before it is spawned.
        from stages.castore.fuse import MountServer
        from stages.oci import cgroups
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
        if self.runtime == "bwrap" and not cgroups.available():
            raise ServiceError(str(self.state_dir), "the bwrap runtime enforces the limits "
                                                     "through cgroups, and this process cannot "
                                                     "make any (not root, or no writable "
                                                     "cgroup file system); use runc")
        self._instance = Instance.create(self.state_dir)
        try:
            # First: from now on a container of this instance dies with it.
            # (A bwrap sandbox dies with its parent, bwrap with this process:
            # no janitor, and one interpreter fewer to start.)
            if self.runtime == "runc":
                self._supervisor = _start_supervisor(self._instance.dir / "runc")
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
            if self.runtime == "bwrap":
                # libseccomp's import and the filter's compilation (~15 ms) in a
                # thread while the mount server boots, not in the first build.
                self._warm = asyncio.get_running_loop().run_in_executor(None, _warm_seccomp)
            from stages.context import BuildHost

            self._castore = open_castore(self.blob_address, self.directory_address)
            self.cleaned = await cleanup_dead_instances(self.state_dir)
            if self.trash_dir.is_dir():  # bundles discarded by services that died
                await asyncio.to_thread(_empty, self.trash_dir)
            self.host = BuildHost(castore=self._castore, mounts=self._mounts,
                                  bundles_dir=self.bundles_dir, trash_dir=self.trash_dir,
                                  runc_root=self._instance.dir / "runc", idmap=idmap,
                                  runtime_dir=self._instance.runtime, policy=self.policy,
                                  cgroup_root="ocibuild" if cgroups.available() else None,
                                  netns_dir=self._instance.dir / "netns",
                                  scratch_dir=self._instance.dir / "scratch",
                                  runtime=self.runtime)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        try:
            if self._warm is not None:
                warm, self._warm = self._warm, None
                with contextlib.suppress(Exception):  # a real build reports it
                    await warm
            if self.host is not None:
                await self.host.drain()
            if self._mounts is not None:
                mounts, self._mounts = self._mounts, None
                await mounts.__aexit__(None, None, None)
            if self._castore is not None:
                castore, self._castore = self._castore, None
                await castore.aclose()
        finally:
            if self._supervisor is not None:
                supervisor, self._supervisor = self._supervisor, None
                _stop_supervisor(supervisor)
            if self._instance is not None:
                self._instance.close()
                self._instance = None
            self.host = None

    # -- building ---------------------------------------------------------------

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
        from pipeline import Runner, new_run_dir, new_run_id
        from stages.context import BuildSpec
        from stages.graph import build_caps, graph_for_requests

        host = self._require_host()
        keep = keep or self.keep
        ephemeral = keep == "never" and stop_after is None
        record = self.keep_runs or not ephemeral
        run_dir = new_run_dir(self.runs_dir) if record else Path(new_run_id())
        # At once (no await since the mint): a concurrent prune spares a run
        # whose keys a live instance recorded (stages.service.prune).
        self.record_keys(build_key(run_dir, i, len(requests)) for i in range(len(requests)))
        try:
            specs = [BuildSpec(request=req, key=build_key(run_dir, i, len(requests)), keep=keep,
                               timeout=self.timeout, ephemeral=ephemeral)
                     for i, req in enumerate(requests)]
            graph = graph_for_requests(specs, host)
            stops = stop_points(specs, stop_after)
            if record:
                save_specs(run_dir, specs, sources, self.runtime)
        except BaseException:
            if record:
                shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: no run to keep
            raise
        runner = Runner(graph, run_dir=run_dir if record else None, run_id=run_dir.name,
                        caps=build_caps(self.jobs),
                        subscribers=[*self.subscribers, *subscribers], limiters=self.limiters)
        run = await runner.run(stop_after=stops)
        self._mark_paused(run, specs)
        return run, specs

    async def resume_run(self, run_dir: Path, *, from_stage: str | None = None,
                         stop_after: str | None = None,
                         subscribers: Iterable[Subscriber] = ()) -> tuple[Run, list[BuildSpec]]:
        from pipeline import load_run, resume
        from stages.graph import build_caps, graph_for_requests

        host = self._require_host()
        specs = load_build_specs(run_dir)
        self.record_keys(spec.key for spec in specs)
        graph = graph_for_requests(specs, host)
        starts = [full_stage(specs, from_stage) or from_stage] if from_stage else []
        # Builds whose bundles were torn down (or lost) make them anew.
        starts += restart_points(load_run(run_dir),
                                 [(s, stage_name(specs, s, "")) for s in specs],
                                 lambda s: host.bundle_dir(s).exists())
        run = await resume(run_dir, graph, from_stage=starts,
                           stop_after=stop_points(specs, stop_after),
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
            teardown = stage_name(specs, spec, "teardown")
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
            from stages.graph import build_caps

            self._limiters = {kind: CapacityLimiter(cap, name=kind)
                              for kind, cap in build_caps(self.jobs).kinds.items()}
        return self._limiters

    async def do_build(self, request: BuildRequest) -> Build:
        """Build one request; BuildFailed (a BuildError) when it does not succeed.

        Concurrent calls share the service's :attr:`limiters`.
        """
        run, specs = await self.run_builds([request])
        return build_result(run, specs[0])

    async def stream_build(self, request: BuildRequest,
                           emit: Callable[[BuildEvent], None]) -> Build:
        """:meth:`do_build`, each stage change and builder line passed to ``emit``."""
        from stages.service.events import BuildEvents

        # One build alone in its graph: its stages have bare names.
        run, specs = await self.run_builds([request], subscribers=[BuildEvents("", emit)])
        return build_result(run, specs[0])


def _warm_seccomp() -> None:
    """Compile the default seccomp filter into bwrap's cache."""
    from stages.oci.bwrap import compile_seccomp
    from stages.oci.seccomp import seccomp_profile

    compile_seccomp(seccomp_profile())


def _start_supervisor(runc_root: Path) -> subprocess.Popen[bytes]:
    """The instance's janitor (:mod:`stages.service.supervisor`), in its own session.

    It inherits a locked ``janitor.lock`` of the instance and holds it while it
    lives, so a service cleaning up after this instance waits for it.
    """
    import fcntl

    from stages.service.recovery import JANITOR_LOCK

    fd = os.open(runc_root.parent / JANITOR_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return subprocess.Popen(
            [sys.executable, "-m", "stages.service.supervisor", "--runc-root", str(runc_root)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
            pass_fds=(fd,))
    finally:
        os.close(fd)  # the janitor's copy keeps the lock


def _stop_supervisor(supervisor: subprocess.Popen[bytes]) -> None:
    """Tell the janitor this instance ended normally, and reap it."""
    from stages.service.supervisor import BYE

    assert supervisor.stdin is not None
    try:
        supervisor.stdin.write(BYE)
        supervisor.stdin.close()
    except OSError:  # it died: nothing to tell
        pass
    try:
        supervisor.wait(timeout=5)
    except subprocess.TimeoutExpired:
        supervisor.kill()
        supervisor.wait()


def _empty(directory: Path) -> None:
    from stages.oci.layout import rmtree  # iterative: builders' trees of any depth

    for entry in directory.iterdir():
        rmtree(entry, ignore_errors=True)

"""Service instances on a state directory, and the recovery of dead ones.

Each live service is an *instance*: ``instances/<id>/`` in the state
directory, with a lock it holds (flock) for its whole life, the build keys
it created, its FUSE mountpoint, its runc root, its scratch directories,
and a link to its runtime directory on a tmpfs. A starting service takes
every instance whose lock is free (its owner died), unmounts what it left
mounted, kills and deletes its containers, removes its bundles unless kept,
its runtime directory and its directory, before it builds anything. Several
services may share one state directory.

Caveats:

- The runtime directory is used only if it is a real directory owned by us
  and writable by nobody else, on a file system of at least
  :data:`RUNTIME_MIN_BYTES`; otherwise bundles stay on disk.
- A dead instance's runtime link is trusted only for its own directory
  (``<base>/ocibuild/<instance id>``), never for anything else it names.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import stat
import time
from pathlib import Path

import attrs

from stages.castore.fuse import cleanup_stale_mounts
from stages.errors import BuildError
from stages.oci import cgroups
from stages.oci.layout import check_traversable, remove_bundle, rmtree
from stages.oci.network import cleanup_stale_namespaces
from stages.oci.runc import cleanup_stale_containers
from stages.teardown import KEPT_MARKER

__all__ = ["DEFAULT_RUNTIME_BASE", "RUNTIME_ENV", "RUNTIME_MIN_BYTES", "Instance",
           "cleanup_dead_instances", "live_instance_keys", "sweep_orphan_runtimes"]


def _try_lock_dir(path: Path) -> int | None:
    """An fd holding an exclusive flock on the directory ``path``, or None if
    another holds it."""
    return _flock(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None if another holds it."""
    return _flock(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))


def _flock(fd: int) -> int | None:
    """``fd`` holding an exclusive flock, or None (fd closed) if another holds one."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


#: The lock an instance's janitor holds while it lives (:mod:`stages.service.supervisor`).
JANITOR_LOCK = "janitor.lock"
#: How long a starting service waits for a dead instance's janitor to finish.
JANITOR_WAIT = 10.0


async def _janitor_done(inst: Path) -> bool:
    """Whether the dead instance's janitor has finished (waiting up to JANITOR_WAIT):
    while it kills the instance's containers, nobody else touches them."""
    lock = inst / JANITOR_LOCK
    if not lock.exists():
        return True
    deadline = time.monotonic() + JANITOR_WAIT
    while (fd := _try_lock(lock)) is None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    os.close(fd)
    return True


async def cleanup_dead_instances(state_dir: Path) -> list[str]:
    """Clean what dead service instances left behind; return what was removed.

    Build cgroups nobody uses any more (of any state directory on this
    host: they are named by build key only) are swept too.
    """
    removed: list[str] = []
    if cgroups.available():
        removed += [f"cgroup ocibuild/{key}" for key in cgroups.sweep()]
    removed += [f"runtime {path} (its state directory is gone)"
                for path in sweep_orphan_runtimes()]
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
            if not await _janitor_done(inst):
                continue  # its janitor is still at work; the next start cleans up
            for mnt in cleanup_stale_mounts(inst / "mnt"):
                removed.append(f"mount {mnt}")
            for cid in await cleanup_stale_containers(inst / "runc"):
                removed.append(f"container {cid}")
            for netns in cleanup_stale_namespaces(inst / "netns"):
                removed.append(f"network namespace {netns}")
            keys = (inst / "keys").read_text().split() if (inst / "keys").exists() else []
            for key in keys:
                if cgroups.available():
                    cgroups.remove_tree(f"ocibuild/{key}")
                bundle = state_dir / "bundles" / key
                if bundle.exists() and not (bundle / KEPT_MARKER).exists():
                    remove_bundle(bundle)
                    removed.append(f"bundle {bundle}")
            runtime = _linked_runtime(inst)
            if runtime is not None:
                rmtree(runtime, ignore_errors=True)
                removed.append(f"runtime {runtime}")
            rmtree(inst)
            removed.append(f"instance {inst.name}")
        finally:
            os.close(fd)
    return removed


def live_instance_keys(state_dir: Path) -> set[str]:
    """The build keys recorded by the live service instances on a state directory.

    Live: its lock is held (by any process, this one included). A dead
    instance's keys are not returned, and it is left for
    :func:`cleanup_dead_instances`; its lock is taken only for the moment
    of the test (a service starting then skips it once, as if alive).
    """
    keys: set[str] = set()
    instances = state_dir / "instances"
    if not instances.is_dir():
        return keys
    for inst in sorted(instances.iterdir()):
        try:
            # Not _try_lock: no O_CREAT, so nothing is made in a directory
            # its instance is deleting as it closes.
            fd = os.open(inst / "lock", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # no lock yet (its keys come after it), or gone
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                keys.update((inst / "keys").read_text().split())
            except OSError:
                pass  # no build yet
        finally:
            os.close(fd)
    return keys


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


def sweep_orphan_runtimes(*, older_than: float = 300.0) -> list[Path]:
    """Remove the runtime directories of instances that died more than
    ``older_than`` seconds ago, of any state directory on this host.

    A dead instance's runtime directory is removed by the next service on
    its state directory; when that directory is gone (a temporary one, a
    removed cache) nobody would, and the tmpfs would keep it for good. A
    live instance holds an flock on its runtime directory (seen from any
    pid namespace that shares the tmpfs); an instance is named
    ``<pid>-<nonce>``. One whose lock is free and whose process is gone,
    made longer ago than ``older_than`` (so not one still starting, or a
    pid just reused), with nothing mounted inside, goes. Returns what was
    removed.
    """
    home = _runtime_home()
    if home is None:
        return []
    removed = []
    now = time.time()
    for entry in sorted(home.iterdir()):
        pid, _, nonce = entry.name.partition("-")
        if not (pid.isdigit() and nonce) or _alive(int(pid)):
            continue
        try:
            if now - entry.lstat().st_mtime < older_than or entry.is_symlink() \
                    or not entry.is_dir():
                continue
            lock = _try_lock_dir(entry)
            if lock is None:
                continue  # alive, in a pid namespace of its own
            try:
                remove_bundle(entry)  # refuses while anything is mounted inside
            finally:
                os.close(lock)
        except (OSError, BuildError):
            continue
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
class Instance:
    """One live service instance's directories and lock."""

    dir: Path
    lock_fd: int
    #: Its runtime directory on a tmpfs (bundles/, trash/), or None.
    runtime: Path | None = None
    #: An flock on the runtime directory itself, held for the instance's
    #: life: seen by a sweep of any state directory, in any pid namespace.
    runtime_fd: int | None = None

    @classmethod
    def create(cls, state_dir: Path) -> Instance:
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
            runtime_fd = _try_lock_dir(runtime)
            (runtime / "bundles").mkdir(mode=0o711)
            (runtime / "rootfs").mkdir(mode=0o711)
            return cls(inst, fd, runtime, runtime_fd)
        return cls(inst, fd, runtime)

    def record_key(self, key: str) -> None:
        with open(self.dir / "keys", "a") as f:
            f.write(key + "\n")

    def close(self) -> None:
        if self.runtime is not None:
            rmtree(self.runtime, ignore_errors=True)
        if self.runtime_fd is not None:
            os.close(self.runtime_fd)
        rmtree(self.dir, ignore_errors=True)
        os.close(self.lock_fd)

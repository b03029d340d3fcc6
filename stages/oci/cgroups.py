"""A build's own cgroup, which holds its limits and remembers hitting them.

runc removes a container's cgroup when the container ends, and with it the
counters that tell an OOM kill from a builder that died of SIGKILL for
another reason. So the service makes one cgroup per build itself
(``ocibuild/<instance>/<key>``), puts the build's memory and process
limits on it, and runs the container in a child of it (``.../build``, the
config.json's ``cgroupsPath``; a bwrap sandbox on v1 joins the build's
cgroup itself) with no limits of its own: the limits are hit
in the build's cgroup, whose counters outlive the container
(``memory.oom_control``'s ``oom_kill`` and ``pids.events``' ``max`` on
cgroup v1; ``memory.events`` and ``pids.events`` on v2). The run stage
reads them to name the limit a failed build hit, and the cgroup is removed
with the container.

Caveats:

- cgroup v1 (this machine) and the unified v2 hierarchy are supported; the
  v2 path enables the memory and pids controllers down the tree. Only v1
  is exercised by the tests here.
- Without a writable cgroup file system (not root, no cgroupfs),
  :func:`available` is False and the service leaves the limits to runc
  (``linux.resources``): they still hold, but a hit is not named.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

__all__ = ["CGROUP_FS", "BuildCgroup", "available", "remove_tree", "sweep"]

CGROUP_FS = Path("/sys/fs/cgroup")
_V1_LIMITS = ("memory", "pids")


def _unified() -> bool:
    return (CGROUP_FS / "cgroup.controllers").exists()


def available() -> bool:
    """Whether this process can make cgroups with memory and pids limits."""
    if _unified():
        return os.access(CGROUP_FS, os.W_OK)
    return all(os.access(CGROUP_FS / c, os.W_OK) for c in _V1_LIMITS)


def _hierarchies() -> list[Path]:
    """Every mounted hierarchy runc may make a container's cgroup in (looked
    up once per cgroup root: a removal per build need not scan them again)."""
    cached = _HIERARCHIES.get(CGROUP_FS)
    if cached is not None:
        return cached
    if _unified():
        found = [CGROUP_FS]
    else:
        seen: set[Path] = set()
        found = []
        for entry in sorted(CGROUP_FS.iterdir()):
            real = entry.resolve()
            if entry.is_dir() and real not in seen and os.path.ismount(real):
                seen.add(real)
                found.append(real)
    _HIERARCHIES[CGROUP_FS] = found
    return found


_HIERARCHIES: dict[Path, list[Path]] = {}


def _rmdir(path: Path) -> None:
    """Remove an empty cgroup, waiting a while (5 s) for its last tasks to go."""
    for delay in (0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 1.0, 1.0, 1.0):
        time.sleep(delay)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise


def remove_tree(relative: str) -> None:
    """Remove ``relative`` (``ocibuild/<instance>``...) and everything below it,
    in every hierarchy, deepest first (cgroups go by rmdir, one by one)."""
    for hierarchy in _hierarchies():
        top = hierarchy / relative
        if not top.is_dir():
            continue
        dirs = [Path(d) for d, _, _ in os.walk(top)]
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            _rmdir(d)


def _number(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # missing on this kernel, or "max"
        return None


def sweep(root: str = "ocibuild", *, older_than: float = 300.0) -> list[str]:
    """Remove the build cgroups under ``root`` that hold no process and are
    older than ``older_than`` seconds: what a build left when its removal
    failed or its service died before the next start could name its key.
    A young empty cgroup may be a build about to start its container: kept."""
    top = CGROUP_FS / ("memory" if not _unified() else "") / root
    if not top.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in sorted(top.iterdir()):
        if not entry.is_dir():
            continue
        try:
            young = now - entry.stat().st_ctime < older_than
            busy = any((Path(d) / "cgroup.procs").read_text().strip()
                       for d, _, _ in os.walk(entry))
        except OSError:
            continue
        if young or busy:
            continue
        try:
            remove_tree(f"{root}/{entry.name}")
        except OSError:
            continue  # still busy: the next start tries again
        removed.append(entry.name)
    return removed


class BuildCgroup:
    """The cgroup ``relative`` (below the cgroup root) of one build."""

    def __init__(self, relative: str) -> None:
        self.relative = relative.strip("/")

    @property
    def container_path(self) -> str:
        """The ``cgroupsPath`` of the build's container: a child without limits."""
        return f"/{self.relative}/build"

    def create(self, *, max_memory: int | None, max_pids: int | None,
               leaf: bool = False) -> None:
        """Make the cgroup with its limits. ``leaf``: also what
        :meth:`procs_files` names, for a runtime that makes no cgroups."""
        if _unified():
            self._create_unified(max_memory, max_pids)
            if leaf:  # v2: no process in a cgroup that hands controllers down
                (CGROUP_FS / self.container_path.strip("/")).mkdir(exist_ok=True)
            return
        memory = CGROUP_FS / "memory" / self.relative
        pids = CGROUP_FS / "pids" / self.relative
        memory.mkdir(parents=True, exist_ok=True)
        pids.mkdir(parents=True, exist_ok=True)
        if max_memory is not None:
            (memory / "memory.limit_in_bytes").write_text(str(max_memory))
            swap = memory / "memory.memsw.limit_in_bytes"
            if swap.exists():  # swap accounting on: memory plus swap, the same bound
                swap.write_text(str(max_memory))
        if max_pids is not None:
            (pids / "pids.max").write_text(str(max_pids))

    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a process writes its pid to in order to run
        under the build's limits, for a runtime that does not make cgroups
        (made by ``create(leaf=True)``): on v1 the build's cgroup itself in
        each limiting hierarchy, on v2 its child :attr:`container_path`."""
        if _unified():
            return [CGROUP_FS / self.container_path.strip("/") / "cgroup.procs"]
        return [CGROUP_FS / controller / self.relative / "cgroup.procs"
                for controller in _V1_LIMITS]

    def _create_unified(self, max_memory: int | None, max_pids: int | None) -> None:
        parts = self.relative.split("/")
        node = CGROUP_FS
        for part in parts:
            with contextlib.suppress(OSError):  # already on, or not delegated to us
                (node / "cgroup.subtree_control").write_text("+memory +pids")
            node = node / part
            node.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            (node / "cgroup.subtree_control").write_text("+memory +pids")
        if max_memory is not None:
            (node / "memory.max").write_text(str(max_memory))
            with contextlib.suppress(FileNotFoundError):
                (node / "memory.swap.max").write_text("0")
        if max_pids is not None:
            (node / "pids.max").write_text(str(max_pids))

    def _counter(self, path: Path, name: str) -> int:
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def memory_limit_hit(self) -> bool:
        """Whether the build's memory use reached its limit (then an OOM kill is
        the kernel's). v2 counts the kills of the whole subtree here; v1
        counts them only in the victim's cgroup, which runc has removed by
        now, so on v1 the peak use reaching the limit is the evidence."""
        if _unified():
            return self._counter(CGROUP_FS / self.relative / "memory.events", "oom_kill") > 0
        memory = CGROUP_FS / "memory" / self.relative
        limit = _number(memory / "memory.limit_in_bytes")
        peaks = [_number(memory / f) for f in ("memory.max_usage_in_bytes",
                                               "memory.memsw.max_usage_in_bytes")]
        return limit is not None and any(p is not None and p >= limit for p in peaks)

    def pids_limit_hit(self) -> bool:
        """Whether the build's processes reached its process limit (a fork failed)."""
        base = (CGROUP_FS if _unified() else CGROUP_FS / "pids") / self.relative
        if self._counter(base / "pids.events", "max") > 0:
            return True
        peak, limit = _number(base / "pids.peak"), _number(base / "pids.max")
        return peak is not None and limit is not None and peak >= limit

    def remove(self) -> None:
        remove_tree(self.relative)

"""A Ray cluster of several build nodes on this one machine: :class:`LocalCluster`.

For trying ocibuild on Ray, and for its tests and benchmarks: each node is
its own raylet (``ocibuild ray-worker``, so ``ray start``) with its own Ray
temp dir, state directory and ``ocibuild`` resource, started in a session
of its own so that :meth:`LocalCluster.stop` ends exactly its processes
(never another Ray cluster on the machine). The GCS health checks are
shortened (:data:`FAST_HEALTH_CHECKS`) so that a killed raylet is noticed
in about two seconds instead of thirty.

::

    cluster = LocalCluster(Path("/tmp/c"), nodes=2, jobs=2)
    cluster.start()          # head node 0, node 1 joins
    ...                      # RAY_ADDRESS=cluster.address; ray://auto
    cluster.stop()

Caveat: paths under ``base`` hold Ray's unix sockets: keep ``base`` short
(a socket path has at most 107 bytes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["FAST_HEALTH_CHECKS", "LocalCluster"]

#: GCS settings (environment of the head's raylet) that notice a dead node fast.
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500",
                      "RAY_health_check_failure_threshold": "3",
                      "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_initial_delay_ms": "0",
                      "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """``nodes`` build nodes of ``jobs`` containers each under ``base``."""

    def __init__(self, base: Path, *, nodes: int = 2, jobs: int = 2) -> None:
        self.base = base
        self.nodes = nodes
        self.jobs = jobs
        self.port = free_port()
        self.client_port = free_port()
        self.sessions: list[int] = []  # process groups of the nodes' Ray processes

    @property
    def address(self) -> str:
        """The head's GCS address (``RAY_ADDRESS`` for ``ray://auto``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def client_address(self) -> str:
        """The Ray Client address of the head (``ray://HOST:PORT``)."""
        return f"ray://127.0.0.1:{self.client_port}"

    @property
    def env(self) -> dict[str, str]:
        """An environment for clients of this cluster (ray://auto finds it)."""
        return {**os.environ, "RAY_ADDRESS": self.address, **FAST_HEALTH_CHECKS}

    def state(self, i: int) -> Path:
        return self.base / f"n{i}state"

    def temp(self, i: int) -> Path:
        return self.base / f"t{i}"

    def start(self) -> None:
        for i in range(self.nodes):
            self.start_node(i)

    def start_node(self, i: int, *, plain_ray_start: bool = False) -> None:
        """Node ``i`` (0: the head), by ``ocibuild ray-worker`` or, with
        ``plain_ray_start``, by the documented ``ray start`` line alone."""
        ray_args = ["--temp-dir", str(self.temp(i)), "--num-cpus", "1"]
        if i == 0:
            ray_args += ["--ray-client-server-port", str(self.client_port),
                         "--include-dashboard=false"]
        where = (["--head", "--port", str(self.port)] if i == 0
                 else ["--address", self.address])
        env = {**os.environ, **FAST_HEALTH_CHECKS}
        if plain_ray_start:
            ray = str(Path(sys.executable).parent / "ray")
            argv = [ray, "start", *where, "--resources", f'{{"ocibuild": {self.jobs}}}',
                    *ray_args]
            env["OCIBUILD_STATE"] = str(self.state(i))
        else:
            argv = [sys.executable, "-m", "stages.cli", "ray-worker", *where, "--jobs",
                    str(self.jobs), "--state-dir", str(self.state(i)), "--", *ray_args]
        proc = subprocess.Popen(argv, env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sessions.append(proc.pid)
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"node {i} did not start ({proc.returncode}): {out[-2000:]}")

    def raylet_pid(self, i: int) -> int:
        """The pid of node ``i``'s raylet."""
        needle = f"--temp_dir={self.temp(i)}".encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if needle in cmd and b"raylet/raylet" in cmd:
                return int(pid)
        raise LookupError(f"node {i} has no raylet")

    def kill_node(self, i: int) -> None:
        """SIGKILL node ``i``'s raylet (its workers die with it)."""
        os.kill(self.raylet_pid(i), signal.SIGKILL)

    def stop(self) -> None:
        """SIGKILL every process of the cluster's nodes."""
        for pgid in self.sessions:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.sessions.clear()
        time.sleep(0.5)

"""The sweep of leftover build cgroups: real cgroups (root; the cgroup file system)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest

from stages.oci import cgroups

pytestmark = pytest.mark.root


def test_old_empty_cgroups_go_young_or_busy_ones_stay() -> None:
    root = f"ocibuild-test-{uuid.uuid4().hex[:8]}"
    names = {n: cgroups.BuildCgroup(f"{root}/{n}") for n in ("old1", "old2", "busy")}
    for cg in names.values():
        cg.create(max_memory=64 << 20, max_pids=16)
    busy_dir = cgroups.CGROUP_FS / ("" if cgroups._unified() else "pids") / root / "busy"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (busy_dir / "cgroup.procs").write_text(str(sleeper.pid))
        if not cgroups._unified():  # the sweep looks at the memory hierarchy on v1
            mem = cgroups.CGROUP_FS / "memory" / root / "busy" / "cgroup.procs"
            mem.write_text(str(sleeper.pid))
        time.sleep(1.1)
        cgroups.BuildCgroup(f"{root}/young").create(max_memory=None, max_pids=None)
        assert sorted(cgroups.sweep(root, older_than=1.0)) == ["old1", "old2"]
        assert cgroups.sweep(root, older_than=1.0) == []  # young is young, busy is busy
    finally:
        sleeper.kill()
        sleeper.wait()
        cgroups.remove_tree(root)

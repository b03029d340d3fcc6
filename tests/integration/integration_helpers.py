"""Helpers shared by integration tests that run services, containers and CLIs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["processes_with", "remove_state_tree"]


def processes_with(text: str) -> list[int]:
    """The pids (other than this process) whose command line contains ``text``."""
    needle = text.encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if needle in cmd and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def remove_state_tree(base: Path) -> None:
    """Whatever a failed test left under ``base``: the containers and mounts of
    every service state directory there (``*state``), then the directory."""
    for root in base.glob("*state/instances/*/runc"):
        for cid in subprocess.run(["runc", "--root", str(root), "list", "-q"],
                                  capture_output=True, text=True).stdout.split():
            subprocess.run(["runc", "--root", str(root), "delete", "--force", cid],
                           capture_output=True)
    for mnt in base.glob("*state/instances/*/mnt"):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)

"""`ocibuild castore import --json | ocibuild castore mount MNT`, end to end.

The real console script imports a tree into a local store, then serves it at a
real FUSE mount; the mount must show the source (types, bytes, exec bits,
symlink targets), and SIGINT/SIGTERM must unmount it and exit 0. Whatever
happens, no mount and no process is left behind.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.castore.fuse import cleanup_stale_mounts
from stages.castore.fuse.mounts import find_mount

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]

OCIBUILD = Path(sys.executable).parent / "ocibuild"


def walk(root: Path) -> dict[str, tuple]:
    """Everything below root: type, bytes or target, and the exec bit."""
    seen: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                seen[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                seen[rel] = ("dir",)
            else:
                seen[rel] = ("file", path.read_bytes(), bool(st.st_mode & stat.S_IXUSR))
    return seen


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_import_then_mount_then_signal(tmp_path: Path, sig: signal.Signals) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "bin").mkdir(parents=True)
    (src / "pkg" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (src / "pkg" / "bin" / "tool").chmod(0o755)
    (src / "pkg" / "data").write_bytes(os.urandom(3 << 20))
    (src / "pkg" / "empty").write_bytes(b"")
    (src / "pkg" / "link").symlink_to("bin/tool")
    (src / "pkg" / "dangling").symlink_to("/no/such/path")
    (src / "notes.txt").write_bytes(b"a lone file\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR")}
    env["OCIBUILD_STORE"] = str(tmp_path / "store")

    lines = subprocess.run([str(OCIBUILD), "castore", "import", "--json",
                            str(src / "pkg"), str(src / "notes.txt")],
                           env=env, check=True, capture_output=True).stdout
    proc = subprocess.Popen([str(OCIBUILD), "castore", "mount", str(mnt)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(lines)
        proc.stdin.close()
        deadline = time.monotonic() + 30
        while find_mount(Path(os.path.realpath(mnt))) is None:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the mount never appeared"
            time.sleep(0.05)
        assert sorted(os.listdir(mnt)) == ["notes.txt", "pkg"]
        assert walk(mnt) == walk(src)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert proc.returncode == 0, proc.stderr.read().decode()
        assert find_mount(Path(os.path.realpath(mnt))) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        left = cleanup_stale_mounts(tmp_path)
        assert not left, f"a FUSE mount was left at {left}"

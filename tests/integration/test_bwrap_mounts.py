"""The bwrap renderer's view of the host's mounts below a read-only bind source.

Whatever is mounted below a read-only bind is made read-only too; the
renderer finds those mounts from the source's real path, whose parents it
remembers between builds. A change of the mount table must not leave it a
stale answer (a real mount, real links).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from stages.oci.bwrap import _MountTable

pytestmark = pytest.mark.root


def test_a_source_moved_onto_a_bind_mount_with_a_mount_below_is_seen() -> None:
    # Two bind mounts of one directory have the same (st_dev, st_ino): only
    # the mount table tells them apart.
    base = Path(tempfile.mkdtemp(prefix="ocibuild-bwrap-mounts-", dir="/var/tmp"))
    mounted: list[Path] = []
    try:
        (base / "X" / "d" / "sub").mkdir(parents=True)
        (base / "Y").mkdir()
        (base / "ro").symlink_to(base / "X")
        assert _MountTable().below(str(base / "ro" / "d")) == []
        subprocess.run(["mount", "--bind", str(base / "X"), str(base / "Y")], check=True)
        mounted.append(base / "Y")
        subprocess.run(["mount", "--make-private", str(base / "Y")], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(base / "Y" / "d" / "sub")],
                       check=True)
        mounted.append(base / "Y" / "d" / "sub")
        os.unlink(base / "ro")
        (base / "ro").symlink_to(base / "Y")
        assert _MountTable().below(str(base / "ro" / "d")) == ["sub"]
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", str(m)], check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)

"""Finding and removing FUSE mounts through /proc/self/mountinfo.

A builder that restarts after a crash calls :func:`cleanup_stale_mounts` on
its mount directory before mounting again: whatever a dead server left there
is detached lazily (MNT_DETACH), so processes still inside it do not block
the cleanup.

Caveats:

- Only mounts whose filesystem type starts with ``fuse`` are touched.
- Lazy unmounting needs CAP_SYS_ADMIN (root); without it ``fusermount3 -u
  -z`` is tried, which only works for mounts the caller owns.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from pathlib import Path

import attrs

from stages.castore.fuse.errors import MountError

__all__ = [
    "MountInfo", "cleanup_stale_mounts", "find_mount", "fuse_mounts", "lazy_unmount",
    "resolve_without_entering",
]

MNT_DETACH = 2


@attrs.frozen(kw_only=True)
class MountInfo:
    """One line of /proc/self/mountinfo, the parts we use."""

    mountpoint: Path
    device: str  # "major:minor"
    fstype: str
    source: str


def _unescape(raw: bytes) -> bytes:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def read_mountinfo() -> list[MountInfo]:
    mounts = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            before, _, after = line.rstrip(b"\n").partition(b" - ")
            fields = before.split(b" ")
            tail = after.split(b" ")
            mounts.append(MountInfo(
                mountpoint=Path(os.fsdecode(_unescape(fields[4]))),
                device=fields[2].decode(),
                fstype=tail[0].decode(errors="replace"),
                source=os.fsdecode(_unescape(tail[1])) if len(tail) > 1 else ""))
    return mounts


def fuse_mounts() -> list[MountInfo]:
    return [m for m in read_mountinfo() if m.fstype.startswith("fuse")]


def resolve_without_entering(path: Path) -> Path:
    """The canonical path, without stat()ing ``path`` itself.

    ``os.path.realpath(mountpoint)`` lstat()s the mountpoint, which hangs
    forever when the FUSE server behind it is hung; resolving only the parent
    never touches the mount.
    """
    path = Path(os.path.abspath(path))
    if path.parent == path:
        return path
    return Path(os.path.realpath(path.parent)) / path.name


def find_mount(mountpoint: Path) -> MountInfo | None:
    """The last (topmost) mount at exactly this path, if any (never stats it)."""
    target = resolve_without_entering(mountpoint)
    found = None
    for m in read_mountinfo():
        if m.mountpoint == target:
            found = m
    return found


def lazy_unmount(path: Path) -> None:
    """Detach the mount at path now; it goes away once nothing uses it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), MNT_DETACH) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EINVAL and find_mount(path) is None:
        return  # already gone: fusermount3's auto_unmount raced us to it
    tool = shutil.which("fusermount3")
    if tool is not None:
        done = subprocess.run([tool, "-u", "-z", "--", str(path)], capture_output=True)
        if done.returncode == 0:
            return
    raise MountError(path, f"cannot unmount: {os.strerror(err)}")


def cleanup_stale_mounts(under: Path) -> list[Path]:
    """Lazily unmount every FUSE mount at or below ``under``; return their paths.

    Deepest first, so nested mounts come off before their parents.
    """
    base = resolve_without_entering(under)
    stale = sorted({m.mountpoint for m in fuse_mounts()
                    if m.mountpoint == base or base in m.mountpoint.parents},
                   key=lambda p: len(p.parts), reverse=True)
    for path in stale:
        lazy_unmount(path)
    return stale

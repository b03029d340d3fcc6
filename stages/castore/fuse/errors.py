"""Errors of the castore FUSE view.

::

    CastoreError (stages.castore.errors)
    └── MountError          a mount cannot be made, used or served (mountpoint=)

A MountError that comes from the mount-server process carries the tail of
its stderr, so the reason it died is in the message.
"""

from __future__ import annotations

from pathlib import Path

from stages.castore.errors import CastoreError

__all__ = ["MountError"]


class MountError(CastoreError):
    """A FUSE mount of castore cannot be made, used or served."""

    def __init__(self, mountpoint: Path | str | None, message: str, *,
                 stderr_tail: str = "") -> None:
        self.mountpoint = Path(mountpoint) if mountpoint is not None else None
        self.stderr_tail = stderr_tail
        where = f"mount {mountpoint}: " if mountpoint is not None else ""
        text = where + message
        if stderr_tail.strip():
            text += "\n--- mount server stderr (tail) ---\n" + stderr_tail.rstrip()
        super().__init__(text)

"""A mount server started before its mount is known: its boot overlaps the owner's.

The mount server's Python start-up (trio, pyfuse3, the store: ~0.3 s here)
is most of the time before a command's first build can mount its inputs.
A command that will need one calls :func:`prestart` first thing, before its
own imports (this module imports only the standard library); the server
imports what it needs meanwhile, then waits on its stdin for its settings.
:class:`~stages.castore.fuse.client.MountServer` takes the spare, if one
is waiting, instead of starting a server of its own (:func:`take`), and
sends it the settings as the first line of the control channel.

A spare nobody takes goes away with its owner: it exits when its stdin
closes (at the owner's exit at the latest), and on the owner's death
(PR_SET_PDEATHSIG). One spare per process, started from the main thread.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys

__all__ = ["prestart", "take"]

_spare: subprocess.Popen | None = None


def prestart() -> None:
    """Start the process's spare mount server, unless one is waiting already."""
    global _spare
    if _spare is not None:
        return
    _spare = subprocess.Popen(
        [sys.executable, "-m", "stages.castore.fuse.server", "--owner-pid", str(os.getpid()),
         "--settings-from-stdin"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    atexit.register(_discard)


def take() -> subprocess.Popen | None:
    """The waiting spare, now the caller's (None if there is none or it died)."""
    global _spare
    spare, _spare = _spare, None
    if spare is not None and spare.poll() is not None:
        _close(spare)
        return None
    return spare


def _close(spare: subprocess.Popen) -> None:
    for pipe in (spare.stdin, spare.stdout, spare.stderr):
        if pipe is not None:
            pipe.close()


def _discard() -> None:
    """At exit: a spare nobody took reads the end of its stdin and exits."""
    global _spare
    spare, _spare = _spare, None
    if spare is None:
        return
    _close(spare)
    try:
        spare.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        spare.kill()
        spare.wait()

"""Castore nodes as a read-only FUSE filesystem, shared by concurrent builds.

Public face::

    MountServer(mountpoint, *, blob_address=None, directory_address=None)
        async context manager (asyncio): one mount-server subprocess, one
        mountpoint; ``await add(key, nodes) -> mountpoint/key``,
        ``await remove(key)``.
    serve_until_signal(mountpoint, nodes, blob_address, directory_address)
        blocking, in-process: serve nodes at the mountpoint's top until
        SIGINT/SIGTERM (``ocibuild castore mount``).
    cleanup_stale_mounts(under) -> list[Path]
        lazily unmount FUSE mounts a dead builder left below a directory.
    MountError
        every failure here (a CastoreError).

Decision: how concurrent builds share FUSE
------------------------------------------

pyfuse3 keeps one FUSE session per process. ocibuild runs ONE long-lived
mount-server subprocess per owning process (trio + pyfuse3), with one
mountpoint and a top-level directory per build key. The owner adds and
removes keys over JSON lines on the server's stdin/stdout, each acknowledged;
a build bind-mounts only the entries of its own key into its container, so
builds never see each other's inputs. Measured here (2 cores, bench/bench_fuse.py
``--compare``; medians):

- adding a key to the running server: ~0.1 ms round trip, against ~200 ms to
  start a fresh server process and mount (Python start-up, imports, mount):
  a process per build would add that latency to every build, and one
  session per build also means one fusermount3 helper per build;
- an in-process server thread shares the GIL with the builder: with the
  owner busy in Python, sequential reads through the mount dropped to a
  fraction of the subprocess figure (see the bench), while the subprocess
  server is unaffected;
- the subprocess reads the store itself (pread on the pack), so blob bytes
  never cross the control channel.

Numbers (bench/bench_fuse.py, 512 MiB file, 2 cores): see the table in
:mod:`stages.castore.fuse.fs`'s sibling README section below.

Lifetime: the mount goes away when its owner stops. Closing the control
channel (owner exits or calls __aexit__) or SIGTERM/SIGINT makes the server
unmount and exit; PR_SET_PDEATHSIG turns the owner's death, even by
SIGKILL, into a SIGTERM for the server; if the server itself is SIGKILLed,
libfuse's ``auto_unmount`` (the fusermount3 helper watching the session)
removes the mount. A builder that restarts calls cleanup_stale_mounts() on
its mount directory first.

Mount options: ``ro`` (the kernel refuses writes; handlers answer EROFS as a
backstop), ``allow_other`` (container user namespaces map to other host
uids), ``default_permissions`` (the kernel enforces the 0o444/0o555 bits, so
a non-executable file cannot be executed and the filesystem checks nothing
itself), ``auto_unmount``, ``noatime``. The server raises the mount's kernel
readahead (``/sys/class/bdi/<dev>/read_ahead_kb``, default 4096 KiB,
``OCIBUILD_FUSE_READ_AHEAD_KB``) so sequential reads arrive as 1 MiB
requests.

Integrity: each blob is hashed once per server lifetime, at the first open
of a file using it (BLAKE3, ~4 GB/s: ~0.13 s for 512 MiB). A corrupt or
missing blob makes open() fail with EIO and logs a line naming the digest;
bytes are never served unverified. Reads after that are unverified preads,
and FileInfo.keep_cache keeps pages in the page cache across opens.

Caveats:

- Only ``local://`` stores can be served (the server opens the store in its
  own process); ``memory://`` is refused with a clear error.
- Start MountServer from the owner's main thread (PR_SET_PDEATHSIG follows
  the starting thread).
- Inodes are never freed while the mount lives (stable numbers); memory grows
  with the distinct paths looked up.
"""

from __future__ import annotations

from stages.castore.fuse.client import MountServer, serve_until_signal
from stages.castore.fuse.errors import MountError
from stages.castore.fuse.mounts import cleanup_stale_mounts

__all__ = ["MountError", "MountServer", "cleanup_stale_mounts", "serve_until_signal"]

"""The mount-server process: one pyfuse3 session under trio, edited by its owner.

Run as ``python -m stages.castore.fuse.server --mountpoint DIR --owner-pid PID
[--blob-address A] [--directory-address A] [--uid N] [--gid N]`` (MountServer
does this; ``--uid``/``--gid`` own every entry, default 0). The
control channel is the process's stdin/stdout, one JSON object per line:

    owner -> server   {"op": "add", "key": "k", "nodes": [<proto-JSON Node>, ...]}
                      {"op": "remove", "key": "k"}
                      {"op": "ping"}
    server -> owner   {"ready": true, "pid": N}             once, after mounting
                      {"ok": true} | {"ok": false, "error": "..."}   one per request

Besides the keys, the mount's root holds ``.by-digest``, the content
directory (:mod:`stages.castore.fuse.content`): anything in the store, by
digest, without a request.

A spare server (``--settings-from-stdin``, see :mod:`stages.castore.fuse.spare`)
takes ``--owner-pid`` only, imports everything, then reads the other
options as the first line on stdin, ``{"mountpoint": ..., "blob_address":
..., "directory_address": ..., "uid": N, "gid": N}``; it exits quietly
when stdin ends before that line.

Log lines go to stderr. The server unmounts and exits when its stdin closes,
on SIGTERM/SIGINT, and (through PR_SET_PDEATHSIG) when its owner dies; if it
is itself SIGKILLed, fusermount3's ``auto_unmount`` removes the mount.

Caveats:

- Requests are answered in order, one at a time; they are cheap (no store
  access), so this never queues for long.
- PR_SET_PDEATHSIG fires when the *thread* that started the server exits;
  start it from the owner's main thread (asyncio's subprocess support does).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from stages.castore.errors import CastoreError
from stages.castore.fuse.fs import CastoreFS
from stages.castore.fuse.mounts import find_mount
from stages.castore.fuse.store import open_reader
from stages.castore.nodes import node_from_json_value, validate_name

__all__ = ["MOUNT_OPTIONS", "main", "serve"]

log = logging.getLogger("ocibuild.castore.fuse")

# ro: the kernel refuses writes itself. allow_other: processes in a
# container's user namespace (other host uids) may read. default_permissions:
# the kernel checks the mode bits (0o444 files cannot be executed), so the
# filesystem never has to. auto_unmount: fusermount3 unmounts if we die.
MOUNT_OPTIONS = frozenset({
    "fsname=castore", "subtype=ocibuild", "ro", "allow_other",
    "default_permissions", "auto_unmount", "noatime",
})
# Kernel readahead for the mount, in KiB (the kernel's default is 128).
READ_AHEAD_KB = int(os.environ.get("OCIBUILD_FUSE_READ_AHEAD_KB", "4096"))

PR_SET_PDEATHSIG = 1


def _die_with_owner(owner_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The owner may have died before prctl took effect.
    if os.getppid() != owner_pid:
        raise SystemExit(f"owner process {owner_pid} is already gone")


def _tune_readahead(mountpoint: Path) -> None:
    # Never stat() the mountpoint here: that would wait on our own filesystem.
    info = find_mount(mountpoint)
    if info is None or not info.fstype.startswith("fuse") or READ_AHEAD_KB <= 0:
        return
    path = Path("/sys/class/bdi") / info.device / "read_ahead_kb"
    try:
        path.write_text(str(READ_AHEAD_KB))
    except OSError as exc:  # not fatal: reads just go in smaller steps
        log.warning("cannot raise readahead through %s: %s", path, exc)


class _Control:
    """The owner's requests on stdin, answered on stdout."""

    def __init__(self, fs: CastoreFS) -> None:
        self.fs = fs
        self.out = trio.lowlevel.FdStream(os.dup(1))
        self.inp = trio.lowlevel.FdStream(os.dup(0))

    async def send(self, message: dict) -> None:
        await self.out.send_all(json.dumps(message).encode() + b"\n")

    def handle(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
            op = request.get("op") if isinstance(request, dict) else None
            if op == "ping":
                return {"ok": True}
            key = request.get("key")
            if not isinstance(key, str):
                return {"ok": False, "error": "request needs a string 'key'"}
            raw_key = os.fsencode(key)
            validate_name(raw_key)
            if op == "add":
                nodes = [node_from_json_value(n) for n in request.get("nodes", [])]
                self.fs.add_key(raw_key, nodes)
                return {"ok": True}
            if op == "remove":
                self.fs.remove_key(raw_key)
                return {"ok": True}
            return {"ok": False, "error": f"unknown op {op!r}; known: add, remove, ping"}
        except KeyError as exc:
            return {"ok": False, "error": str(exc.args[0])}
        except (CastoreError, ValueError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}

    async def run(self, ready: trio.Event) -> None:
        await ready.wait()
        await self.send({"ready": True, "pid": os.getpid()})
        buffer = b""
        while True:
            chunk = await self.inp.receive_some(1 << 16)
            if not chunk:
                log.info("owner closed the control channel; unmounting")
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    await self.send(self.handle(line))


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("got %s; unmounting", signal.Signals(signum).name)
            return


async def _settle(mountpoint: Path, ready: trio.Event) -> None:
    # The kernel's INIT exchange overwrites the readahead, so wait for it: a
    # stat() from another thread returns once our loop has answered INIT.
    await trio.to_thread.run_sync(os.stat, mountpoint)
    _tune_readahead(mountpoint)
    log.info("serving castore at %s", mountpoint)
    ready.set()


async def serve(fs: CastoreFS, mountpoint: Path, *, control: bool) -> None:
    """Mount ``fs`` at ``mountpoint`` and serve until a stop condition.

    Stops on SIGTERM/SIGINT and, with ``control``, when stdin closes. Always
    unmounts before returning.
    """
    pyfuse3.init(fs, str(mountpoint), set(MOUNT_OPTIONS))
    try:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()

            async def stop_after(fn: Callable, *args: object) -> None:
                await fn(*args)
                pyfuse3.terminate()

            nursery.start_soon(stop_after, _until_signal)
            nursery.start_soon(_settle, mountpoint, ready)
            if control:
                nursery.start_soon(stop_after, _Control(fs).run, ready)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


#: The settings a spare server (``--settings-from-stdin``) reads as its
#: first line: the options of the same names.
SETTINGS = ("mountpoint", "blob_address", "directory_address", "uid", "gid")


def _read_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """Fill ``args`` from the first line on stdin; False if stdin ended first.

    Read a byte at a time: what follows the line is the control channel's.
    """
    import json

    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            return False
        line += byte
    try:
        settings = json.loads(line)
        if not isinstance(settings, dict) or not set(settings) <= set(SETTINGS):
            raise ValueError(f"settings must be an object with keys among {SETTINGS}")
        for key, value in settings.items():
            wanted, what = (int, "an integer") if key in ("uid", "gid") else (str, "a string")
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise ValueError(f"{key} must be {what}, not {value!r}")
    except ValueError as exc:
        parser.error(f"bad settings line: {exc}")
    for key, value in settings.items():
        setattr(args, key, Path(value) if key == "mountpoint" else value)
    if args.mountpoint is None:
        parser.error("the settings name no mountpoint")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.castore.fuse.server")
    parser.add_argument("--mountpoint", type=Path)
    parser.add_argument("--owner-pid", required=True, type=int)
    parser.add_argument("--blob-address")
    parser.add_argument("--directory-address")
    parser.add_argument("--uid", type=int, default=0, help="owner of every entry (default 0)")
    parser.add_argument("--gid", type=int, default=0, help="group of every entry (default 0)")
    parser.add_argument("--settings-from-stdin", action="store_true",
                        help="a spare: read the settings above as a JSON line first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="ocibuild-fuse[%(process)d] %(levelname)s %(message)s")
    _die_with_owner(args.owner_pid)
    if args.settings_from_stdin:
        # The store's modules now, while the owner has not decided on them.
        import stages.castore.local  # noqa: F401

        if not _read_settings(parser, args):
            return 0  # nobody took this spare
    elif args.mountpoint is None:
        parser.error("--mountpoint is required (or --settings-from-stdin)")
    try:
        fs = CastoreFS(open_reader(args.blob_address, args.directory_address),
                       uid=args.uid, gid=args.gid, content=True)
    except ValueError as exc:
        print(f"ocibuild-fuse: error: {exc}", file=sys.stderr)
        return 2
    except CastoreError as exc:
        print(f"ocibuild-fuse: error: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(functools.partial(serve, fs, args.mountpoint.absolute(), control=True))
    except CastoreError as exc:
        print(f"ocibuild-fuse: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"ocibuild-fuse: error: cannot mount {args.mountpoint}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    # Unmounted and done: skip the interpreter's teardown (~0.1 s of freeing
    # modules), which the owner waits for when it stops the server.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

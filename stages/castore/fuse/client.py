"""The owner's side: MountServer (asyncio) and the blocking single-tree mount."""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import TracebackType

from stages.castore.errors import CastoreError
from stages.castore.fuse import spare
from stages.castore.fuse.content import CONTENT_DIR, content_name
from stages.castore.fuse.errors import MountError
from stages.castore.fuse.mounts import find_mount, lazy_unmount
from stages.castore.fuse.store import check_servable, resolve_addresses
from stages.castore.nodes import Node, node_to_json_value, validate_name
from stages.util.aio import AdoptedProcess

__all__ = ["MountServer", "serve_until_signal"]

log = logging.getLogger("ocibuild.castore.fuse")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
STDERR_TAIL_LINES = 40


def check_mountpoint(mountpoint: Path) -> Path:
    """The absolute mountpoint, or MountError saying why it cannot be used."""
    if not os.path.exists("/dev/fuse"):
        raise MountError(mountpoint, "/dev/fuse is missing (is the fuse module loaded?)")
    path = Path(os.path.abspath(mountpoint))
    existing = find_mount(path)
    if existing is not None:
        raise MountError(mountpoint, f"something is already mounted there "
                                     f"({existing.fstype} from {existing.source})")
    if not path.exists():
        raise MountError(mountpoint, "the mountpoint does not exist")
    if not path.is_dir():
        raise MountError(mountpoint, "the mountpoint is not a directory")
    return path


def _check_addresses(blob_address: str | None, directory_address: str | None,
                     mountpoint: Path) -> tuple[str, str]:
    blob, directory = resolve_addresses(blob_address, directory_address)
    try:
        check_servable(blob)
        check_servable(directory)
    except CastoreError as exc:
        raise MountError(mountpoint, str(exc)) from exc
    return blob, directory


class MountServer:
    """One long-lived mount-server process with one subtree per build key.

    ``async with MountServer(mp) as server:`` starts the server and returns
    once the mount is live; ``await server.add(key, nodes)`` makes
    ``mp/<key>/<name>`` visible and returns ``mp/<key>``; leaving the block
    stops the server and unmounts, also on error and cancellation. Every
    entry is owned by ``uid``/``gid`` (host ids; root by default).

    Anything in the store is also at :meth:`content_path` with no request
    (the content directory, :mod:`stages.castore.fuse.content`): the build
    service binds inputs from there.
    """

    def __init__(self, mountpoint: Path, *, blob_address: str | None = None,
                 directory_address: str | None = None, uid: int = 0, gid: int = 0) -> None:
        for what, value in (("uid", uid), ("gid", gid)):
            if not isinstance(value, int) or isinstance(value, bool) or not (
                    0 <= value < 2**32 - 1):
                raise MountError(mountpoint, f"the files' {what} must be an id in "
                                             f"0..{2**32 - 2}, not {value!r}")
        self.uid = uid
        self.gid = gid
        self.mountpoint = Path(os.path.abspath(mountpoint))
        self._blob_address = blob_address
        self._directory_address = directory_address
        self._proc: asyncio.subprocess.Process | AdoptedProcess | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._keys: set[str] = set()
        self._ready: asyncio.Task[None] | None = None
        self._revive_lock = asyncio.Lock()
        #: How many server processes this MountServer has started (a revived
        #: server counts again): a build that saw it change lost its inputs.
        self.generation = 0
        #: The server's ERROR lines (bad data it refused to serve, as EIO),
        #: numbered: see :meth:`faults_since`.
        self._faults: collections.deque[tuple[int, str]] = collections.deque(maxlen=100)
        self._fault_count = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    async def __aenter__(self) -> MountServer:
        await self.start()
        await self.wait_ready()
        return self

    async def start(self) -> None:
        """Start the server process without waiting for the mount.

        The mount comes up meanwhile (~0.3 s of Python start-up in the
        server, less when a spare was prestarted: it is taken, see
        :mod:`stages.castore.fuse.spare`); :meth:`add` waits for it, and so
        does :meth:`wait_ready`.
        Use ``async with`` unless there is other work to overlap with that.
        """
        if self._proc is not None:
            return
        self.generation += 1
        mountpoint = check_mountpoint(self.mountpoint)
        blob, directory = _check_addresses(self._blob_address, self._directory_address,
                                           mountpoint)
        prestarted = spare.take()
        if prestarted is not None:
            # Booted already (stages.castore.fuse.spare): tell it its settings.
            self._proc = await AdoptedProcess.adopt(prestarted)
            self._proc.stdin.write(json.dumps({
                "mountpoint": str(mountpoint), "blob_address": blob,
                "directory_address": directory, "uid": self.uid, "gid": self.gid,
            }).encode() + b"\n")
        else:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "stages.castore.fuse.server",
                "--mountpoint", str(mountpoint), "--owner-pid", str(os.getpid()),
                "--blob-address", blob, "--directory-address", directory,
                "--uid", str(self.uid), "--gid", str(self.gid),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        self._stderr_task = asyncio.create_task(self._drain_stderr())
        self._ready = asyncio.create_task(self._read_ready(mountpoint))

    async def wait_ready(self) -> None:
        """Return once the mount is live; MountError (server stopped) if it fails."""
        if self._ready is None:
            raise MountError(self.mountpoint, "the mount server was not started",
                             stderr_tail=self.stderr_tail())
        try:
            await asyncio.shield(self._ready)
        except asyncio.CancelledError:
            if not self._ready.done():
                raise  # our caller was cancelled; the server stays for __aexit__
            await self._stop()
            raise MountError(self.mountpoint, "the mount server's start was cancelled") from None
        except BaseException:
            await self._stop()
            raise

    async def _read_ready(self, mountpoint: Path) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            raise MountError(mountpoint, f"the mount server did not mount within "
                                         f"{START_TIMEOUT:.0f} s",
                             stderr_tail=self.stderr_tail()) from None
        if not line:
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                pass
            await self._stderr_done()
            raise MountError(mountpoint, f"the mount server exited with status "
                                         f"{proc.returncode} before mounting",
                             stderr_tail=self.stderr_tail())
        ready = json.loads(line)
        if not ready.get("ready"):
            raise MountError(mountpoint, f"unexpected first message {line!r}",
                             stderr_tail=self.stderr_tail())

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._stop()

    async def _drain_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self._stderr.append(text)
            log.info("%s", text)
            _, sep, fault = text.partition(" ERROR ")
            if sep:
                self._fault_count += 1
                self._faults.append((self._fault_count, fault))

    def fault_mark(self) -> int:
        """A mark for :meth:`faults_since` (how many faults were seen so far)."""
        return self._fault_count

    def faults_since(self, mark: int) -> list[str]:
        """What the server refused to serve since ``mark`` (digest, file name, why)."""
        return [text for n, text in self._faults if n > mark]

    async def _stderr_done(self) -> None:
        if self._stderr_task is not None:
            await asyncio.wait([self._stderr_task], timeout=1.0)

    @property
    def content_root(self) -> Path:
        """The content directory: ``<mountpoint>/.by-digest``."""
        return self.mountpoint / CONTENT_DIR

    def content_path(self, node: Node) -> Path:
        """Where a directory's or file's content is in the mount (no request needed).

        Valid once :meth:`ensure_running` returned; a symlink has no content
        path (ValueError).
        """
        return self.content_root / content_name(node)

    @property
    def exit_status(self) -> int | None:
        """The server's exit status if it died (was not stopped by us), else None."""
        proc = self._proc
        return proc.returncode if proc is not None else None

    async def revive(self) -> int | None:
        """Replace a server that died (killed, crashed) with a new one.

        Returns the dead server's exit status, or None when it was alive.
        The dead mount is detached first (builds still using it get
        ENOTCONN; later builds bind from the new one). Concurrent callers
        revive once.
        """
        async with self._revive_lock:
            if self._ready is not None and not self._ready.done():
                return None  # starting
            status = self.exit_status
            if status is None:
                return None
            log.warning("the mount server at %s died (exit status %s); starting a new one",
                        self.mountpoint, status)
            await self._stop()
            await self.start()
            await self.wait_ready()
            return status

    async def ensure_running(self) -> None:
        """Return once the mount is live; MountError if the server is not running."""
        if self._ready is not None and not self._ready.done():
            await self.wait_ready()
        proc = self._proc
        if proc is None or proc.returncode is not None:
            raise MountError(self.mountpoint, "the mount server is not running",
                             stderr_tail=self.stderr_tail())

    async def _request(self, message: dict) -> dict:
        await self.ensure_running()
        proc = self._proc
        # Started with pipes on stdin, stdout and stderr.
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        async with self._lock:
            try:
                proc.stdin.write(json.dumps(message).encode() + b"\n")
                await proc.stdin.drain()
                line = await proc.stdout.readline()
            except (BrokenPipeError, ConnectionResetError):
                line = b""
            if not line:
                await self._wait_exit(1.0)
                await self._stderr_done()
                raise MountError(self.mountpoint,
                                 f"the mount server died (exit status {proc.returncode})",
                                 stderr_tail=self.stderr_tail())
        return json.loads(line)

    async def add(self, key: str, nodes: list[Node]) -> Path:
        """Make ``<mountpoint>/<key>/<node.name>`` visible; return ``<mountpoint>/<key>``."""
        validate_name(os.fsencode(key))
        reply = await self._request({
            "op": "add", "key": key,
            "nodes": [node_to_json_value(n) for n in nodes]})
        if not reply.get("ok"):
            raise MountError(self.mountpoint, f"cannot add key {key!r}: {reply.get('error')}")
        self._keys.add(key)
        return self.mountpoint / key

    async def remove(self, key: str) -> None:
        """Hide ``<mountpoint>/<key>``."""
        reply = await self._request({"op": "remove", "key": key})
        if not reply.get("ok"):
            raise MountError(self.mountpoint,
                             f"cannot remove key {key!r}: {reply.get('error')}")
        self._keys.discard(key)

    async def _wait_exit(self, timeout: float) -> bool:
        assert self._proc is not None
        try:
            await asyncio.wait_for(self._proc.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _stop(self) -> None:
        """Stop politely (close stdin), then SIGTERM, then SIGKILL; reap; unmount.

        Runs to the end under cancellation: a cancel arriving meanwhile is
        re-raised once the server is gone and the mount removed.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        cancelled = None
        try:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            steps = ((None, STOP_TIMEOUT), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0))
            for sig, timeout in steps:
                if sig is not None and proc.returncode is None:
                    try:
                        proc.send_signal(sig)
                    except ProcessLookupError:
                        pass
                try:
                    await asyncio.shield(asyncio.wait_for(proc.wait(), timeout))
                    break
                except TimeoutError:
                    continue
                except asyncio.CancelledError as exc:
                    cancelled = exc
                    # Finish forcefully and synchronously, then re-raise.
                    try:
                        proc.kill()
                    except ProcessLookupError:
                        pass
                    break
        finally:
            if proc.returncode is None:
                try:
                    os.waitpid(proc.pid, 0)
                except ChildProcessError:
                    pass
            if self._stderr_task is not None:
                self._stderr_task.cancel()
            ready = self._ready
            if ready is not None:
                if not ready.done():
                    ready.cancel()
                elif not ready.cancelled():
                    ready.exception()  # retrieved: reported by wait_ready, if at all
            self._remove_leftover_mount()
        if cancelled is not None:
            raise cancelled

    def _remove_leftover_mount(self) -> None:
        info = find_mount(self.mountpoint)
        if info is not None and info.fstype.startswith("fuse"):
            log.warning("mount server left %s mounted; detaching it", self.mountpoint)
            lazy_unmount(self.mountpoint)


def serve_until_signal(mountpoint: Path, nodes: list[Node], blob_address: str | None,
                       directory_address: str | None) -> None:
    """Mount ``nodes`` by name at the top of ``mountpoint`` and serve them here.

    Blocks until SIGINT or SIGTERM, then unmounts and returns.
    """
    import trio

    from stages.castore.fuse.fs import CastoreFS
    from stages.castore.fuse.server import serve
    from stages.castore.fuse.store import open_reader

    path = check_mountpoint(Path(mountpoint))
    blob, directory = _check_addresses(blob_address, directory_address, path)
    fs = CastoreFS(open_reader(blob, directory))
    fs.add_root_nodes(list(nodes))
    try:
        trio.run(functools.partial(serve, fs, path, control=False))
    except RuntimeError as exc:
        raise MountError(path, f"cannot mount: {exc}") from exc


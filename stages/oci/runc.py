"""An asyncio driver for runc: run a bundle, stream its output, always clean up.

::

    async with RuncContainer(bundle_dir, "build-1", state_root=root) as c:
        await c.run(on_line=print_line, log_path=bundle_dir / "build.log", timeout=60)

Each service uses a private runc state directory (``--root``), so it can list
and remove exactly its own containers, including those a crashed predecessor
left behind (:func:`cleanup_stale_containers`).

Caveats:

- Teardown follows trio's ``_subprocess``: on any BaseException (a timeout,
  a cancellation, an error in a line callback) the container is killed with
  SIGKILL (``runc kill --all``; a build killed half-way has nothing worth a
  polite stop), runc is waited for (and killed itself if it does not exit),
  and ``runc delete --force`` removes the container; then the exception is
  re-raised. A CancelledError is never swallowed; a second cancellation
  during teardown is held until teardown is done.
- The builder runs in its own pid namespace, so killing its init kills every
  process of the build; ``--all`` also covers the window before that.
- The exit code is runc's: the builder's status, or 128+N when it died of
  signal N; runc's own failures (a broken bundle) give 1 with runc's message
  in the log. runc itself killed (a negative status) is a RuncError saying
  so, never "the builder failed"; the container is destroyed first.
- An exception raised by ``on_line`` stops the build (with the teardown
  above) and propagates as itself.
- stdout and stderr are read in chunks and split on newlines; a line longer
  than 64 KiB is delivered in pieces. Lines are bytes, as the builder wrote
  them.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from stages.errors import RuncError, RuncTimeoutError
from stages.util.aio import Child, PipeReader, finish_then_cancel

__all__ = ["LineCallback", "RuncContainer", "cleanup_stale_containers", "list_containers"]

#: on_line(stream, line): stream is "stdout" or "stderr", line ends with b"\n"
#: unless it is the last piece of output. May be a coroutine function.
LineCallback = Callable[[str, bytes], Awaitable[None] | None]

_CHUNK = 65536
TAIL_LINES = 25


async def _runc(runc: str, root: Path, *args: str) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        runc, "--root", str(root), *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out


class RuncContainer:
    """One container of one bundle under a private runc state root.

    Runtime state, hence a plain mutable class. Use it as an async context
    manager: leaving it always deletes the container.
    """

    def __init__(self, bundle_dir: Path | str, container_id: str, *, state_root: Path | str,
                 runc: str = "runc", stop_timeout: float = 5.0) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.container_id = container_id
        self.state_root = Path(state_root)
        self.runc = runc
        self.stop_timeout = stop_timeout
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.exit_code: int | None = None
        self._proc: Child | None = None

    async def __aenter__(self) -> RuncContainer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await finish_then_cancel(self.destroy())

    @property
    def log_tail(self) -> str:
        return "".join(self.tail)

    async def run(self, *, on_line: LineCallback | None = None, log_path: Path | str | None = None,
                  timeout: float | None = None, check: bool = True) -> int:
        """``runc run`` the bundle to its end; return the exit code.

        With ``check`` a non-zero exit raises RuncError (exit_code, log_tail).
        After ``timeout`` seconds the container is killed and RuncTimeoutError
        raised.
        """
        log = open(log_path, "ab") if log_path is not None else None
        try:
            code = await self._run(lambda: self._pump_and_wait(on_line, log), timeout)
        finally:
            if log is not None:
                log.close()
        if code < 0:
            # runc's own death (the builder's shows as 128+N): not the builder's doing.
            raise RuncError(self.container_id,
                            f"runc itself was killed by {signal.Signals(-code).name} "
                            f"(from outside the build); the container was killed and deleted",
                            log_tail=self.log_tail)
        if check and code != 0:
            raise RuncError(self.container_id, "the builder failed", exit_code=code,
                            log_tail=self.log_tail)
        return code

    async def run_attached(self) -> int:
        """``runc run`` the bundle on this process's own stdin, stdout and
        stderr (an interactive shell on the terminal); return the exit code.
        No log and no line callbacks; teardown as for :meth:`run`."""

        async def wait() -> None:
            assert self._proc is not None
            await self._proc.wait()

        return await self._run(wait, None, attached=True)

    async def _run(self, until_exit: Callable[[], Awaitable[None]], timeout: float | None, *,
                   attached: bool = False) -> int:
        """Start ``runc run``, await ``until_exit()``; on anything else, destroy."""
        if self._proc is not None:
            raise RuncError(self.container_id, "a RuncContainer runs once")
        self.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._proc = Child([self.runc, "--root", str(self.state_root), "run", "--bundle",
                                str(self.bundle_dir), self.container_id], attached=attached)
            try:
                async with asyncio.timeout(timeout):
                    await until_exit()
            except TimeoutError:
                await finish_then_cancel(self.destroy())
                raise RuncTimeoutError(self.container_id, timeout or 0.0,
                                       log_tail=self.log_tail) from None
            except BaseException:
                await finish_then_cancel(self.destroy())
                raise
        finally:
            if self._proc is not None:
                self._proc.close()
        code = self._proc.returncode
        assert code is not None
        self.exit_code = code
        return code

    async def _pump_and_wait(self, on_line: LineCallback | None, log: Any) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None

        async def emit(stream: str, line: bytes) -> None:
            self.tail.append(line.decode("utf-8", "replace"))
            if log is not None:
                log.write(line)
                log.flush()
            if on_line is not None:
                res = on_line(stream, line)
                if inspect.isawaitable(res):
                    await res

        async def pump(stream: str, reader: PipeReader) -> None:
            buf = b""
            while True:
                chunk = await reader.read(_CHUNK)
                if not chunk:
                    break
                buf += chunk
                while True:
                    nl = buf.find(b"\n", 0, _CHUNK)
                    if nl >= 0:
                        cut = nl + 1
                    elif len(buf) >= _CHUNK:
                        cut = _CHUNK  # an overlong line, delivered in pieces
                    else:
                        break
                    piece, buf = buf[:cut], buf[cut:]
                    await emit(stream, piece)
            if buf:
                await emit(stream, buf)

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(pump("stdout", proc.stdout))
                tg.create_task(pump("stderr", proc.stderr))
                tg.create_task(proc.wait())
        except BaseExceptionGroup as group:
            # One failing callback is the common case: raise it as itself.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def destroy(self) -> None:
        """Kill every process of the container, wait for runc, delete it. Idempotent."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.stop_timeout
            while proc.returncode is None and loop.time() < deadline:
                await _runc(self.runc, self.state_root, "kill", "--all", self.container_id,
                            "KILL")
                try:
                    await asyncio.wait_for(proc.wait(), 0.2)
                except TimeoutError:
                    pass
            if proc.returncode is None:
                # runc itself is stuck; delete --force below kills the container.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await proc.wait()
        # A foreground `runc run` that ended deletes its container itself;
        # only a container whose state directory is left needs `runc delete`
        # (this saves a runc start per build).
        if (self.state_root / self.container_id).exists():
            code, out = await _runc(self.runc, self.state_root, "delete", "--force",
                                    self.container_id)
            if code != 0 and b"does not exist" not in out and b"not exist" not in out:
                raise RuncError(self.container_id,
                                f"runc delete --force failed: {out.decode(errors='replace')}",
                                exit_code=code)


async def list_containers(state_root: Path | str, *, runc: str = "runc") -> list[dict]:
    """The containers runc knows under ``state_root`` (``runc list`` as JSON)."""
    root = Path(state_root)
    if not root.exists():
        return []
    code, out = await _runc(runc, root, "list", "--format", "json")
    if code != 0:
        raise RuncError("*", f"runc list failed: {out.decode(errors='replace')}", exit_code=code)
    return json.loads(out) or []


async def cleanup_stale_containers(state_root: Path | str, *, runc: str = "runc") -> list[str]:
    """Kill and delete every container under ``state_root``; return their ids.

    For a service starting after a crash: its private state root holds only
    containers of its dead predecessor.
    """
    removed = []
    for c in await list_containers(state_root, runc=runc):
        cid = c["id"]
        await _runc(runc, Path(state_root), "kill", "--all", cid, "KILL")
        code, out = await _runc(runc, Path(state_root), "delete", "--force", cid)
        if code != 0 and b"not exist" not in out:
            raise RuncError(cid, f"runc delete --force failed: {out.decode(errors='replace')}",
                            exit_code=code)
        removed.append(cid)
    return removed

"""One sandboxed builder process, whatever runs it: output streamed, always torn down.

:class:`SandboxProcess` is what :class:`~stages.oci.runc.RuncContainer`
(``runc run``) and :class:`~stages.oci.bwrap.BwrapSandbox` (``bwrap``)
share: start the runtime's command, read the builder's stdout and stderr
line by line into a callback and a log, wait for the exit, and on any
BaseException (a timeout, a cancellation, an error in a line callback)
kill every process of the sandbox, wait for the runtime, and clean up
(:meth:`destroy`); then the exception is re-raised. A CancelledError is
never swallowed; a second cancellation during teardown is held until
teardown is done.

A runtime says how to start (:meth:`SandboxProcess.argv`), how to kill
everything it runs (:meth:`SandboxProcess.kill`) and what to remove after
(:meth:`SandboxProcess.cleanup`).

Caveats:

- The exit code is the runtime's: the builder's status, or 128+N when it
  died of signal N; the runtime's own failures (a broken bundle) give 1
  with its message in the log. The runtime itself killed (a negative
  status) is a RuncError saying so, never "the builder failed"; the sandbox
  is destroyed first.
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
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from stages.errors import RuncError, RuncTimeoutError
from stages.util.aio import Child, PipeReader, finish_then_cancel

__all__ = ["LineCallback", "SandboxProcess"]

#: on_line(stream, line): stream is "stdout" or "stderr", line ends with b"\n"
#: unless it is the last piece of output. May be a coroutine function.
LineCallback = Callable[[str, bytes], Awaitable[None] | None]

_CHUNK = 65536
TAIL_LINES = 25


class SandboxProcess:
    """One run of one sandbox; see the module docstring.

    Runtime state, hence a plain mutable class. Use it as an async context
    manager: leaving it always destroys the sandbox.
    """

    #: The runtime's command, for messages.
    tool = "the runtime"

    def __init__(self, container_id: str, *, stop_timeout: float = 5.0) -> None:
        self.container_id = container_id
        self.stop_timeout = stop_timeout
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.exit_code: int | None = None
        self._proc: Child | None = None

    # -- what a runtime provides ---------------------------------------------------

    def argv(self, *, attached: bool) -> list[str]:
        """The command that runs the sandbox to its end."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Called before the command starts (make state directories)."""

    async def kill(self, proc: Child) -> None:
        """Kill every process of the sandbox (called while ``proc`` runs)."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        """Remove what the runtime leaves once its process has ended."""

    # -- running ---------------------------------------------------------------------

    async def __aenter__(self) -> SandboxProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await finish_then_cancel(self.destroy())

    @property
    def log_tail(self) -> str:
        return "".join(self.tail)

    async def run(self, *, on_line: LineCallback | None = None, log_path: Path | str | None = None,
                  timeout: float | None = None, check: bool = True) -> int:
        """Run the sandbox to its end; return the exit code.

        With ``check`` a non-zero exit raises RuncError (exit_code, log_tail).
        After ``timeout`` seconds the sandbox is killed and RuncTimeoutError
        raised.
        """
        log = open(log_path, "ab") if log_path is not None else None
        try:
            code = await self._run(lambda: self._pump_and_wait(on_line, log), timeout)
        finally:
            if log is not None:
                log.close()
        if code < 0:
            # The runtime's own death (the builder's shows as 128+N): not the builder's doing.
            raise RuncError(self.container_id,
                            f"{self.tool} itself was killed by {signal.Signals(-code).name} "
                            f"(from outside the build); the sandbox was killed and removed",
                            log_tail=self.log_tail, runtime_signal=-code)
        if check and code != 0:
            raise RuncError(self.container_id, "the builder failed", exit_code=code,
                            log_tail=self.log_tail)
        return code

    async def run_attached(self) -> int:
        """Run the sandbox on this process's own stdin, stdout and stderr (an
        interactive shell on the terminal); return the exit code. No log and
        no line callbacks; teardown as for :meth:`run`."""

        async def wait() -> None:
            assert self._proc is not None
            await self._proc.wait()

        return await self._run(wait, None, attached=True)

    async def _run(self, until_exit: Callable[[], Awaitable[None]], timeout: float | None, *,
                   attached: bool = False) -> int:
        """Start the sandbox, await ``until_exit()``; on anything else, destroy."""
        if self._proc is not None:
            raise RuncError(self.container_id, "a sandbox runs once")
        self.prepare()
        try:
            self._proc = Child(self.argv(attached=attached), attached=attached)
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
        """Kill every process of the sandbox, wait for the runtime, clean up. Idempotent."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.stop_timeout
            while proc.returncode is None and loop.time() < deadline:
                await self.kill(proc)
                try:
                    await asyncio.wait_for(proc.wait(), 0.2)
                except TimeoutError:
                    pass
            if proc.returncode is None:
                # The runtime itself is stuck: its process group goes.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await proc.wait()
        await self.cleanup()

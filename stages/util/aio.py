"""Small asyncio helpers shared by the build stages."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import signal
import subprocess
from collections.abc import Awaitable
from typing import Any

__all__ = ["AdoptedProcess", "Child", "ExitWatch", "PipeReader", "finish_then_cancel"]


async def finish_then_cancel(aw: Awaitable[Any]) -> Any:
    """Await ``aw`` to its end even if cancelled meanwhile; then re-raise that.

    For teardown that must not be cut short, and for work in a thread, which
    goes on whatever happens to the task awaiting it: the caller may only
    move on (and its cleanup may only run) once the work has really stopped.
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError()
    return result


class PipeReader:
    """The read end of a pipe, read on the event loop without a transport."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at the end (and the fd is closed then)."""
        loop = asyncio.get_running_loop()
        while True:
            if self.fd < 0:
                return b""
            try:
                data = os.read(self.fd, n)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(self.fd, _resolve, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(self.fd)
                continue
            if not data:
                self.close()
            return data

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class ExitWatch:
    """The exit of a ``Popen``'s child, on the event loop: a pidfd, reaped when readable.

    Where the kernel has no pidfd_open (before Linux 5.3, or under
    valgrind), a worker thread waits for the exit instead. :attr:`exited`
    resolves with the status (negative: killed by that signal).
    """

    def __init__(self, popen: subprocess.Popen) -> None:
        loop = asyncio.get_running_loop()
        self.popen = popen
        self.exited: asyncio.Future[int] = loop.create_future()
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except OSError as exc:  # Linux < 5.3, or a sandbox (valgrind) without it
            if exc.errno not in (errno.ENOSYS, errno.EPERM):
                raise
            self._pidfd = -1
            waiter = loop.run_in_executor(None, popen.wait)
            waiter.add_done_callback(lambda _f: self._reap())
        else:
            loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        code = self.popen.wait()  # it has exited: does not block
        if not self.exited.done():
            self.exited.set_result(code)


class _Watched:
    """``returncode`` and :meth:`wait` of a process whose exit an ExitWatch sees."""

    _watch: ExitWatch

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited and been reaped, else None."""
        return self._watch.exited.result() if self._watch.exited.done() else None

    async def wait(self) -> int:
        """The exit status (negative: killed by that signal), once it has exited."""
        return await asyncio.shield(self._watch.exited)


class Child(_Watched):
    """A child process, stdout and stderr on pipes, its exit watched through a pidfd.

    What asyncio's subprocess support does, for one use, with less: no
    transports or protocols, no watcher thread per child (Python 3.11's
    default), one ``Popen`` (vfork) and three fds on the loop
    (:class:`ExitWatch`).

    The child starts in its own session, stdin from /dev/null. With
    ``attached`` it shares this process's stdin, stdout, stderr and session
    instead (an interactive program on the terminal): ``stdout`` and
    ``stderr`` are then None. :meth:`close` closes the pipes; the pidfd
    stays on the loop until the child has exited and been reaped, so
    :meth:`wait` works after it.
    """

    stdout: PipeReader | None
    stderr: PipeReader | None

    def __init__(self, argv: list[str], *, attached: bool = False) -> None:
        if attached:
            self._popen = subprocess.Popen(argv)
            self.stdout = self.stderr = None
        else:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            try:
                self._popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_w,
                                               stderr=err_w, start_new_session=True)
            except BaseException:
                os.close(out_r)
                os.close(err_r)
                raise
            finally:
                os.close(out_w)
                os.close(err_w)
            self.stdout = PipeReader(out_r)
            self.stderr = PipeReader(err_r)
        self.pid = self._popen.pid
        self.attached = attached
        self._watch = ExitWatch(self._popen)

    def close(self) -> None:
        if self.stdout is not None:
            self.stdout.close()
        if self.stderr is not None:
            self.stderr.close()


class AdoptedProcess(_Watched):
    """A running ``Popen`` with pipes on all three streams, seen from asyncio.

    What ``asyncio.create_subprocess_exec`` returns, for a child started
    before the event loop ran: ``stdin`` a StreamWriter, ``stdout`` and
    ``stderr`` StreamReaders, :meth:`wait`, ``returncode`` and the signals.
    Make one with :meth:`adopt`, inside the loop.
    """

    def __init__(self, popen: subprocess.Popen, stdin: asyncio.StreamWriter,
                 stdout: asyncio.StreamReader, stderr: asyncio.StreamReader) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._watch = ExitWatch(popen)

    @classmethod
    async def adopt(cls, popen: subprocess.Popen) -> AdoptedProcess:
        if popen.stdin is None or popen.stdout is None or popen.stderr is None:
            raise ValueError("only a child with pipes on stdin, stdout and stderr")
        loop = asyncio.get_running_loop()
        readers = []
        for pipe in (popen.stdout, popen.stderr):
            reader = asyncio.StreamReader(loop=loop)
            await loop.connect_read_pipe(functools.partial(asyncio.StreamReaderProtocol, reader),
                                         pipe)
            readers.append(reader)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                            popen.stdin)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        return cls(popen, writer, readers[0], readers[1])

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self._popen.send_signal(sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

"""stages.util.aio.Child: a child process on pipes, its exit seen through a pidfd."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from stages.util.aio import Child


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def _read_all(reader) -> bytes:
    out = b""
    while chunk := await reader.read(65536):
        out += chunk
    return out


async def test_output_and_exit_status() -> None:
    before = _fds()
    child = Child(["/bin/sh", "-c", "printf 'a\\nb'; printf err >&2; exit 7"])
    out, err, code = await asyncio.gather(_read_all(child.stdout), _read_all(child.stderr),
                                          child.wait())
    child.close()
    assert (out, err, code, child.returncode) == (b"a\nb", b"err", 7, 7)
    assert _fds() == before


async def test_large_output_is_read_whole() -> None:
    # More than a pipe holds (64 KiB): the child blocks until we read.
    child = Child(["/bin/sh", "-c", "head -c 1000000 /dev/zero"])
    out, _, code = await asyncio.gather(_read_all(child.stdout), _read_all(child.stderr),
                                        child.wait())
    child.close()
    assert (len(out), code) == (1000000, 0)


async def test_killed_child_reports_the_signal() -> None:
    child = Child(["/bin/sleep", "30"])
    os.killpg(child.pid, signal.SIGKILL)  # its own session: its own process group
    assert await child.wait() == -signal.SIGKILL
    child.close()


async def test_wait_after_close_still_sees_the_exit() -> None:
    before = _fds()
    child = Child(["/bin/sh", "-c", "sleep 0.2"])
    child.close()
    assert await asyncio.wait_for(child.wait(), 10) == 0
    assert _fds() == before


async def test_a_missing_program_raises_and_leaks_nothing() -> None:
    before = _fds()
    with pytest.raises(FileNotFoundError):
        Child(["/nonexistent/program"])
    assert _fds() == before


async def test_without_pidfd_a_thread_waits(monkeypatch) -> None:
    import errno

    def enosys(pid: int) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", enosys)
    child = Child(["/bin/sh", "-c", "echo hi; exit 3"])
    out = await _read_all(child.stdout)
    assert (out, await asyncio.wait_for(child.wait(), 10)) == (b"hi\n", 3)
    child.close()


async def test_an_adopted_popen_streams_and_exits() -> None:
    import subprocess

    from stages.util.aio import AdoptedProcess

    popen = subprocess.Popen(["/bin/sh", "-c", "read line; echo got $line; echo oops >&2; "
                              "exit 3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    proc = await AdoptedProcess.adopt(popen)
    assert proc.pid == popen.pid and proc.returncode is None
    proc.stdin.write(b"hello\n")
    await proc.stdin.drain()
    assert await proc.stdout.readline() == b"got hello\n"
    assert await proc.stderr.readline() == b"oops\n"
    assert await proc.wait() == 3
    assert proc.returncode == 3
    proc.kill()  # after the exit: nothing to signal, no error
    proc.stdin.close()


async def test_an_adopted_popen_can_be_killed() -> None:
    import subprocess

    from stages.util.aio import AdoptedProcess

    popen = subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    proc = await AdoptedProcess.adopt(popen)
    proc.terminate()
    assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGTERM
    proc.stdin.close()
    bare = subprocess.Popen(["true"])
    with pytest.raises(ValueError, match="pipes"):
        await AdoptedProcess.adopt(bare)
    bare.wait()

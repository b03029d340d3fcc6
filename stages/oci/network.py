"""A build's own network namespace, with outbound connectivity through slirp4netns.

A build granted network access (the operator's ``--allow-network``) never
shares the host's network namespace. It gets a namespace of its own, made
before the container and persisted as a bind mount of its nsfs file
(``unshare --net=FILE``, so no process has to hold it), which the
container joins by path. slirp4netns, on the host side, gives it a tap
device (10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3) and connects what
the builder opens as an unprivileged user of the host would, so:

- host loopback (127.0.0.0/8, ::1) is unreachable: it is the namespace's
  own, and slirp's 10.0.2.2 alias of the host's loopback is disabled
  (``--disable-host-loopback``);
- the host's abstract unix sockets are unreachable (they are per network
  namespace);
- other hosts, and the host's own non-loopback addresses, are reachable,
  as from any machine on the network.

slirp4netns exits when its ``--exit-fd`` closes: at teardown, or when the
service dies (the kernel closes it). The namespace's bind mount of a dead
service is removed by the next start (:func:`cleanup_stale_namespaces`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
from pathlib import Path

from stages.errors import BuildError

__all__ = ["RESOLV_CONF", "SlirpNetwork", "cleanup_stale_namespaces"]

#: /etc/resolv.conf of a build with network: slirp4netns's DNS forwarder.
RESOLV_CONF = "nameserver 10.0.2.3\n"
_READY_TIMEOUT = 10.0
_MNT_DETACH = 2


def _umount(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise OSError(err, os.strerror(err), str(path))


def cleanup_stale_namespaces(directory: Path) -> list[str]:
    """Unmount and remove the namespace files a dead service left in ``directory``."""
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        _umount(entry)
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
        removed.append(entry.name)
    with contextlib.suppress(OSError):
        directory.rmdir()
    return removed


class SlirpNetwork:
    """One build's network namespace at ``path``, connected while in use.

    ``async with SlirpNetwork(path):`` makes the namespace and starts
    slirp4netns; leaving stops slirp4netns and removes the namespace.
    """

    def __init__(self, path: Path, *, slirp: str = "slirp4netns") -> None:
        self.path = Path(path)
        self.slirp = slirp
        self._proc: asyncio.subprocess.Process | None = None
        self._exit_w: int | None = None

    async def __aenter__(self) -> SlirpNetwork:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.touch()
        try:
            await self._make_namespace()
            await self._connect()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _make_namespace(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            "unshare", f"--net={self.path}", "true", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise BuildError(f"cannot make the build's network namespace {self.path}: "
                             f"{err.decode(errors='replace').strip()}")

    async def _connect(self) -> None:
        ready_r, ready_w = os.pipe()
        exit_r, self._exit_w = os.pipe()
        os.set_inheritable(self._exit_w, False)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.slirp, "--netns-type=path", "--configure", "--mtu=65520",
                "--disable-host-loopback", "--enable-sandbox", "--enable-seccomp",
                f"--ready-fd={ready_w}", f"--exit-fd={exit_r}",
                str(self.path), "tap0", pass_fds=(ready_w, exit_r),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            os.close(ready_r)
            raise BuildError(f"{self.slirp} is not installed: a build with network access "
                             f"needs it (make installs it)") from None
        finally:
            os.close(ready_w)
            os.close(exit_r)
        try:
            ready = await asyncio.wait_for(asyncio.to_thread(os.read, ready_r, 1),
                                           _READY_TIMEOUT)
        except TimeoutError:
            ready = b""
        finally:
            os.close(ready_r)
        if ready != b"1":
            err = b""
            if self._proc.stderr is not None and self._proc.returncode is not None:
                err = await self._proc.stderr.read()
            raise BuildError(f"slirp4netns did not bring up the build's network: "
                             f"{err.decode(errors='replace').strip() or 'no answer'}")

    async def aclose(self) -> None:
        """Stop slirp4netns and remove the namespace. Idempotent."""
        if self._exit_w is not None:
            os.close(self._exit_w)  # slirp4netns exits
            self._exit_w = None
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), 2)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.to_thread(self._remove)

    def _remove(self) -> None:
        _umount(self.path)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

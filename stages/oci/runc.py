"""An asyncio driver for runc: run a bundle, stream its output, always clean up.

::

    async with RuncContainer(bundle_dir, "build-1", state_root=root) as c:
        await c.run(on_line=print_line, log_path=bundle_dir / "build.log", timeout=60)

Each service uses a private runc state directory (``--root``), so it can list
and remove exactly its own containers, including those a crashed predecessor
left behind (:func:`cleanup_stale_containers`).

Running, streaming and teardown are :class:`~stages.oci.process.SandboxProcess`'s:
on any BaseException the container is killed with SIGKILL (``runc kill
--all``; a build killed half-way has nothing worth a polite stop), runc is
waited for (and killed itself if it does not exit), and ``runc delete
--force`` removes the container. The builder runs in its own pid
namespace, so killing its init kills every process of the build; ``--all``
also covers the window before that.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from stages.errors import RuncError
from stages.oci.process import LineCallback, SandboxProcess
from stages.util.aio import Child

__all__ = ["LineCallback", "RuncContainer", "cleanup_stale_containers", "list_containers"]


async def _runc(runc: str, root: Path, *args: str) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        runc, "--root", str(root), *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out


class RuncContainer(SandboxProcess):
    """One container of one bundle under a private runc state root.

    Use it as an async context manager: leaving it always deletes the container.
    """

    tool = "runc"

    def __init__(self, bundle_dir: Path | str, container_id: str, *, state_root: Path | str,
                 runc: str = "runc", stop_timeout: float = 5.0) -> None:
        super().__init__(container_id, stop_timeout=stop_timeout)
        self.bundle_dir = Path(bundle_dir)
        self.state_root = Path(state_root)
        self.runc = runc

    def prepare(self) -> None:
        self.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def argv(self, *, attached: bool) -> list[str]:
        return [self.runc, "--root", str(self.state_root), "run", "--bundle",
                str(self.bundle_dir), self.container_id]

    async def kill(self, proc: Child) -> None:
        await _runc(self.runc, self.state_root, "kill", "--all", self.container_id, "KILL")

    async def cleanup(self) -> None:
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

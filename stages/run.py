"""The run stage: ``runc run`` of the bundle, output streamed, always cleaned up.

The builder's stdout and stderr become pipeline log events (stage ``run``)
and go into ``logs/<key>.log`` in the run directory (the bundle's
``build.log`` when the run keeps no directory). A non-zero exit fails the
stage with :class:`~stages.errors.RuncError` carrying the exit code and the
log's tail; the build's timeout kills it with
:class:`~stages.errors.RuncTimeoutError`. On cancellation the container is
killed, deleted and reaped before the stage ends
(:class:`~stages.oci.runc.RuncContainer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from stages.context import BuildHost, BuildSpec, StageContext
from stages.oci.runc import RuncContainer

__all__ = ["container", "log_path", "stage"]


@contextlib.asynccontextmanager
async def container(build: BuildSpec, host: BuildHost,
                    _ctx: StageContext) -> AsyncIterator[RuncContainer]:
    """Resource factory: one container of the build's bundle, deleted on release."""
    async with RuncContainer(host.bundle_dir(build), f"ocibuild-{build.key}",
                             state_root=host.runc_root) as c:
        yield c


def log_path(build: BuildSpec, host: BuildHost, run_dir: Path | None) -> Path:
    if run_dir is None:
        return host.layout(build).log
    return run_dir / "logs" / f"{build.key}.log"


async def stage(build: BuildSpec, host: BuildHost, ctx: StageContext) -> dict[str, Any]:
    c: RuncContainer = ctx.resources["container"]
    log = log_path(build, host, ctx.run_dir)
    log.parent.mkdir(parents=True, exist_ok=True)

    def on_line(stream: str, line: bytes) -> None:
        ctx.log(line.decode("utf-8", "replace").rstrip("\n"), stream=stream)

    code = await c.run(on_line=on_line, log_path=log, timeout=build.timeout)
    return {"exit_code": code, "log": str(log)}

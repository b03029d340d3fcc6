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

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from stages.context import BuildHost, BuildSpec, StageContext, request_of
from stages.errors import RuncError, RuncTimeoutError
from stages.oci.cgroups import BuildCgroup
from stages.oci.network import SlirpNetwork
from stages.oci.process import SandboxProcess
from stages.oci.runc import RuncContainer
from stages.util.aio import finish_then_cancel

__all__ = ["build_cgroup", "container", "log_path", "sandbox", "stage"]


@contextlib.asynccontextmanager
async def build_cgroup(build: BuildSpec, host: BuildHost,
                       ctx: StageContext) -> AsyncIterator[BuildCgroup | None]:
    """Resource factory: the build's own cgroup with the policy's limits (None
    when the host makes none), removed on release.

    A resource of its own, taken before the container's cap and given back
    after it: making and removing a cgroup costs milliseconds of kernel time
    (the removal waits for RCU), which the next build's container need not wait
    for.
    """
    cgroup = host.cgroup(build)
    try:
        if cgroup is not None:
            # Finished even when cancelled meanwhile (the thread would make it
            # anyway): the finally below then removes what it made.
            await finish_then_cancel(asyncio.to_thread(
                cgroup.create, max_memory=host.policy.max_memory,
                max_pids=host.policy.max_pids, leaf=host.runtime != "runc"))
        yield cgroup
    finally:
        if cgroup is not None:
            await finish_then_cancel(asyncio.to_thread(cgroup.remove))


@contextlib.asynccontextmanager
async def container(build: BuildSpec, host: BuildHost,
                    ctx: StageContext) -> AsyncIterator[SandboxProcess]:
    """Resource factory: one container of the build's bundle, deleted on release,
    in the build's cgroup (the ``cgroup`` resource)."""
    cgroup = ctx.resources["cgroup"]
    async with contextlib.AsyncExitStack() as stack:
        if request_of(build, ctx).network_access and host.netns_dir is not None:
            await stack.enter_async_context(SlirpNetwork(host.netns_path(build)))
        yield await stack.enter_async_context(sandbox(build, host, cgroup))


def sandbox(build: BuildSpec, host: BuildHost, cgroup: BuildCgroup | None = None, *,
            bundle_dir: Path | None = None, name: str | None = None) -> SandboxProcess:
    """What runs the build's bundle (or ``bundle_dir``): a runc container, or
    bwrap (the host's ``runtime``) in the build's cgroup."""
    bundle = bundle_dir or host.bundle_dir(build)
    name = name or f"ocibuild-{build.key}"
    if host.runtime == "runc":
        return RuncContainer(bundle, name, state_root=host.runc_root)
    from stages.oci.bwrap import BwrapSandbox
    from stages.oci.idmap import BUILD_GID, BUILD_UID

    if cgroup is None and host.cgroup_root is not None:
        # bwrap applies no limits itself: without its cgroup the build would
        # run unlimited (runc applies linux.resources even so).
        raise RuncError(name, "the bwrap sandbox has no cgroup to hold its limits; "
                              "refusing to run it without them")
    return BwrapSandbox(bundle, name, uid=host.idmap.host_uid(BUILD_UID),
                        gid=host.idmap.host_gid(BUILD_GID),
                        cgroup_procs=cgroup.procs_files() if cgroup is not None else ())


def log_path(build: BuildSpec, host: BuildHost, run_dir: Path | None) -> Path:
    if run_dir is None:
        return host.layout(build).log
    return run_dir / "logs" / f"{build.key}.log"


async def stage(build: BuildSpec, host: BuildHost, ctx: StageContext) -> dict[str, Any]:
    c: SandboxProcess = ctx.resources["container"]
    log = log_path(build, host, ctx.run_dir)
    log.parent.mkdir(parents=True, exist_ok=True)

    def on_line(stream: str, line: bytes) -> None:
        ctx.log(line.decode("utf-8", "replace").rstrip("\n"), stream=stream, raw=line)

    generation = host.mounts.generation
    faults = host.mounts.fault_mark()
    try:
        code = await c.run(on_line=on_line, log_path=log, timeout=build.timeout)
    except RuncTimeoutError:
        raise
    except RuncError as exc:
        if host.mounts.exit_status is not None or host.mounts.generation != generation:
            raise RuncError(exc.container_id,
                            f"the FUSE mount server serving the inputs died while the build "
                            f"ran (exit status {host.mounts.exit_status}), so its inputs "
                            f"could not be read; the next build gets a new one",
                            exit_code=exc.exit_code, log_tail=exc.log_tail) from None
        refused = host.mounts.faults_since(faults)
        if refused:
            raise RuncError(exc.container_id,
                            "the builder failed after the store refused to serve it bad "
                            "input data (read as EIO): " + "; ".join(refused[:5]),
                            exit_code=exc.exit_code, log_tail=exc.log_tail) from None
        raise _named_limit(exc, build, host) from None
    return {"exit_code": code, "log": str(log)}


def _named_limit(exc: RuncError, build: BuildSpec, host: BuildHost) -> RuncError:
    """The builder's failure, named after the limit it hit, if it hit one."""
    cgroup = host.cgroup(build)
    if cgroup is None or (exc.exit_code is None and exc.runtime_signal is None):
        return exc
    policy = host.policy
    killed = exc.exit_code == 128 + 9 or exc.runtime_signal == signal.SIGKILL
    if killed and cgroup.memory_limit_hit():  # SIGKILLed, at its limit
        # (bwrap is in the build's cgroup: the kernel may pick it, not the builder.)
        what = (f"memory limit {policy.max_memory} bytes reached (--max-memory): the kernel "
                f"killed the {'builder' if exc.runtime_signal is None else 'sandbox'}")
    elif cgroup.pids_limit_hit():
        what = (f"the builder failed after reaching the process limit {policy.max_pids} "
                f"(--max-pids)")
    else:
        return exc
    return RuncError(exc.container_id, what, exit_code=exc.exit_code, log_tail=exc.log_tail)

"""The teardown stage: always runs; removes the bundle unless the build keeps it.

The mount (the ``inputs`` resource) and the container (the ``container``
resource) are released by the pipeline as soon as their last user is done,
whatever happened; this stage deals with what outlives them, the bundle
directory. It keeps the bundle when asked (``keep="always"``, or
``keep="failed"`` and some stage did not finish) and marks it kept, so a
restarting service does not remove it as stale.
"""

from __future__ import annotations

from typing import Any

from stages.context import BuildHost, BuildSpec, StageContext

__all__ = ["KEPT_MARKER", "stage"]

KEPT_MARKER = ".ocibuild-kept"


async def stage(build: BuildSpec, host: BuildHost, ctx: StageContext) -> dict[str, Any]:
    bundle = host.bundle_dir(build)
    # ctx.outcomes holds every other stage of the build.
    ok = all(o.state.ok for o in ctx.outcomes.values())
    keep = build.keep == "always" or (build.keep == "failed" and not ok)
    if keep and bundle.exists():
        (bundle / KEPT_MARKER).write_text(ctx.name + "\n")
        ctx.log(f"kept bundle {bundle}")
        return {"bundle": str(bundle), "kept": True}
    await host.discard_bundle(build)
    return {"bundle": str(bundle), "kept": False}

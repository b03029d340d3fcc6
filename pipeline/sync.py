"""The synchronous entry point: run or resume a graph from plain code, with signal handling.

Caveats:

- It runs its own event loop (``asyncio.run``): do not call it from async code.
- Signal handlers are installed only where the loop supports them (the main
  thread, on Unix); elsewhere a signal takes its default course.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.caps import Caps
from pipeline.definition import Graph
from pipeline.errors import RunCancelled
from pipeline.events import Subscriber
from pipeline.resume import plan_resume
from pipeline.runner import Runner
from pipeline.state import Run

__all__ = ["run_sync"]


def run_sync(
    graph: Graph,
    *,
    run_root: str | Path | None = None,
    run_dir: str | Path | None = None,
    resume_dir: str | Path | None = None,
    from_stage: str | Sequence[str] | None = None,
    stop_after: str | Sequence[str] | None = None,
    caps: Caps | None = None,
    subscribers: Iterable[Subscriber] = (),
    durability: str = "flush",
    fail_fast: bool = False,
    handle_signals: bool = True,
    check: bool = True,
) -> Run:
    """Run (or, with ``resume_dir``, resume) a graph from synchronous code.

    The run's directory: a new one under ``run_root``, or ``run_dir`` (new and
    empty, made by the caller: :func:`~pipeline.new_run_dir`), or none.

    With ``handle_signals``, the first SIGINT or SIGTERM cancels the run
    cleanly (unstarted stages are skipped, ``always`` stages run, resources are
    released) and :class:`RunCancelled` is raised; later signals are reported
    on stderr and do not cut the cleanup short. With ``check``, a run with
    failed stages raises :class:`~pipeline.errors.RunFailed`.
    """
    subscribers = list(subscribers)

    async def main() -> Run:
        loop = asyncio.get_running_loop()
        reused: dict[str, Any] = {}
        attempt = 1
        if resume_dir is not None:
            reused, attempt = plan_resume(resume_dir, graph, from_stage)
            runner = Runner(graph, run_dir=resume_dir, caps=caps, subscribers=subscribers,
                            durability=durability, fail_fast=fail_fast)
        elif run_dir is not None:
            runner = Runner(graph, run_dir=run_dir, caps=caps, subscribers=subscribers,
                            durability=durability, fail_fast=fail_fast)
        else:
            runner = Runner(graph, run_root=run_root, caps=caps, subscribers=subscribers,
                            durability=durability, fail_fast=fail_fast)
        seen: list[str] = []

        def on_signal(name: str) -> None:
            seen.append(name)
            if len(seen) == 1:
                runner.cancel(f"received {name}")
            else:
                print(f"pipeline: {name} again; still cleaning up (resources are being "
                      f"released; SIGKILL skips that)", file=sys.stderr, flush=True)

        installed = []
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, on_signal, sig.name)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
        try:
            if resume_dir is not None:
                run = await runner._execute(stop_after=stop_after, reused=reused,
                                            attempt=attempt, from_stage=from_stage)
            else:
                run = await runner.run(stop_after=stop_after)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        if seen:
            raise RunCancelled(run, signal=seen[0])
        return run

    run = asyncio.run(main())
    return run.check() if check else run

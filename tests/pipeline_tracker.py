"""Helpers for the pipeline tests (their strategies are in ``strategies``).

``Tracker`` records every resource acquisition and release and every stage
start/finish with a logical clock, so tests can check ordering and "released
exactly once" without trusting the runner's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from strategies import DagSpec

from pipeline import Graph, Resource, Stage


class Tracker:
    def __init__(self) -> None:
        self.clock = 0
        self.log: list[tuple[int, str, str]] = []  # (time, what, name)
        self.held: dict[str, int] = {}              # resource instance -> acquisitions
        self.acquired: list[str] = []
        self.released: list[str] = []
        self.running: set[str] = set()
        self.max_running = 0
        self.kind_now: dict[str, int] = {}
        self.kind_max: dict[str, int] = {}

    def tick(self, what: str, name: str) -> int:
        self.clock += 1
        self.log.append((self.clock, what, name))
        return self.clock

    def times(self, what: str) -> dict[str, int]:
        return {name: t for t, w, name in self.log if w == what}

    def resource(self, name: str, kind: str | None = None, *, fail_acquire: bool = False,
                 fail_release: bool = False, delay: float = 0.0) -> Resource:
        kind = kind or name

        @contextlib.asynccontextmanager
        async def factory(ctx: Any):
            instance = f"{name}@{ctx.name}"
            if delay:
                await asyncio.sleep(delay)
            if fail_acquire:
                raise OSError(f"cannot acquire {name}")
            self.acquired.append(instance)
            self.held[instance] = self.held.get(instance, 0) + 1
            self.kind_now[kind] = self.kind_now.get(kind, 0) + 1
            self.kind_max[kind] = max(self.kind_max.get(kind, 0), self.kind_now[kind])
            self.tick("acquire", instance)
            try:
                yield instance
            finally:
                self.kind_now[kind] -= 1
                self.released.append(instance)
                self.tick("release", instance)
                if fail_release:
                    raise OSError(f"cannot release {name}")

        factory.__qualname__ = f"tracked_{name}"
        return Resource(name=name, factory=factory, kind=kind)

    def stage_fn(self, name: str, *, fail: bool = False, sleep: float = 0.0,
                 result: Any = None, hang: bool = False):
        async def fn(ctx: Any) -> Any:
            self.tick("start", ctx.name)
            self.running.add(ctx.name)
            self.max_running = max(self.max_running, len(self.running))
            try:
                if hang:
                    await asyncio.Event().wait()
                if sleep:
                    await asyncio.sleep(sleep)
                else:
                    await asyncio.sleep(0)
                if fail:
                    raise RuntimeError(f"{ctx.name} fails on purpose")
                return result if result is not None else f"result of {ctx.name}"
            finally:
                self.running.discard(ctx.name)
                self.tick("end", ctx.name)

        fn.__qualname__ = f"fn_{name}"
        return fn


def build(spec: DagSpec, tracker: Tracker, *, shared: bool = True) -> Graph:
    stages = []
    for i, deps in enumerate(spec.deps):
        resources: list[Any] = []
        if spec.local_kind[i]:
            resources.append(tracker.resource(f"r{i}", kind=spec.local_kind[i]))
        if shared and i % 3 == 0:
            resources.append("pool")
        stages.append(Stage(
            name=f"s{i}", deps=[f"s{d}" for d in deps], resources=resources,
            always=i in spec.always,
            fn=tracker.stage_fn(f"s{i}", fail=i in spec.fail, sleep=spec.sleeps[i])))
    shared_res = [tracker.resource("pool", kind="pool")] if shared else []
    return Graph(stages=stages, resources=shared_res)

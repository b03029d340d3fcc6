"""Shared (graph-level) resources of one run: in before their first user, out after the last.

Each resource is entered and exited in a *holder* task of its own, so context
managers that care which task exits them (``asyncio.timeout``, task groups)
work; stages await the value the holder publishes. The holder takes the
resource kind's cap first, so a capped kind limits how many are held at once.

Caveats:

- The first stage that acquires a resource lends it its context (the
  factory's ``ctx``); a failure to enter it fails every stage that waits for
  it, with :class:`~pipeline.errors.ResourceError`.
- Release order is the reverse of acquisition order, also when several are
  freed together; a failure to release is reported in the run's ``errors``,
  not raised.
- :meth:`SharedResources.aclose` must run at the end of every run: it waits
  for releases under way and releases what is still held or waited for.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.errors import ResourceError
from pipeline.events import EventKind

if TYPE_CHECKING:
    from pipeline.caps import CapacityLimiter
    from pipeline.context import StageContext
    from pipeline.definition import Resource

__all__ = ["SharedResources"]

Emit = Callable[[EventKind, str | None, str, Any], None]
"""How events are reported: ``Runner._emit``."""


class _Shared:
    """Runtime state of one shared resource."""

    __slots__ = ("decl", "holder", "order", "ready", "release", "state", "users_left")

    def __init__(self, decl: Resource) -> None:
        self.decl = decl
        self.users_left = 0
        self.state = "idle"  # idle, waiting, entering, held, releasing, released
        self.holder: asyncio.Task[None] | None = None
        self.ready: asyncio.Future[Any] | None = None
        self.release: asyncio.Event | None = None
        self.order = -1


class SharedResources:
    """The shared resources of one run, by name.

    ``limiters`` are the per-kind caps; ``borrower`` keeps this run's tokens
    apart from other runs sharing a limiter; ``emit`` reports acquisitions and
    releases; release failures are appended to ``errors``.
    """

    def __init__(self, resources: Iterable[Resource], *,
                 limiters: Mapping[str, CapacityLimiter], borrower: Hashable,
                 emit: Emit, errors: list[str]) -> None:
        self._by_name = {r.name: _Shared(r) for r in resources}
        self._limiters = limiters
        self._borrower = borrower
        self._emit = emit
        self._errors = errors
        self._held: list[_Shared] = []
        self._aux: set[asyncio.Task[None]] = set()

    def add_users(self, names: Iterable[str]) -> None:
        """A stage of this run will use these resources."""
        for name in names:
            self._by_name[name].users_left += 1

    def cap_of(self, name: str) -> str | None:
        """The kind whose cap the resource's holder waits for, if capped."""
        kind = self._by_name[name].decl.kind
        return kind if kind in self._limiters else None

    async def acquire(self, name: str, ctx: StageContext) -> Any:
        """The resource's value; the first call enters it (with ``ctx``)."""
        shared = self._by_name[name]
        if shared.holder is None:
            loop = asyncio.get_running_loop()
            shared.ready = loop.create_future()
            shared.ready.add_done_callback(_consume)
            shared.release = asyncio.Event()
            shared.state = "waiting"
            shared.holder = loop.create_task(self._hold(shared, ctx))
        assert shared.ready is not None
        # Shielded: one waiting stage's cancellation must not cancel the others' wait.
        return await asyncio.shield(shared.ready)

    def drop_users(self, names: Iterable[str]) -> None:
        """A user of these resources is done; release those it was the last user of."""
        freed = []
        for name in names:
            shared = self._by_name[name]
            shared.users_left -= 1
            if shared.users_left == 0 and shared.holder is not None:
                freed.append(shared)
        if freed:
            freed.sort(key=lambda s: s.order, reverse=True)
            task = asyncio.get_running_loop().create_task(self._release_many(freed))
            self._aux.add(task)
            task.add_done_callback(self._aux.discard)

    async def aclose(self) -> None:
        """Finish releases under way, then release the rest, newest first."""
        while self._aux:
            await asyncio.gather(*list(self._aux), return_exceptions=True)
        for shared in reversed(self._held):
            await self._release(shared)
        for shared in self._by_name.values():  # acquisitions still waiting for a slot
            await self._release(shared)

    async def _hold(self, shared: _Shared, ctx: StageContext) -> None:
        decl = shared.decl
        assert shared.ready is not None and shared.release is not None
        lim = self._limiters.get(decl.kind)
        key = (self._borrower, "shared", decl.name)
        borrowed = False
        try:
            if lim is not None:
                await lim.acquire(key)
                borrowed = True
            try:
                shared.state = "entering"
                cm = decl.factory(ctx)
                try:
                    value = await type(cm).__aenter__(cm)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    raise ResourceError(decl.name, f"could not be acquired: "
                                        f"{type(exc).__name__}: {exc}", stage=ctx.name) from exc
                shared.order = len(self._held)
                self._held.append(shared)
                shared.state = "held"
                self._emit(EventKind.RESOURCE_ACQUIRED, ctx.name, decl.name,
                           {"kind": decl.kind, "shared": True})
                shared.ready.set_result(value)
                try:
                    await shared.release.wait()
                except BaseException:
                    await type(cm).__aexit__(cm, *sys.exc_info())
                    raise
                shared.state = "releasing"
                try:
                    await type(cm).__aexit__(cm, None, None, None)
                finally:
                    self._emit(EventKind.RESOURCE_RELEASED, None, decl.name,
                               {"kind": decl.kind, "shared": True})
            finally:
                if borrowed:
                    assert lim is not None
                    lim.release(key)
        # The holder is this module's own task and ends here: its cancellation
        # (a release while still waiting for the cap) and its failures go to
        # the waiting stages or the run's errors instead of propagating.
        except asyncio.CancelledError:
            if not shared.ready.done():
                shared.ready.set_exception(ResourceError(decl.name, "acquisition cancelled"))
        except BaseException as exc:  # noqa: BLE001  # reported to the stages or the run
            if not shared.ready.done():
                shared.ready.set_exception(exc if isinstance(exc, ResourceError) else
                                           ResourceError(decl.name, f"{exc}"))
            else:
                self._errors.append(f"resource {decl.name!r} failed to release: "
                                    f"{type(exc).__name__}: {exc}")
        finally:
            shared.state = "released"

    async def _release_many(self, freed: Sequence[_Shared]) -> None:
        for shared in freed:
            await self._release(shared)

    async def _release(self, shared: _Shared) -> None:
        holder = shared.holder
        if holder is None or holder.done():
            return
        if shared.state == "waiting":
            holder.cancel()
        else:
            assert shared.release is not None
            shared.release.set()
        await asyncio.gather(holder, return_exceptions=True)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark retrieved: stages that still wait will re-raise it

"""Caps: capacity limiters for asyncio, with a statistics snapshot anyone can read.

A :class:`CapacityLimiter` lends ``total_tokens`` tokens to named borrowers,
first come first served, like ``trio.CapacityLimiter``. The runner keeps one
for running stages (``Caps.running``) and one per resource kind
(``Caps.kinds``).

Caveats:

- Not thread-safe: use it from one event loop.
- ``total_tokens=None`` means unlimited; the limiter still counts borrowers so
  statistics stay meaningful.
- A borrower holds at most one token of a limiter at a time.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable, Mapping

import attrs

from pipeline.errors import DefinitionError

__all__ = ["CapacityLimiter", "Caps", "LimiterStatistics"]


@attrs.frozen(kw_only=True)
class LimiterStatistics:
    """A snapshot: tokens lent out, the cap, who holds them, how many wait."""

    name: str
    borrowed_tokens: int
    total_tokens: int | None
    borrowers: tuple[Hashable, ...]
    tasks_waiting: int
    max_borrowed: int  # high-water mark since the limiter was made


def _cap(value: int | None, what: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise DefinitionError(f"{what} must be an int >= 1 or None (unlimited), not {value!r}",
                              field=what)


def _int_map(value: Mapping[str, int]) -> dict[str, int]:
    """A private copy of a caps mapping (typed: attrs cannot infer ``dict``'s)."""
    return dict(value)


@attrs.frozen(kw_only=True)
class Caps:
    """Concurrency caps for a run.

    ``running`` caps the stages whose function runs at once (None: no cap);
    ``kinds`` caps, per resource kind, the resources held at once.
    """

    running: int | None = None
    kinds: Mapping[str, int] = attrs.field(factory=dict, converter=_int_map)

    def __attrs_post_init__(self) -> None:
        _cap(self.running, "running")
        for kind, value in self.kinds.items():
            _cap(value, f"kinds[{kind!r}]")


class CapacityLimiter:
    """Lends at most ``total_tokens`` tokens; waiters are served in FIFO order."""

    __slots__ = ("_borrowers", "_max", "_waiters", "name", "total_tokens")

    def __init__(self, total_tokens: int | None, *, name: str = "") -> None:
        _cap(total_tokens, "total_tokens")
        self.name = name
        self.total_tokens = total_tokens
        self._borrowers: dict[Hashable, None] = {}
        self._waiters: collections.OrderedDict[Hashable, asyncio.Future[None]] = (
            collections.OrderedDict())
        self._max = 0

    @property
    def borrowed_tokens(self) -> int:
        return len(self._borrowers)

    def acquire_nowait(self, borrower: Hashable) -> bool:
        """Take a token if one is free and nobody waits; True on success."""
        if borrower in self._borrowers:
            raise RuntimeError(f"{borrower!r} already holds a token of limiter {self.name!r}")
        if self._waiters or (self.total_tokens is not None
                             and len(self._borrowers) >= self.total_tokens):
            return False
        self._borrowers[borrower] = None
        self._max = max(self._max, len(self._borrowers))
        return True

    async def acquire(self, borrower: Hashable) -> None:
        """Wait for a token. Cancellation while waiting leaves nothing borrowed."""
        if self.acquire_nowait(borrower):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[borrower] = fut
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                # The token was handed to us just as we were cancelled: pass it on.
                self.release(borrower)
            else:
                self._waiters.pop(borrower, None)
            raise

    def release(self, borrower: Hashable) -> None:
        """Give the token back; the first waiter (if any) gets it."""
        try:
            del self._borrowers[borrower]
        except KeyError:
            raise RuntimeError(
                f"{borrower!r} holds no token of limiter {self.name!r}") from None
        while self._waiters:
            waiter, fut = self._waiters.popitem(last=False)
            if fut.done():
                continue
            self._borrowers[waiter] = None
            self._max = max(self._max, len(self._borrowers))
            fut.set_result(None)
            break

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(
            name=self.name,
            borrowed_tokens=len(self._borrowers),
            total_tokens=self.total_tokens,
            borrowers=tuple(self._borrowers),
            tasks_waiting=len(self._waiters),
            max_borrowed=self._max,
        )

    def __repr__(self) -> str:
        return (f"<CapacityLimiter {self.name!r} {len(self._borrowers)}/"
                f"{self.total_tokens or 'inf'} waiting={len(self._waiters)}>")

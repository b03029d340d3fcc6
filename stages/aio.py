"""Small asyncio helpers shared by the build stages."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

__all__ = ["finish_then_cancel"]


async def finish_then_cancel(aw: Awaitable[Any]) -> Any:
    """Await ``aw`` to its end even if cancelled meanwhile; then re-raise that.

    For teardown that must not be cut short, and for work in a thread, which
    goes on whatever happens to the task awaiting it: the caller may only
    move on (and its cleanup may only run) once the work has really stopped.
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError()
    return result

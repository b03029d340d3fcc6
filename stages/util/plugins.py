"""Objects that installed distributions offer through entry points.

A lower layer names a group (say ``ocibuild.castore_backends``) and looks
its entries up by name; a higher layer, or another distribution, registers
them in its packaging metadata. The lower layer thus finds what lives above
it without importing it by name.

Caveats:

- The entry points are read once per process and group
  (``importlib.metadata`` costs ~30 ms to import, so only a lookup pays it).
- A distribution installed or removed after the first lookup is not seen.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["load_plugin", "plugin_names"]


@functools.cache
def _group(group: str) -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=group)}


def plugin_names(group: str) -> list[str]:
    """The names registered in ``group``, sorted."""
    return sorted(_group(group))


def load_plugin(group: str, name: str) -> Any | None:
    """The object registered as ``name`` in ``group`` (imported now), or None."""
    ep = _group(group).get(name)
    return None if ep is None else ep.load()

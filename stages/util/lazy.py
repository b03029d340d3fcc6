"""Package attributes loaded on first use (PEP 562 module ``__getattr__``).

A package that re-exports names from its modules imports all of them when
any one is imported; with :func:`lazy_exports` each name's module loads when
the name is first used, so a process that needs one corner of a package
(the FUSE mount server, a starting service) does not pay for the rest.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A ``__getattr__`` for ``package`` importing each name from ``homes[name]``.

    The value is then set on the package, so later lookups are plain ones.
    """

    def __getattr__(name: str) -> Any:  # noqa: N807 - becomes the package's __getattr__
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__

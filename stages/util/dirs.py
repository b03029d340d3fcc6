"""Where ocibuild keeps things when nobody says: one rule for every default.

User directories follow the XDG base directory spec through platformdirs
(``$XDG_DATA_HOME/ocibuild``, else ``~/.local/share/ocibuild``;
``$XDG_STATE_HOME/ocibuild``, else ``~/.local/state/ocibuild``). The build
service's state is the exception for root: ``/var/lib/ocibuild``, since
root's home (0700) is not searchable by a container's mapped root.
Explicit settings (``OCIBUILD_STORE``, ``OCIBUILD_STATE``, options) are
read by the callers, before these.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["ROOT_STATE_DIR", "data_dir", "state_dir"]

APP = "ocibuild"
ROOT_STATE_DIR = Path("/var/lib/ocibuild")


def data_dir() -> Path:
    """The user's data directory for ocibuild (stores)."""
    return Path(platformdirs.user_data_dir(APP, appauthor=False)).absolute()


def state_dir() -> Path:
    """The default state directory of a build service: /var/lib/ocibuild for
    root, else the user's state directory for ocibuild."""
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    return Path(platformdirs.user_state_dir(APP, appauthor=False)).absolute()

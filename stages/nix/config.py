"""What ocibuild reads of Nix's configuration: the sandbox paths.

Nix binds ``sandbox-paths`` (and ``extra-sandbox-paths``) into every
sandboxed build: each entry is ``PATH`` (the host's PATH at PATH) or
``TARGET=SOURCE``, and a trailing ``?`` makes it optional (skipped when the
source does not exist). ``ocibuild nix build`` reads them from the same
file Nix does (``$NIX_CONF_DIR/nix.conf``, else ``/etc/nix/nix.conf``) and
maps them onto the operator's policy: each target becomes a read-only path
of every derivation's request, bound from exactly its source
(:class:`stages.policy.Policy` ``ro_aliases``; nothing below or beside the
source is allowed by it).

Caveats: ``include``/``!include`` lines are not followed; the legacy names
``build-chroot-dirs``/``build-extra-chroot-dirs`` are read too.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from stages.nix.errors import NixError

__all__ = ["SandboxPath", "nix_conf_path", "sandbox_paths"]

_SET = ("sandbox-paths", "build-chroot-dirs")
_EXTRA = ("extra-sandbox-paths", "build-extra-chroot-dirs")


@attrs.frozen
class SandboxPath:
    """One entry: bind ``source`` (a host path) at ``target`` in every build."""

    target: str
    source: str
    optional: bool = False


def nix_conf_path() -> Path:
    conf_dir = os.environ.get("NIX_CONF_DIR")
    return Path(conf_dir, "nix.conf") if conf_dir else Path("/etc/nix/nix.conf")


def _entry(text: str, where: str) -> SandboxPath:
    optional = text.endswith("?")
    text = text.removesuffix("?")
    target, sep, source = text.partition("=")
    source = source if sep else target
    for path in (target, source):
        if not path.startswith("/"):
            raise NixError(f"{where}: sandbox path {text!r} is not absolute")
    return SandboxPath(target=os.path.normpath(target), source=source, optional=optional)


def sandbox_paths(conf: Path | None = None) -> list[SandboxPath]:
    """The sandbox paths ``conf`` (default: Nix's own nix.conf) sets, in order."""
    conf = conf or nix_conf_path()
    try:
        lines = conf.read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise NixError(f"cannot read {conf}: {exc.strerror}") from exc
    entries: list[SandboxPath] = []
    for number, line in enumerate(lines, 1):
        key, sep, value = line.split("#", 1)[0].partition("=")
        key = key.strip()
        if not sep or key not in _SET + _EXTRA:
            continue
        found = [_entry(item, f"{conf}:{number}") for item in value.split()]
        entries = entries + found if key in _EXTRA else found
    return entries

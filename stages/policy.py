"""What the operator lets a request have: host paths, network, limits, systems.

A request asks (``constraints.available_ro_paths``, ``network_access``,
``min_memory``, ``system``); the operator decides, once per service, with a
:class:`Policy` (``ocibuild build``/``nix build``/``serve`` options). The
validate stage refuses a request that asks for more (:func:`check_request`),
naming the field, before anything runs; the spec stage applies the limits.

Host paths are matched as the host resolves them: a requested path must lie
in an allowed directory both as written and after its symlinks are resolved
on the host (so a symlink inside an allowed directory cannot lead out of
it), and the container binds the resolved path. A path outside every
allowed directory is refused without looking at the host's file system, so
the refusal says nothing about what exists there.

Caveat: read-only does not stop ``connect()`` on a unix socket inside an
allowed directory (a daemon's socket under ``/nix`` or ``/run``): a socket
itself is never bound, but allow directories that hold none. A directory
overlapping the service's state directory is refused when the service
starts.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import attrs

from stages.errors import RequestError

if TYPE_CHECKING:  # the request model loads with the first build, not with the service
    from stages.request import BuildRequest

__all__ = ["DEFAULT_MAX_MEMORY", "DEFAULT_MAX_PIDS", "DEFAULT_SERVE_TIMEOUT", "DEFAULT_SYSTEMS",
           "DEFAULT_TMP_SIZE", "POLICY_RULES", "Policy", "check_request", "parse_size"]

#: Processes (and threads) one build may have at once.
DEFAULT_MAX_PIDS = 4096
#: Memory one build may use (its page cache and /tmp included): 8 GiB.
DEFAULT_MAX_MEMORY = 8 << 30
#: Size of a build's /tmp (a tmpfs, counted in its memory too): 1 GiB.
DEFAULT_TMP_SIZE = 1 << 30
#: The longest a build of a remote client (``ocibuild serve``) may run, by
#: default (seconds).
DEFAULT_SERVE_TIMEOUT = 3600.0
#: What this machine builds: x86-64 Linux. (Nix 2.8 also offers i686-linux
#: here; the seccomp filter is x86-64 only, stages.oci.seccomp.)
DEFAULT_SYSTEMS = ("x86_64-linux",)

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``8G``, ``1048576``: a byte count (binary units, case-insensitive)."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS and value[-1:] != "" else ""
    number = value[:-1] if unit else value
    try:
        size = int(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 512M, 8G or a byte count)") from None
    if size <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return size


def _normalized(paths: Iterable[str]) -> tuple[str, ...]:
    out = []
    for p in paths:
        if not os.path.isabs(p):
            raise ValueError(f"allowed read-only path {p!r} is not absolute")
        out.append(os.path.normpath(p))
    return tuple(sorted(set(out)))


def _aliases(value: Mapping[str, str]) -> dict[str, str]:
    return {os.path.normpath(k): v for k, v in value.items()}


def _positive(_self: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be positive, not {value}")


@attrs.frozen(kw_only=True)
class Policy:
    """The operator's decisions for every build of one service."""

    #: Host directories whose contents requests may bind read-only.
    allowed_ro_paths: tuple[str, ...] = attrs.field(default=(), converter=_normalized)
    #: Whether a request may have network access at all.
    allow_network: bool = False
    max_pids: int = attrs.field(default=DEFAULT_MAX_PIDS, validator=_positive)
    max_memory: int = attrs.field(default=DEFAULT_MAX_MEMORY, validator=_positive)
    tmp_size: int = attrs.field(default=DEFAULT_TMP_SIZE, validator=_positive)
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    #: Read-only paths the operator maps to other host paths (target ->
    #: source; Nix's ``sandbox-paths = TARGET=SOURCE``): allowed as they are.
    ro_aliases: Mapping[str, str] = attrs.field(factory=dict, converter=_aliases)

    def ro_source(self, path: str) -> str | None:
        """The host path to bind for a requested read-only path, or None if not allowed.

        Looks at the host's file system only for paths inside an allowed
        directory as written.
        """
        norm = os.path.normpath(path)
        if norm in self.ro_aliases:  # the operator's own mapping: trusted as written
            return os.path.realpath(self.ro_aliases[norm])
        if not any(_inside(norm, a) for a in self.allowed_ro_paths):
            return None
        resolved = os.path.realpath(norm)
        if not any(_inside(resolved, os.path.realpath(a)) for a in self.allowed_ro_paths):
            return None
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.stat(resolved).st_mode):
                return None  # read-only does not stop connect(): a daemon's socket
        return resolved


def _inside(path: str, directory: str) -> bool:
    return directory == "/" or path == directory or path.startswith(directory + "/")


#: The rules :func:`check_request` applies, by their stable identifiers.
POLICY_RULES = {
    "ro-path-not-allowed": "a read-only host path lies outside the operator's --allow-ro-path",
    "network-not-allowed": "network access asked of a service without --allow-network",
    "system-unsupported": "constraints.system is not a system this service builds",
    "memory-over-limit": "constraints.min_memory is above the service's --max-memory",
}


def check_request(req: BuildRequest, policy: Policy) -> None:
    """Refuse a request that asks for more than ``policy`` grants (RequestError)."""
    c = req.constraints
    if c is None:
        return
    for i, p in enumerate(c.available_ro_paths):
        if policy.ro_source(p) is None:
            raise RequestError(f"constraints.available_ro_paths[{i}]", "ro-path-not-allowed",
                          f"{p!r} is not in a directory this service lets builds read "
                          f"(the operator allows them with --allow-ro-path)")
    if c.network_access and not policy.allow_network:
        raise RequestError("constraints.network_access", "network-not-allowed",
                      "this service grants no network access (the operator allows it "
                      "with --allow-network)")
    if c.system not in policy.systems:
        raise RequestError("constraints.system", "system-unsupported",
                      f"{c.system!r}: this service builds for {', '.join(policy.systems)}")
    if c.min_memory > policy.max_memory:
        raise RequestError("constraints.min_memory", "memory-over-limit",
                      f"{c.min_memory} bytes asked; a build here gets at most "
                      f"{policy.max_memory} (--max-memory)")

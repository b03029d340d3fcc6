"""User-namespace id mappings from /etc/subuid and /etc/subgid.

A build container runs in its own user namespace. Container ids 0..65535 map
onto one range of the running user's subordinate ids, so container root is a
subordinate id and the builder (uid 1000 / gid 100, as in Nix's sandbox) is
``start + 1000`` / ``start + 100`` on the host. Host root is never mapped.

Concurrent builds may share the same mapping: they are kept apart by their
mount namespaces and by owning separate directories, not by ids.

Caveats:

- Lines are ``owner:start:count`` where owner is a user name or a numeric uid;
  blank lines and ``#`` comments are skipped. A malformed line is an error
  naming the file and line, not silently skipped.
- The first range of the running user with at least 65536 ids is used (only
  its first 65536 ids). Ranges that would include host id 0 are ignored.
- Without such a range (no file, an empty file, or no entry for the user) the
  fallback range ``FALLBACK_START .. FALLBACK_START + 65535`` is used. It lies
  far above the ranges useradd hands out (from 100000, 65536 per user, so the
  first ~14000 users) and below 2**32 - 1 (the "no id" value). Add an entry to
  /etc/subuid and /etc/subgid to choose another range.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable
from pathlib import Path

import attrs

from stages.errors import IdMapError

__all__ = ["BUILD_GID", "BUILD_UID", "FALLBACK_START", "IdMap", "IdMapping", "NEEDED",
           "load_idmap", "parse_subid", "choose_range"]

#: The builder's ids inside the container, as in Nix's sandbox (also exported
#: by stages.spec, which puts them in the spec).
BUILD_UID = 1000
BUILD_GID = 100

#: How many ids a build's user namespace maps (container ids 0..65535).
NEEDED = 65536
#: Start of the documented fallback host range when the user has no subids.
FALLBACK_START = 1_000_000_000
_MAX_ID = 2**32 - 2  # 2**32 - 1 is (uid_t) -1


@attrs.frozen(kw_only=True)
class IdMapping:
    """``size`` ids from ``container_id`` inside map to ``host_id`` outside."""

    container_id: int
    host_id: int
    size: int

    def as_oci(self) -> dict:
        return {"containerID": self.container_id, "hostID": self.host_id, "size": self.size}


def _mappings(items: Iterable[IdMapping]) -> tuple[IdMapping, ...]:
    """A typed converter (attrs' mypy plugin cannot solve converter=tuple's type variable)."""
    return tuple(items)


@attrs.frozen(kw_only=True)
class IdMap:
    """The uid and gid mappings of a build container."""

    uid: tuple[IdMapping, ...] = attrs.field(converter=_mappings)
    gid: tuple[IdMapping, ...] = attrs.field(converter=_mappings)

    @staticmethod
    def _to_host(maps: tuple[IdMapping, ...], cid: int, kind: str) -> int:
        for m in maps:
            if m.container_id <= cid < m.container_id + m.size:
                return m.host_id + cid - m.container_id
        raise IdMapError("idmap", f"container {kind} {cid} is not mapped")

    def host_uid(self, container_uid: int) -> int:
        return self._to_host(self.uid, container_uid, "uid")

    def host_gid(self, container_gid: int) -> int:
        return self._to_host(self.gid, container_gid, "gid")

    @classmethod
    def single(cls, uid_start: int, gid_start: int, size: int = NEEDED) -> IdMap:
        for start in (uid_start, gid_start):
            if start <= 0 or start + size - 1 > _MAX_ID:
                raise IdMapError("idmap", f"host range {start}+{size} must lie in 1..{_MAX_ID}")
        return cls(uid=[IdMapping(container_id=0, host_id=uid_start, size=size)],
                   gid=[IdMapping(container_id=0, host_id=gid_start, size=size)])


def parse_subid(text: str, path: Path | str = "<subid>") -> list[tuple[str, int, int]]:
    """Parse subuid/subgid text into (owner, start, count) entries."""
    entries = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3 or not parts[0]:
            raise IdMapError(path, f"expected owner:start:count, got {raw!r}", line=lineno)
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            raise IdMapError(path, f"start and count must be integers in {raw!r}",
                             line=lineno) from None
        if start < 0 or count <= 0 or start + count - 1 > _MAX_ID:
            raise IdMapError(path, f"range {start}+{count} is not a valid id range", line=lineno)
        entries.append((parts[0], start, count))
    return entries


def choose_range(entries: list[tuple[str, int, int]], *, user: str, uid: int) -> int | None:
    """Start of the first range owned by user (by name or uid) with NEEDED ids."""
    for owner, start, count in entries:
        if owner not in (user, str(uid)):
            continue
        if start == 0 or count < NEEDED:
            continue  # never map anything to host root; too small for a build
        return start
    return None


def _start_from(path: Path, user: str, uid: int) -> int:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return FALLBACK_START
    except OSError as exc:
        raise IdMapError(path, f"cannot read: {exc.strerror}") from exc
    start = choose_range(parse_subid(text, path), user=user, uid=uid)
    return FALLBACK_START if start is None else start


def load_idmap(subuid: Path | str = "/etc/subuid", subgid: Path | str = "/etc/subgid", *,
               uid: int | None = None) -> IdMap:
    """The mapping for the running user (or ``uid``), with the documented fallback."""
    uid = os.getuid() if uid is None else uid
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return IdMap.single(_start_from(Path(subuid), user, uid),
                        _start_from(Path(subgid), user, uid))

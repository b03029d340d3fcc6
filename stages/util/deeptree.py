"""Directory trees of any depth and path length, reached without recursion.

The kernel takes at most PATH_MAX (4096) bytes of path per call, and a
builder can write a tree far deeper than that (10,000 nested directories
named ``d`` are 20,000 bytes of path). :class:`DeepTree` reaches every
directory of such a tree through *anchors*: open directory descriptors that
paths are resolved from (``dir_fd=``), so no path handed to the kernel is
longer than :data:`PATH_BUDGET` plus a name or two.

::

    tree = DeepTree(b"/some/root")
    place = tree.top                      # the root directory
    child = tree.child(place, b"sub")     # a directory entry of it
    with tree.opened(child, b"file") as (path, dir_fd):
        fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)

A :class:`Place` is a directory: an anchor and a path below it. The root's
anchor is virtual (never opened): below it paths are plain, the root joined
with the rest (``os.path.join``), exactly the paths a walk by name would
use. A place whose path from its anchor would pass :data:`PATH_BUDGET`
bytes becomes a new anchor, opened when first used (O_NOFOLLOW,
O_DIRECTORY) relative to its parent anchor.

At most ``max_open`` anchors are open at once (least recently used are
closed first); a closed anchor is opened again from its parent anchor when
needed, and must still be the same directory (device and inode), else
OSError ESTALE. An anchor in use (:meth:`DeepTree.opened`,
:meth:`DeepTree.pin`) is never closed under its user. Thread-safe.

Caveats:

- Only the last component of a path is opened with O_NOFOLLOW; the
  directories between an anchor and a place are trusted to stay directories
  (callers walk trees nobody is changing: a builder's, once it has exited).
- :meth:`DeepTree.proc_path` names an entry as ``/proc/self/fd/N/...`` for
  code that takes only paths; it is valid while its anchor is pinned.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import threading
from collections.abc import Iterator

__all__ = ["MAX_OPEN", "PATH_BUDGET", "Anchor", "DeepTree", "Place"]

#: Bytes of path below an anchor before a place becomes an anchor itself.
#: With a name (<= 255 bytes) or two joined on, a path stays below PATH_MAX.
PATH_BUDGET = 1024
#: Anchors open at once, by default.
MAX_OPEN = 32

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Anchor:
    """A directory paths are resolved from: the root (virtual) or an open fd."""

    __slots__ = ("parent", "rel", "fd", "ident", "pins")

    def __init__(self, parent: Anchor | None, rel: bytes) -> None:
        self.parent = parent
        #: The path from the parent's place of resolution (the root's own path
        #: for the root anchor).
        self.rel = rel
        self.fd: int | None = None
        self.ident: tuple[int, int] | None = None
        self.pins = 0


class Place:
    """A directory of the tree: ``rel`` below ``anchor`` (b"": the anchor itself)."""

    __slots__ = ("anchor", "rel")

    def __init__(self, anchor: Anchor, rel: bytes) -> None:
        self.anchor = anchor
        self.rel = rel

    def __repr__(self) -> str:
        return f"Place({self.rel!r} below anchor {id(self.anchor):#x})"


class DeepTree:
    """Anchors and places of one tree rooted at ``root``; see the module docstring."""

    def __init__(self, root: bytes | str | os.PathLike[str], *,
                 max_open: int = MAX_OPEN) -> None:
        self.root = os.fsencode(root)
        self.max_open = max(1, max_open)
        self._root_anchor = Anchor(None, self.root)
        self.top = Place(self._root_anchor, b"")
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[Anchor, None] = collections.OrderedDict()

    # --- places and paths ---------------------------------------------------

    def is_plain(self, place: Place) -> bool:
        """Whether ``place`` is reached by a plain path (below the virtual root anchor)."""
        return place.anchor is self._root_anchor

    def child(self, place: Place, name: bytes) -> Place:
        """The place of directory ``name`` inside ``place``."""
        rel = place.rel + b"/" + name if place.rel else name
        anchor = place.anchor
        used = len(self.root) + 1 + len(rel) if anchor is self._root_anchor else len(rel)
        if used <= PATH_BUDGET:
            return Place(anchor, rel)
        return Place(Anchor(anchor, rel), b"")

    def path(self, place: Place, name: bytes | None = None) -> bytes:
        """The path of ``place`` (or of its entry ``name``) from its anchor.

        Below the root anchor a plain path (for ``dir_fd=None``); below any
        other, relative to the anchor's fd.
        """
        rel = place.rel
        if name is not None:
            rel = rel + b"/" + name if rel else name
        if place.anchor is self._root_anchor:
            return os.path.join(self.root, rel) if rel else self.root
        return rel or b"."

    def display(self, place: Place, name: bytes | None = None) -> bytes:
        """The full path of ``place`` (or its entry ``name``), for messages."""
        parts = [name] if name is not None else []
        if place.rel:
            parts.append(place.rel)
        anchor: Anchor | None = place.anchor
        while anchor is not None:
            parts.append(anchor.rel)
            anchor = anchor.parent
        return os.path.join(*reversed(parts)) if len(parts) > 1 else parts[0]

    def proc_path(self, place: Place, name: bytes) -> bytes:
        """A path of entry ``name`` usable by code that takes paths only.

        Plain below the root anchor; else through ``/proc/self/fd``, valid
        while the anchor is pinned (:meth:`pin`).
        """
        anchor = place.anchor
        if anchor is self._root_anchor:
            return self.path(place, name)
        assert anchor.fd is not None and anchor.pins, "proc_path of an anchor not pinned"
        return b"/proc/self/fd/%d/%s" % (anchor.fd, self.path(place, name))

    # --- anchors ------------------------------------------------------------

    def pin(self, anchor: Anchor) -> int | None:
        """Open ``anchor`` if needed and keep it open until :meth:`unpin`; its fd."""
        if anchor is self._root_anchor:
            return None
        with self._lock:
            self._ensure_open(anchor)
            anchor.pins += 1
            assert anchor.fd is not None
            return anchor.fd

    def unpin(self, anchor: Anchor) -> None:
        if anchor is self._root_anchor:
            return
        with self._lock:
            anchor.pins -= 1
            self._evict()

    @contextlib.contextmanager
    def opened(self, place: Place, name: bytes | None = None
               ) -> Iterator[tuple[bytes, int | None]]:
        """``(path, dir_fd)`` of ``place`` (or its entry), for os calls taking ``dir_fd``."""
        dir_fd = self.pin(place.anchor)
        try:
            yield self.path(place, name), dir_fd
        finally:
            self.unpin(place.anchor)

    def open_dir(self, place: Place) -> int:
        """A new fd of the directory at ``place`` (O_NOFOLLOW); the caller closes it."""
        with self.opened(place) as (path, dir_fd):
            return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)

    def forget(self, anchor: Anchor) -> None:
        """Close ``anchor`` (say, its directory is about to go); opened again if used."""
        with self._lock:
            if anchor.fd is not None and not anchor.pins:
                self._close(anchor)

    def close(self) -> None:
        """Close every anchor."""
        with self._lock:
            for anchor in list(self._open):
                self._close(anchor)

    def __enter__(self) -> DeepTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Lock held below.

    def _ensure_open(self, anchor: Anchor) -> None:
        if anchor.fd is not None:
            self._open.move_to_end(anchor)
            return
        chain = []
        a: Anchor | None = anchor
        while a is not None and a is not self._root_anchor and a.fd is None:
            chain.append(a)
            a = a.parent
        held: list[Anchor] = []
        try:
            # Outermost first; each stays pinned while its child opens from it.
            for a in reversed(chain):
                parent = a.parent
                assert parent is not None
                dir_fd = parent.fd if parent is not self._root_anchor else None
                path = a.rel if dir_fd is not None else os.path.join(self.root, a.rel)
                fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
                st = os.fstat(fd)
                ident = (st.st_dev, st.st_ino)
                if a.ident is None:
                    a.ident = ident
                elif a.ident != ident:
                    os.close(fd)
                    raise OSError(errno.ESTALE, "the directory was replaced during the walk",
                                  os.fsdecode(path))
                a.fd = fd
                self._open[a] = None
                a.pins += 1
                held.append(a)
        finally:
            for a in held:
                a.pins -= 1
        self._evict(keep=anchor)

    def _evict(self, keep: Anchor | None = None) -> None:
        if len(self._open) <= self.max_open:
            return
        for a in list(self._open):
            if len(self._open) <= self.max_open:
                break
            if a.pins or a is keep:
                continue
            self._close(a)

    def _close(self, anchor: Anchor) -> None:
        fd, anchor.fd = anchor.fd, None
        self._open.pop(anchor, None)
        if fd is not None:
            os.close(fd)

"""Where a build's pieces live on the host, inside its bundle directory.

::

    <bundle>/config.json        the OCI runtime spec
    <bundle>/rootfs/            the read-only root: etc/, mount points
    <bundle>/scratch/<i>/       host side of scratch_paths[i], writable by the builder
    <bundle>/build.log          the builder's stdout and stderr

A path of the build root (relative, as in a request) lives in the scratch
directory of its longest scratch-path prefix, or else in the rootfs.

A bundle is removed whole, or moved into a trash directory to be deleted
later (:func:`remove_bundle`, :func:`trash_bundle`), never while anything is
mounted inside it. Every tree a builder wrote is removed by :func:`rmtree`:
iterative, for any depth and path length (a builder controls both), and
through directories the builder took permissions from.

The scratch directories may live elsewhere (``scratch_root``): a bundle on
a tmpfs keeps what the builder writes on disk. ``<bundle>/scratch`` is then
a symlink to ``scratch_root``, for people looking at the bundle; code and
config.json use the real path.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from stages.errors import BundleError
from stages.util.deeptree import DeepTree, Place

__all__ = ["BundleLayout", "check_traversable", "is_under", "linked_scratch",
           "longest_scratch_prefix", "remove_bundle", "remove_if_small", "rmtree",
           "trash_bundle"]


def is_under(path: str, root: str) -> bool:
    """``path`` equals ``root`` or lies below it (clean relative paths)."""
    return path == root or path.startswith(root + "/")


def longest_scratch_prefix(path: str, scratch_paths: Iterable[str]) -> str | None:
    """The scratch path holding ``path``, the longest when several do."""
    best = None
    for s in scratch_paths:
        if is_under(path, s) and (best is None or len(s) > len(best)):
            best = s
    return best


def check_traversable(path: Path | str) -> None:
    """Refuse a bundle location the container's root could not reach."""
    p = Path(path).resolve()
    for d in [p, *p.parents]:
        try:
            mode = d.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & 0o001:
            raise BundleError(path, f"{d} is not searchable by others (mode "
                                    f"{mode & 0o777:o}); the container's mapped root could "
                                    f"not reach the bundle; use a directory with o+x")


@attrs.frozen
class BundleLayout:
    """Path arithmetic for one bundle directory; no I/O."""

    root: Path = attrs.field(converter=Path)
    #: Where the scratch directories are, when not in ``<root>/scratch``.
    scratch_root: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(Path))
    #: A root file system shared with other bundles, used instead of
    #: ``<root>/rootfs`` (see :mod:`stages.bundle`).
    shared_rootfs: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(Path))

    @property
    def scratch_base(self) -> Path:
        """The directory holding ``<i>/`` for each scratch path."""
        return self.scratch_root if self.scratch_root is not None else self.root / "scratch"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def rootfs(self) -> Path:
        return self.shared_rootfs if self.shared_rootfs is not None else self.root / "rootfs"

    @property
    def log(self) -> Path:
        return self.root / "build.log"

    def scratch_dir(self, scratch_paths: Sequence[str], scratch_path: str) -> Path:
        """The host directory bind-mounted at /<scratch_path>, one of the
        request's ``scratch_paths``."""
        return self.scratch_base / str(list(scratch_paths).index(scratch_path))

    def scratch_dirs(self, scratch_paths: Sequence[str]) -> dict[str, Path]:
        return {s: self.scratch_base / str(i) for i, s in enumerate(scratch_paths)}

    def host_path(self, scratch_paths: Sequence[str], rel: str) -> Path:
        """The host path that holds build-root path ``rel`` (clean, relative).

        Outputs are read back from here after the build.
        """
        s = longest_scratch_prefix(rel, scratch_paths)
        if s is None:
            return self.rootfs / rel if rel else self.rootfs
        tail = rel[len(s) + 1:]
        base = self.scratch_dir(scratch_paths, s)
        return base / tail if tail else base


def _mounts_under(paths: list[Path]) -> list[str]:
    """The mount points at or below any of ``paths`` (one read of mountinfo)."""
    with open("/proc/self/mountinfo", "rb") as f:
        info = f.read()
    found = []
    for path in paths:
        # mountinfo escapes space, tab, newline and backslash as octal: a path
        # free of them appears as itself, and most paths are (a quick test first).
        text = os.fsencode(path).rstrip(b"/")
        if text not in info and not any(c in text for c in b" \t\n\\"):
            continue
        prefix = str(path).rstrip("/") + "/"
        for line in info.decode("utf-8", "surrogateescape").splitlines():
            mnt = line.split()[4].encode("utf-8", "surrogateescape").decode("unicode_escape")
            if mnt == str(path) or mnt.startswith(prefix):
                found.append(mnt)
    return found


def linked_scratch(bundle_dir: Path | str) -> Path | None:
    """The scratch root of a bundle whose scratch directories live elsewhere."""
    link = Path(bundle_dir) / "scratch"
    if not link.is_symlink():
        return None
    return Path(os.readlink(link))


def _refuse_mounted(bundle: Path, parts: list[Path]) -> None:
    mounted = _mounts_under(parts)
    if mounted:
        raise BundleError(bundle, f"still mounted inside: {', '.join(mounted)}; unmount first")


def trash_bundle(bundle_dir: Path | str, trash_dir: Path | str, *,
                 scratch_trash_dir: Path | str | None = None) -> list[Path]:
    """Move a bundle into ``trash_dir`` (same filesystem) for later deletion.

    A scratch root kept elsewhere (:func:`linked_scratch`) goes into
    ``scratch_trash_dir`` (default: ``trash_dir``), on its own filesystem.
    Returns where things went (nothing when there was no bundle). Refuses,
    like :func:`remove_bundle`, while anything is mounted inside.
    """
    path = Path(bundle_dir).absolute()
    if not path.exists():
        return []
    scratch = linked_scratch(path)
    parts = [path] if scratch is None or not scratch.exists() else [path, scratch]
    _refuse_mounted(path, parts)
    dests = [Path(trash_dir), Path(scratch_trash_dir or trash_dir)]
    moved = []
    for part, trash in zip(parts, dests):
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / f"{part.name}.{uuid.uuid4().hex[:8]}"
        os.rename(part, target)
        moved.append(target)
    return moved


def remove_if_small(path: Path, limit: int = 64) -> bool:
    """Remove the tree at ``path`` if it has at most ``limit`` entries; say if it did.

    Counting stops at ``limit``, so a large tree costs only that much
    listing before it is left to the caller (for a worker thread).
    """
    count = 0
    with DeepTree(path) as tree:
        stack = [tree.top]
        while stack:
            place = stack.pop()
            fd = tree.open_dir(place)
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        count += 1
                        if count > limit:
                            return False
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(tree.child(place, os.fsencode(entry.name)))
            finally:
                os.close(fd)
    rmtree(path)
    return True


def remove_bundle(bundle_dir: Path | str) -> None:
    """Remove a bundle (and its linked scratch root); refuses while anything is mounted inside."""
    path = Path(bundle_dir).absolute()
    if not path.exists():
        return
    scratch = linked_scratch(path)
    parts = [path] if scratch is None or not scratch.exists() else [path, scratch]
    _refuse_mounted(path, parts)
    for part in parts:
        rmtree(part)


# --- removing trees -----------------------------------------------------------------

def rmtree(path: Path | str | bytes, *, ignore_errors: bool = False) -> None:
    """Remove the directory tree at ``path``, as :func:`shutil.rmtree` does, iteratively.

    Any depth and any path length: an explicit stack, not recursion, and
    directories reached through :class:`~stages.util.deeptree.DeepTree`
    anchors (a bounded number of fds), never by a path longer than the
    kernel takes. Symlinks are removed, never followed. A directory that
    cannot be listed, entered or emptied for its mode bits (a builder's
    ``chmod 0``, ``chmod a-w``) is given ``u+rwx`` and tried again: root
    needs none of that (it removes such trees as shutil.rmtree does), an
    owner without root gets the same result.

    ``path`` must be a directory, not a symlink to one (OSError, as
    shutil.rmtree says). With ``ignore_errors`` whatever fails is left and
    the rest removed; otherwise the first failure raises OSError naming the
    full path at fault.
    """
    root = os.fsencode(path)
    try:
        st = os.lstat(root)
        if stat.S_ISLNK(st.st_mode):
            raise OSError("Cannot call rmtree on a symbolic link")
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(20, "Not a directory", os.fsdecode(root))
    except OSError:
        if ignore_errors:
            return
        raise
    with DeepTree(root) as tree:
        _Remover(tree, ignore_errors).run()


class _Remover:
    """One :func:`rmtree`: each directory emptied of its files, its
    subdirectories pushed; a directory goes when its last subdirectory has."""

    def __init__(self, tree: DeepTree, ignore_errors: bool) -> None:
        self.tree = tree
        self.ignore_errors = ignore_errors

    def run(self) -> None:
        tree = self.tree
        # Directories to remove, deepest last: (place, its parent's place (None:
        # the root), its name there); beside it, whether it was emptied yet.
        stack: list[tuple[Place, Place | None, bytes]] = [(tree.top, None, b"")]
        emptied: list[bool] = [False]
        while stack:
            place, parent, name = stack[-1]
            if not emptied[-1]:
                emptied[-1] = True
                for child in self._empty(place, parent, name):
                    stack.append((tree.child(place, child), place, child))
                    emptied.append(False)
                continue
            stack.pop()
            emptied.pop()
            if not place.rel and not tree.is_plain(place):
                tree.forget(place.anchor)  # its directory goes now
            self._rmdir(place, parent, name)

    def _fail(self, exc: OSError, place: Place, name: bytes | None = None) -> None:
        if self.ignore_errors:
            return
        where = os.fsdecode(self.tree.display(place, name))
        raise OSError(exc.errno, exc.strerror or str(exc), where) from exc

    def _empty(self, place: Place, parent: Place | None, name: bytes) -> list[bytes]:
        """Remove what in ``place`` is not a directory; the names of its subdirectories."""
        try:
            try:
                fd = self.tree.open_dir(place)
            except PermissionError:
                self._grant_entry(parent, name)
                fd = self.tree.open_dir(place)
        except OSError as exc:
            self._fail(exc, place)
            return []
        subdirs = []
        try:
            _grant_fd(fd)
            try:
                with os.scandir(fd) as it:
                    entries = list(it)
            except OSError as exc:
                self._fail(exc, place)
                return []
            for entry in entries:
                entry_name = os.fsencode(entry.name)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry_name)
                    else:
                        os.unlink(entry_name, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self._fail(exc, place, entry_name)
        finally:
            os.close(fd)
        return subdirs

    def _rmdir(self, place: Place, parent: Place | None, name: bytes) -> None:
        tree = self.tree
        try:
            if parent is None:
                os.rmdir(tree.root)
            else:
                with tree.opened(parent, name) as (path, dir_fd):
                    os.rmdir(path, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._fail(exc, place)

    def _grant_entry(self, parent: Place | None, name: bytes) -> None:
        """u+rwx on directory ``name`` of ``parent`` (the root when ``parent`` is None),
        which could not be opened; PermissionError when that cannot help."""
        if parent is None:
            st = os.lstat(self.tree.root)
            if not stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IRWXU == stat.S_IRWXU:
                raise PermissionError(13, "Permission denied")
            os.chmod(self.tree.root, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
            return
        fd = self.tree.open_dir(parent)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IRWXU == stat.S_IRWXU:
                raise PermissionError(13, "Permission denied")
            os.chmod(name, stat.S_IMODE(st.st_mode) | stat.S_IRWXU, dir_fd=fd)
        finally:
            os.close(fd)


def _grant_fd(fd: int) -> None:
    """u+rwx on a directory about to be emptied, if it lacks them and we are not root.

    Root (CAP_DAC_OVERRIDE) needs no mode bits; an owner needs them to list,
    enter and unlink. Not ours to change: left as it is (what fails then
    fails as it would have).
    """
    if os.geteuid() == 0:
        return
    try:
        mode = os.fstat(fd).st_mode
        if mode & stat.S_IRWXU != stat.S_IRWXU:
            os.fchmod(fd, stat.S_IMODE(mode) | stat.S_IRWXU)
    except OSError:
        pass

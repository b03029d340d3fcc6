"""The read-only pyfuse3 filesystem over castore nodes.

The root of the mount is a *synthetic* directory that the server edits at
run time: in the mount server it holds one synthetic directory per build key,
and each of those holds the build's input nodes by name; in the single-tree
mode (``ocibuild castore mount``) the nodes sit at the root itself.

With ``content=True`` (the mount server) the root also holds the content
directory, ``.by-digest`` (:mod:`stages.castore.fuse.content`): any
directory or file of the store, looked up by a name that gives its digest,
with nothing added first. It lists as empty. A name that is not a content
name, or a directory that is not in the store, is ENOENT; a file's blob is
checked when it is opened, as everywhere. Its entries are immutable, so the
kernel keeps them (and whatever it cached below them) from build to build.

Caveats:

- Lazy: a castore Directory is fetched from the store the first time one of
  its inodes is looked up, listed or stat'ed (a stat needs the sub-directory
  count for st_nlink), and cached by digest for the server's life.
- Inodes are allocated on first lookup and never reused or freed while the
  mount lives, so they are stable: directories and symlinks per (parent
  inode, name), files per content (digest, size, exec bit), so that a file
  that appears in many builds' inputs (a compiler, a shell) shares one
  inode and its page cache (like a hard link; st_nlink stays 1). Memory
  grows with the number of distinct paths looked up (about 200 bytes each).
- Everything under a key or in the content directory is immutable, so the
  kernel may cache entries and attributes for a day; the root's own entries
  (the keys) are given a zero timeout so an added or removed key is seen at
  once.
- Each blob is verified (hashed) once per server lifetime, the first time a
  file with it is opened; a corrupt or missing blob makes open() fail with
  EIO and logs a line naming the digest. Later reads are unverified.
- Opt-in (``OCIBUILD_FUSE_FILL_MAX``, bytes, default 0 = off): blobs up to
  that size are also stored into the kernel's page cache of the inode being
  opened while they are verified (``pyfuse3.notify_store``, from a second
  thread), so the reads after the first open are page-cache hits. Nobody can
  read those pages before the verdict (every open of the inode waits for it,
  and none was open before, so no read request can hold a page lock the
  filler waits for); on a bad verdict they are invalidated before open()
  fails. Off by default because it measured no faster end to end (see the
  package docstring) while doubling open()'s latency and CPU for big files.
- Reads run on the trio thread: a cold read from disk briefly holds up other
  requests. Verification runs in a worker thread so it does not.
- read() answers with a slice of the blob's read-only mapping of its pack
  (``LocalStore.map_blob``): the kernel copies the reply straight from the
  pack's page cache, no copy in Python. pyfuse3 hands the slice to the
  kernel right after read() returns. A pack found shorter than the blob (a
  cheap fstat per read) is EIO; if it were truncated in the microseconds
  between that check and the reply, the reply fails with EFAULT and that one
  request is left unanswered, so the reader hangs until the mount goes away
  (ocibuild never truncates committed pack bytes). Pages the kernel touched
  through the mapping are unmapped from the server every FORGET_EVERY bytes,
  so its RSS stays flat. An open file's entry (with its mapping) is dropped
  at its last release, so mappings of a pack that has since grown do not
  pile up. Readers without ``map_blob`` are read with ``read_blob_at``.
- Write operations are refused with EROFS (the mount is also ``ro``).
- A request that fails unexpectedly (a bug) is answered EIO and logged with
  its traceback; left to pyfuse3, any exception but FUSEError would end the
  session and unmount every build's inputs.
- Every entry belongs to one uid/gid, root's unless the filesystem is given
  others (the build service gives the host ids of the sandbox's build user,
  so inputs show as nixbld's, as in Nix 2.8's sandbox).
- readdir lists ``.`` and ``..`` first, as a disk filesystem does (``ls -a``
  shows them). Their inode numbers are the directory's and its parent's,
  the parent being where the directory was first looked up from.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Sequence
from typing import NoReturn, Protocol

import pyfuse3
import trio

from stages.castore.errors import CorruptionError
from stages.castore.fuse.content import CONTENT_DIR, parse_content_name
from stages.castore.fuse.store import StoreReader
from stages.castore.nodes import (
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    blob_digest,
)

__all__ = ["CastoreFS"]

log = logging.getLogger("ocibuild.castore.fuse")

EMPTY_BLOB_DIGEST = blob_digest(b"")
# Served pages of a blob mapping are unmapped from the server (RSS) in steps
# of this many bytes.
FORGET_EVERY = 4 << 20
# Bytes per notify_store while filling the page cache at first open.
FILL_CHUNK = 4 << 20
# Blobs up to this size are put into the page cache while being verified
# (OCIBUILD_FUSE_FILL_MAX, bytes; 0 turns it off). See the package docstring
# for why bigger ones are left to read requests.
FILL_MAX = int(os.environ.get("OCIBUILD_FUSE_FILL_MAX", "0"))
# Immutable content: let the kernel cache it for a long time.
STABLE_TIMEOUT = 86400.0
# Directory listings kept, in entries over all directories (~200 bytes each).
LISTING_CACHE_ENTRIES = 200_000
BLKSIZE = 1 << 17
# Nix store convention: every timestamp is 1 second past the epoch.
MTIME_NS = 1_000_000_000


class Synthetic:
    """A directory made by the server (the root, a key): name -> Node or inode."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[bytes, Node | int] = {}


Entry = Node | Synthetic


class _BlobMapping(Protocol):
    """What this module uses of what a reader's ``map_blob`` returns
    (the local store's :class:`~stages.castore.local.BlobMap`)."""

    size: int
    view: memoryview

    def intact(self) -> bool: ...

    def forget(self, lo: int, hi: int) -> None: ...


class _Filler:
    """Stores a blob's bytes into the kernel's page cache of one inode.

    Stops at the first refusal (logged once); ENOSYS, an old kernel, turns
    filling off for the whole server.
    """

    def __init__(self, fs: CastoreFS, inode: int) -> None:
        self.fs = fs
        self.inode = inode
        self.filled = False
        self.failed = False
        self.stop = False

    def store(self, offset: int, chunk: memoryview) -> None:
        if self.failed or self.stop:
            return
        try:
            pyfuse3.notify_store(self.inode, offset,
                                 chunk)  # type: ignore[arg-type]  # any buffer; stub says bytes
            self.filled = True
        except OSError as exc:
            # Not fatal: the rest is read through requests.
            self.failed = True
            if exc.errno == errno.ENOSYS:
                self.fs.fill_on_verify = False
            log.warning("cannot fill the page cache of inode %d: %s", self.inode, exc)

    def fill_from(self, mapping: _BlobMapping) -> None:
        """Store the whole mapped blob; the kernel copies from the pack's pages."""
        for offset in range(0, mapping.size, FILL_CHUNK):
            if self.failed or self.stop:
                return
            end = min(offset + FILL_CHUNK, mapping.size)
            if not mapping.intact():
                return  # the verdict will say why
            self.store(offset, mapping.view[offset:end])
            mapping.forget(offset, end)


class CastoreFS(pyfuse3.Operations):
    """pyfuse3 operations serving castore nodes read-only from a StoreReader."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, reader: StoreReader, *, uid: int = 0, gid: int = 0,
                 content: bool = False) -> None:
        super().__init__()
        for what, value in (("uid", uid), ("gid", gid)):
            if not isinstance(value, int) or isinstance(value, bool) or not (
                    0 <= value < 2**32 - 1):
                raise ValueError(f"the files' {what} must be an id in 0..{2**32 - 2}, "
                                 f"not {value!r}")
        self.reader = reader
        self.uid = uid
        self.gid = gid
        self.root = Synthetic()
        self._entries: dict[int, Entry] = {pyfuse3.ROOT_INODE: self.root}
        # directory inode -> the inode it was first looked up from ("..")
        self._parent: dict[int, int] = {pyfuse3.ROOT_INODE: pyfuse3.ROOT_INODE}
        self._child_ino: dict[tuple[int, bytes], int] = {}
        # (digest, size, executable) -> the one inode of such file content
        self._file_ino: dict[tuple[bytes, int, bool], int] = {}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._dirs: dict[bytes, tuple[Directory, dict[bytes, Node]]] = {}
        self._listings: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        self._listed = 0
        # inode -> (digest, size, mapping of the blob or None)
        self._open: dict[int, tuple[bytes, int, _BlobMapping | None]] = {}
        # inode -> how many opens of it are not released yet; at zero the
        # entry (and its mapping of an older, shorter pack) is dropped.
        self._open_count: dict[int, int] = {}
        # digest -> True (verified), an Event (being verified) or an error text.
        self._verified: dict[bytes, bool | trio.Event | str] = {}
        self._map_blob = getattr(reader, "map_blob", None)
        # The mapping last served from and its served range not yet forgotten.
        self._served: tuple[_BlobMapping, int, int] | None = None
        # Fill the kernel's page cache while verifying (off after one refusal).
        self.fill_on_verify = True
        self.fill_max = FILL_MAX
        # The content directory's inode (0: none) and the nodes looked up in
        # it, by name (one object per name: their inodes are stable).
        self._content_ino = 0
        self._content: dict[bytes, Node] = {}
        if content:
            self._content_ino = self._alloc(Synthetic())
            self._parent[self._content_ino] = pyfuse3.ROOT_INODE
            self.root.entries[os.fsencode(CONTENT_DIR)] = self._content_ino

    # --- editing the namespace (called by the server, not the kernel) -------

    def _alloc(self, entry: Entry) -> int:
        ino = self._next_ino
        self._next_ino += 1
        self._entries[ino] = entry
        return ino

    def add_key(self, key: bytes, nodes: list[Node]) -> None:
        """Make ``/<key>/<node.name>`` visible; nodes must be named and unique."""
        if self._content_ino and key == os.fsencode(CONTENT_DIR):
            raise KeyError(f"key {key!r} is reserved for the content directory")
        if key in self.root.entries:
            raise KeyError(f"key {key!r} is already mounted")
        Directory.from_nodes(nodes)  # validates names and uniqueness
        sub = Synthetic()
        for node in nodes:
            sub.entries[node.name] = node
        ino = self._alloc(sub)
        self._parent[ino] = pyfuse3.ROOT_INODE
        self.root.entries[key] = ino

    def remove_key(self, key: bytes) -> None:
        """Hide ``/<key>``. Files already open stay readable."""
        if self._content_ino and key == os.fsencode(CONTENT_DIR):
            raise KeyError(f"key {key!r} is reserved for the content directory")
        if self.root.entries.pop(key, None) is None:
            raise KeyError(f"key {key!r} is not mounted")

    def add_root_nodes(self, nodes: list[Node]) -> None:
        """Put nodes straight at the mount's top (single-tree mode)."""
        Directory.from_nodes(nodes)
        for node in nodes:
            self.root.entries[node.name] = node

    # --- lookups -------------------------------------------------------------

    def _directory(self, digest: bytes, *,
                   absent: int = errno.EIO) -> tuple[Directory, dict[bytes, Node]]:
        """The directory and its entries by name; ``absent`` is the errno
        when the store has no such directory (EIO is logged: a referenced
        directory is missing)."""
        cached = self._dirs.get(digest)
        if cached is not None:
            return cached
        try:
            directory = self.reader.get_directory(digest)
        except Exception as exc:
            log.error("directory %s cannot be read from the store: %s", digest.hex(), exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        if directory is None:
            if absent == errno.EIO:
                log.error("directory %s is not in the store", digest.hex())
            raise pyfuse3.FUSEError(absent)
        if directory.digest != digest:
            log.error("directory %s is corrupt: it hashes to %s",
                      digest.hex(), directory.digest.hex())
            raise pyfuse3.FUSEError(errno.EIO)
        cached = (directory, {n.name: n for n in directory.entries()})
        self._dirs[digest] = cached
        return cached

    def _entry(self, ino: int) -> Entry:
        try:
            return self._entries[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _children(self, entry: Entry) -> list[tuple[bytes, Node | int]]:
        if isinstance(entry, Synthetic):
            return sorted(entry.entries.items())
        if isinstance(entry, DirectoryNode):
            directory, _ = self._directory(entry.digest)
            return [(n.name, n) for n in directory.entries()]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _content_node(self, name: bytes) -> Node:
        """The node a content-directory name stands for (ENOENT if none)."""
        node = self._content.get(name)
        if node is not None:
            return node
        ref = parse_content_name(name)
        if ref is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        kind, digest, size = ref
        if kind == "d":
            directory, _ = self._directory(digest, absent=errno.ENOENT)
            node = DirectoryNode(name=name, digest=digest, size=directory.size)
        else:
            node = FileNode(name=name, digest=digest, size=size, executable=kind == "x")
        self._content[name] = node
        return node

    def _child(self, parent: int, name: bytes) -> int:
        entry = self._entry(parent)
        if parent == self._content_ino:
            found: Node | int | None = self._content_node(name)
        elif isinstance(entry, Synthetic):
            found = entry.entries.get(name)
        elif isinstance(entry, DirectoryNode):
            found = self._directory(entry.digest)[1].get(name)
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if isinstance(found, int):
            return found
        if isinstance(found, FileNode):
            # One inode per distinct file content (and exec bit), wherever it
            # appears: with keep_cache its pages stay in the kernel's cache
            # across builds and keys (a builder's binaries are read once).
            fkey = (found.digest, found.size, found.executable)
            ino = self._file_ino.get(fkey)
            if ino is None:
                ino = self._alloc(found)
                self._file_ino[fkey] = ino
            return ino
        key = (parent, name)
        ino = self._child_ino.get(key)
        if ino is None or self._entries[ino] is not found:
            ino = self._alloc(found)
            self._child_ino[key] = ino
            if isinstance(found, DirectoryNode):
                self._parent[ino] = parent
        return ino

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        entry = self._entry(ino)
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.st_uid = self.uid
        attrs.st_gid = self.gid
        attrs.st_blksize = BLKSIZE
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = MTIME_NS
        timeout = STABLE_TIMEOUT
        if isinstance(entry, FileNode):
            attrs.st_mode = stat.S_IFREG | (0o555 if entry.executable else 0o444)
            attrs.st_nlink = 1
            attrs.st_size = entry.size
        elif isinstance(entry, SymlinkNode):
            attrs.st_mode = stat.S_IFLNK | 0o777
            attrs.st_nlink = 1
            attrs.st_size = len(entry.target)
        elif isinstance(entry, DirectoryNode):
            directory, index = self._directory(entry.digest)
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2 + len(directory.directories)
            attrs.st_size = len(index)
        else:
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2 + sum(
                1 for v in entry.entries.values()
                if isinstance(v, (int, DirectoryNode)))
            attrs.st_size = len(entry.entries)
            if entry is self.root:
                timeout = 0.0
        attrs.st_blocks = (attrs.st_size + 511) // 512
        attrs.entry_timeout = attrs.attr_timeout = timeout
        return attrs

    def _lookup_timeout(self, parent: int, attrs: pyfuse3.EntryAttributes) -> None:
        if parent == pyfuse3.ROOT_INODE and attrs.st_ino != self._content_ino:
            attrs.entry_timeout = attrs.attr_timeout = 0.0

    # --- pyfuse3 operations --------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            attrs = self._attrs(self._child(parent_inode, name))
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOENT or not isinstance(self._entries.get(parent_inode),
                                                           DirectoryNode):
                raise
            # A name missing from a stored directory stays missing (its
            # contents are fixed by its digest): the kernel may remember that
            # (st_ino 0: a negative entry), so a compiler probing every
            # include directory asks once per name, not once per #include.
            attrs = pyfuse3.EntryAttributes()
            attrs.st_ino = 0
            attrs.entry_timeout = STABLE_TIMEOUT
            return attrs
        self._lookup_timeout(parent_inode, attrs)
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        entry = self._entry(inode)
        if not isinstance(entry, SymlinkNode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return entry.target

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        entry = self._entry(inode)
        if not isinstance(entry, (Synthetic, DirectoryNode)):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # The offset handed to the kernel is the index of the next entry;
        # "." and ".." are entries 0 and 1. (The kernel neither looks them up
        # nor counts them as lookups in a readdirplus reply.)
        listing = self._listing(fh)
        for index in range(start_id, len(listing)):
            name, attrs = listing[index]
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break

    def _listing(self, fh: int) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """A directory's entries with their attributes, "." and ".." first.

        A stored directory's listing never changes: it is built once and
        kept (up to :data:`LISTING_CACHE_ENTRIES` entries in all), so
        listing a big directory again costs the replies only.
        """
        cached = self._listings.get(fh)
        if cached is not None:
            return cached
        entry = self._entry(fh)
        listing = [(b".", self._attrs(fh)), (b"..", self._attrs(self._parent.get(fh, fh)))]
        for name, _ in self._children(entry):
            attrs = self._attrs(self._child(fh, name))
            self._lookup_timeout(fh, attrs)
            listing.append((name, attrs))
        if isinstance(entry, DirectoryNode):
            if self._listed + len(listing) > LISTING_CACHE_ENTRIES:
                self._listings.clear()
                self._listed = 0
            self._listings[fh] = listing
            self._listed += len(listing)
        return listing

    async def releasedir(self, fh: int) -> None:
        pass

    async def open(self, inode: int, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        entry = self._entry(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if not isinstance(entry, FileNode):
            raise pyfuse3.FUSEError(errno.EISDIR if not isinstance(entry, SymlinkNode)
                                    else errno.ELOOP)
        mapping: _BlobMapping | None = None
        if entry.size:
            await self._verify(entry, inode)
            if self._map_blob is not None:
                try:
                    mapping = self._map_blob(entry.digest)
                except Exception as exc:
                    log.error("blob %s (file %r) cannot be mapped: %s",
                              entry.digest.hex(), entry.name, exc)
                    raise pyfuse3.FUSEError(errno.EIO) from exc
        self._open[inode] = (entry.digest, entry.size, mapping)
        self._open_count[inode] = self._open_count.get(inode, 0) + 1
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def _verify(self, node: FileNode, inode: int) -> None:
        digest = node.digest
        state = self._verified.get(digest)
        while isinstance(state, trio.Event):
            await state.wait()
            state = self._verified.get(digest)
        if state is True:
            return
        if isinstance(state, str):
            log.error("blob %s (file %r): %s", digest.hex(), node.name, state)
            raise pyfuse3.FUSEError(errno.EIO)
        done = trio.Event()
        self._verified[digest] = done
        try:
            problem = await trio.to_thread.run_sync(self._check_blob, digest, node.size,
                                                    inode)
        finally:
            done.set()
        if problem is None:
            self._verified[digest] = True
            return
        self._verified[digest] = problem
        log.error("blob %s (file %r): %s", digest.hex(), node.name, problem)
        raise pyfuse3.FUSEError(errno.EIO)

    def _check_blob(self, digest: bytes, size: int, inode: int) -> str | None:
        """Why the blob cannot be served, or None when it is intact.

        Runs in a worker thread. With ``fill_on_verify`` (and a reader with
        ``map_blob``) the blob's bytes also go into the kernel's page cache of
        ``inode``, from the blob's mapping in a second thread while this one
        hashes (so open() costs about the longer of the two, not their sum).
        The pages are invalidated again when the verdict is bad.
        """
        filler = _Filler(self, inode)
        problem = None
        thread = None
        try:
            have = self.reader.blob_size(digest)
            if have is None:
                return "is not in the store"
            if have != size:
                return f"has {have} bytes in the store, the file node says {size}"
            if self.fill_on_verify and size <= self.fill_max and self._map_blob is not None:
                thread = threading.Thread(target=filler.fill_from,
                                          args=(self._map_blob(digest),),
                                          name=f"fill-{inode}", daemon=True)
                thread.start()
            self.reader.verify_blob(digest)
        except CorruptionError as exc:
            problem = f"is corrupt in the store: {exc}"
        except Exception as exc:  # noqa: BLE001 - reported to the log and as EIO
            problem = f"cannot be read from the store: {exc}"
        finally:
            if thread is not None:
                if problem is not None:
                    filler.stop = True
                thread.join()
        if problem is not None and filler.filled:
            self._drop_pages(inode)
        return problem

    def _drop_pages(self, inode: int) -> None:
        """Forget what the kernel caches of ``inode`` (unverified pages)."""
        try:
            pyfuse3.invalidate_inode(inode)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing of it
                log.error("cannot drop unverified pages of inode %d: %s", inode, exc)

    # pyfuse3 replies with any buffer (a view of the mapping: no copy); its stub says bytes.
    async def read(  # type: ignore[override]  # returns a memoryview too
            self, fh: int, off: int, size: int) -> bytes | memoryview:
        digest, length, mapping = self._open[fh]
        if off >= length:
            return b""
        end = min(off + size, length)
        try:
            if mapping is None:
                return self.reader.read_blob_at(digest, off, end - off)
            if not mapping.intact():
                raise CorruptionError("blob", digest, "its pack is now shorter than the blob")
            self._note_served(mapping, off, end)
            return mapping.view[off:end]
        except Exception as exc:
            log.error("blob %s: read at %d failed: %s", digest.hex(), off, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    def _note_served(self, mapping: _BlobMapping, lo: int, hi: int) -> None:
        """Unmap pages served earlier from this process, in FORGET_EVERY steps.

        Only ranges of earlier requests are forgotten (the kernel has copied
        them); this request's range is kept until a later one.
        """
        served = self._served
        if served is not None:
            past, a, b = served
            if past is mapping and lo <= b and hi >= a and b - a < FORGET_EVERY:
                self._served = (mapping, min(lo, a), max(hi, b))
                return
            past.forget(a, b)
        self._served = (mapping, lo, hi)

    async def release(self, fh: int) -> None:
        left = self._open_count.get(fh, 1) - 1
        if left > 0:
            self._open_count[fh] = left
            return
        self._open_count.pop(fh, None)
        self._open.pop(fh, None)

    async def flush(self, fh: int) -> None:
        # Nothing to flush on a read-only file system: ENOSYS tells the
        # kernel so once, and it stops sending a FLUSH request at every close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inodes stay allocated for the mount's life so their numbers are stable.
        pass

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLKSIZE
        data.f_frsize = 512
        data.f_files = len(self._entries)
        data.f_namemax = 255
        return data

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._entry(inode)
        return []

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._entry(inode)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    # --- everything that would write ----------------------------------------

    async def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _refuse
    create = write = setxattr = removexattr = fsync = _refuse


def _contained(op, *, answers: bool):
    """``op``, with an unexpected exception logged (with its traceback) and
    answered with EIO; or swallowed, for a request with no answer to give.

    pyfuse3 ends the whole session on any exception but FUSEError: one bug
    met by one request would unmount every build's inputs at once.
    """
    @functools.wraps(op)
    async def guarded(self, *args):
        try:
            return await op(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            log.error("%s%r failed unexpectedly: %s", op.__name__, args[:2], exc, exc_info=exc)
            if answers:
                raise pyfuse3.FUSEError(errno.EIO) from exc
            return None

    return guarded


for _name in ("lookup", "getattr", "readlink", "opendir", "readdir", "open", "read", "flush",
              "access", "statfs", "listxattr", "getxattr"):
    setattr(CastoreFS, _name, _contained(getattr(CastoreFS, _name), answers=True))
for _name in ("release", "releasedir", "forget"):
    setattr(CastoreFS, _name, _contained(getattr(CastoreFS, _name), answers=False))
del _name

"""Reference scanning: which needles occur in a build's outputs.

After a build, each output (a regular file, a directory tree or a symlink on
the host, never followed) is searched for the request's ``refscan_needles``
(PROTOCOL.md, "Reference scanning"): file contents and symlink targets are
scanned, entry names are not. For Nix derivations the needles are the
32-character nixbase32 hash parts of store paths; the protocol allows any
non-empty strings, and so does this module (any lengths, any bytes).

::

    scanner = NeedleScanner(request.refscan_needles)
    per_output = scan_outputs(scanner, [root / o for o in request.outputs])

The matcher is Hyperscan (the ``hyperscan`` package, which bundles the
library): every needle is compiled once into a block-mode database with
``HS_FLAG_SINGLEMATCH``, so a chunk reports each needle at most once however
often it occurs. Data is scanned in 4 MiB chunks; consecutive chunks overlap
by ``max_needle_len - 1`` bytes, so a needle that spans a chunk boundary is
found, and memory stays bounded for any file size. Large files are cut into
32 MiB segments (each read with the same overlap past its end), and segments
and batches of small files are scanned in parallel threads: Hyperscan
releases the GIL while it scans, each thread has its own scratch space.

Why Hyperscan: measured here against ahocorasick-rs (README, "Numbers"),
it scans 4-20 times faster, the gap widest on data full of matches.
(ahocorasick-rs must list every overlapping match to find needles that
overlap each other, which is what makes it slow on data full of matches.)
Chunks of 4 MiB rather than 1 MiB: every chunk reports each needle it holds
once, through a Python callback (about 1 us each); on data holding 500
distinct needles per MiB, 1 MiB chunks ran at 0.85 GB/s of CPU time, 4 MiB at
1.05, 16 MiB at 1.15 (random data: 1.7 for all three).
Hyperscan's literal matcher (FDR/Teddy) needs no special path for
equal-length needle sets: mixed lengths (8..60) measured the same as all-32.
``python -m bench refscan`` measures the whole scanner on a 512 MiB file
(1,000 needles) against a plain read, ``cat`` and ``grep -F``; its numbers
are in the README.

Caveats:

- The ``hyperscan`` Python binding's pure-literal compiler takes needles as C
  strings (a NUL byte would silently cut a needle short), so a needle set
  containing NUL is compiled as regular expressions made of ``\\xHH``
  escapes instead; both forms match exactly the same byte strings.
- Its streaming API keeps borrowed references to the callback (a use after
  free when the callback is a temporary) and crashes when ``Stream.close`` is
  given a scratch (a mis-ordered ``O!`` argument), so only block-mode scans
  are used, with the chunk overlap done here; the price is one callback per
  needle per chunk instead of per stream.
- Hyperscan needs an x86-64 CPU with SSSE3; elsewhere compiling the needles
  raises RefScanError.
- Any depth, any path length: the walk is iterative and reaches directories
  through :class:`~stages.util.deeptree.DeepTree` anchors, so no path
  handed to the kernel passes PATH_MAX however deep the output.
- The tree is not snapshotted: a file that changes while it is scanned is
  scanned as read. A file that turns into something else between the walk and
  the read (no longer a regular file) is refused.
- A :class:`NeedleScanner` may be shared by threads; a :class:`ScanStream` is
  for one thread at a time.
- Everything here blocks; from async code call it in a worker thread
  (``trio.to_thread.run_sync`` / ``asyncio.to_thread``).

Errors::

    CastoreError (stages.castore.errors)
    └── RefScanError            an output cannot be scanned (path=)
        └── NeedleError         a needle is empty or not str/bytes (index=); also a ValueError
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import hyperscan

from stages.castore.errors import CastoreError
from stages.util.deeptree import DeepTree, Place

__all__ = [
    "CHUNK_SIZE",
    "NeedleError",
    "NeedleScanner",
    "RefScanError",
    "ScanStream",
    "scan_outputs",
]

CHUNK_SIZE = 4 << 20
"""Bytes read and scanned per Hyperscan call (plus the needle overlap)."""

_SEGMENT = 32 << 20  # files larger than this are split into parallel segments
_BATCH_BYTES = 8 << 20  # small files are grouped into tasks of about this size
_BATCH_FILES = 256
_PARALLEL_MIN = 8 << 20  # below this many bytes in total, one thread is faster
# A scanner with this few needles searches its first DIRECT_MAX_BYTES without
# Hyperscan (one memmem per needle: microseconds for a small output, where
# compiling a database takes ~1 ms); past that it compiles one.
DIRECT_MAX_BYTES = 256 << 10
DIRECT_MAX_NEEDLES = 16


class RefScanError(CastoreError):
    """An output cannot be scanned: missing, unreadable or of a refused type.

    ``path`` names the file (or the output) at fault when there is one.
    """

    def __init__(self, message: str, *, path: Path | str | bytes | None = None) -> None:
        self.path = Path(os.fsdecode(path)) if path is not None else None
        super().__init__(f"{os.fsdecode(path)}: {message}" if path is not None else message)


class NeedleError(RefScanError, ValueError):
    """A needle cannot be searched for (empty, or not str or bytes); ``index`` names it."""

    def __init__(self, index: int, message: str) -> None:
        self.index = index
        super().__init__(f"refscan needle {index}: {message}")


def _on_match(needle: int, _start: int, _end: int, _flags: int, found: set[int]) -> None:
    found.add(needle)


def _escaped(needle: bytes) -> bytes:
    return b"".join(b"\\x%02x" % byte for byte in needle)


def _encode(index: int, needle: object) -> bytes:
    if isinstance(needle, str):
        data = needle.encode("utf-8", "surrogateescape")
    elif isinstance(needle, (bytes, bytearray, memoryview)):
        data = bytes(needle)
    else:
        raise NeedleError(index, f"has type {type(needle).__name__}; expected str or bytes")
    if not data:
        raise NeedleError(index, "is empty; every needle must have at least one byte")
    return data


class NeedleScanner:
    """A compiled needle set: finds which needles occur in bytes, streams or paths.

    Needles are ``str`` (encoded as UTF-8) or ``bytes``; the index of a needle
    is its position in the sequence given. Duplicates are allowed (each index
    is reported). An empty needle set is allowed and finds nothing.
    """

    def __init__(self, needles: Sequence[str | bytes]) -> None:
        if isinstance(needles, (str, bytes, bytearray)):
            raise NeedleError(0, "needles must be a sequence of needles, not a single "
                              f"{type(needles).__name__}")
        self._needles = tuple(_encode(i, n) for i, n in enumerate(needles))
        self._max_len = max(map(len, self._needles), default=0)
        self._local = threading.local()
        self._db: hyperscan.Database | None = None
        self._db_lock = threading.Lock()
        # Bytes left to search directly (approximate across threads: harmless).
        self._direct_left = DIRECT_MAX_BYTES if len(self._needles) <= DIRECT_MAX_NEEDLES else 0

    @staticmethod
    def _compile(needles: tuple[bytes, ...]) -> hyperscan.Database:
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        literal = not any(b"\0" in n for n in needles)
        try:
            db.compile(expressions=list(needles) if literal else [_escaped(n) for n in needles],
                       ids=list(range(len(needles))),
                       flags=hyperscan.HS_FLAG_SINGLEMATCH, literal=literal)
        except hyperscan.error as e:
            raise RefScanError(f"hyperscan cannot compile {len(needles)} needles: {e}") from e
        return db

    @property
    def needles(self) -> tuple[bytes, ...]:
        """The needles as bytes, in index order."""
        return self._needles

    @property
    def overlap(self) -> int:
        """Bytes consecutive chunks must share: the longest needle's length minus one."""
        return max(self._max_len - 1, 0)

    def __repr__(self) -> str:
        return f"NeedleScanner({len(self._needles)} needles, longest {self._max_len} bytes)"

    def _database(self) -> hyperscan.Database:
        """The compiled needles, compiled on first need (a millisecond or so)."""
        if self._db is None:
            with self._db_lock:
                if self._db is None:
                    self._db = self._compile(self._needles)
        return self._db

    def _scratch(self) -> hyperscan.Scratch:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = self._database().scratch.clone()
        return scratch

    def _scan_block(self, data: memoryview | bytes, found: set[int]) -> None:
        """Add the needles found inside ``data`` (one Hyperscan call, < 4 GiB).

        A scanner's first few blocks, against a few needles, are searched
        directly (memmem per needle): cheaper than compiling a database,
        which a build with small outputs then never does.
        """
        if not self._needles or not len(data):
            return
        if len(data) <= self._direct_left:
            self._direct_left -= len(data)
            block = bytes(data)
            for i, needle in enumerate(self._needles):
                if i not in found and needle in block:
                    found.add(i)
            return
        # The stub's types are narrower than the extension's: it scans any buffer, and
        # hands the context (our set) to the handler as given.
        self._database().scan(
            data,  # type: ignore[type-var]  # any buffer; the stub says str or bytes
            match_event_handler=_on_match,  # type: ignore[arg-type]  # its context: our set
            context=found, scratch=self._scratch())

    def scan_bytes(self, data: bytes | bytearray | memoryview) -> set[int]:
        """Return the indexes of the needles that occur in ``data``."""
        found: set[int] = set()
        view = memoryview(data).cast("B")
        step, overlap = CHUNK_SIZE, self.overlap
        for start in range(0, max(len(view), 1), step):
            self._scan_block(view[start:start + step + overlap], found)
            if len(found) == len(self._needles):
                break
        return found

    def stream(self) -> ScanStream:
        """Start scanning data that arrives in pieces (see :class:`ScanStream`)."""
        return ScanStream(self)

    def scan_path(self, path: Path | str) -> set[int]:
        """Return the indexes of the needles found in one output on the host.

        A regular file: its contents. A symlink: its target (never followed).
        A directory: recursively, every file's contents and every symlink's
        target; entry names are not scanned. Sockets, FIFOs and devices raise
        RefScanError naming the path, as does a path that cannot be read.
        """
        with DeepTree(os.fsencode(Path(path))) as tree:
            return self._scan_tree(tree)

    def _scan_tree(self, tree: DeepTree) -> set[int]:
        found: set[int] = set()
        files: list[tuple[_File, int]] = []
        for item in _walk(tree):
            if item[0] == "symlink":
                found |= self.scan_bytes(item[2])
            else:
                files.append((item[1], item[2]))
        if not self._needles or len(found) == len(self._needles):
            return found
        tasks = _plan(files)
        total = sum(size for _, size in files)
        workers = min(_cpu_count(), len(tasks))
        if workers <= 1 or total < _PARALLEL_MIN:
            for task in tasks:
                self._scan_task(task, found, None)
            return found
        done = threading.Event()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="refscan") as pool:
            futures = [pool.submit(self._run_task, task, done) for task in tasks]
            try:
                for future in futures:
                    found |= future.result()
                    if len(found) == len(self._needles):
                        done.set()
            except BaseException:
                done.set()
                for future in futures:
                    future.cancel()
                raise
        return found

    def _run_task(self, task: list[tuple[_File, int, int | None]],
                  done: threading.Event) -> set[int]:
        found: set[int] = set()
        self._scan_task(task, found, done)
        return found

    def _scan_task(self, task: list[tuple[_File, int, int | None]], found: set[int],
                   done: threading.Event | None) -> None:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) != CHUNK_SIZE + self.overlap:
            buf = self._local.buf = bytearray(CHUNK_SIZE + self.overlap)
        for path, start, stop in task:
            if done is not None and done.is_set():
                return
            self._scan_range(path, start, stop, buf, found)

    def _scan_range(self, file: _File, start: int, stop: int | None, buf: bytearray,
                    found: set[int]) -> None:
        """Scan the needles starting in ``[start, stop)`` of a file (stop None: to EOF)."""
        overlap = self.overlap
        end = None if stop is None else stop + overlap
        view = memoryview(buf)
        path = file if isinstance(file, bytes) else file.display()
        try:
            fd = _open_file(file)
        except OSError as e:
            raise RefScanError(f"cannot open for scanning: {e.strerror}", path=path) from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RefScanError("is no longer a regular file", path=path)
            os.posix_fadvise(fd, start, 0 if end is None else end - start,
                             os.POSIX_FADV_SEQUENTIAL)
            pos, keep = start, 0
            while end is None or pos < end:
                want = len(buf) - keep if end is None else min(len(buf) - keep, end - pos)
                n = os.preadv(fd, [view[keep:keep + want]], pos)
                if n == 0:
                    break
                pos += n
                filled = keep + n
                self._scan_block(view[:filled], found)
                keep = min(overlap, filled)
                if keep:
                    buf[:keep] = bytes(view[filled - keep:filled])
        except OSError as e:
            raise RefScanError(f"cannot read for scanning: {e.strerror}", path=path) from e
        finally:
            os.close(fd)


class ScanStream:
    """Scans data fed in pieces; a needle spanning pieces is found.

    ``feed(chunk)`` any number of times, then read ``found``. Holds only the
    last ``overlap`` bytes between pieces. Use from one thread at a time.
    """

    def __init__(self, scanner: NeedleScanner) -> None:
        self._scanner = scanner
        self._overlap = scanner.overlap
        self._tail = b""
        self._found: set[int] = set()

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        if not len(view):
            return
        overlap = self._overlap
        if self._tail:
            # Needles that start in the tail and end in this chunk lie within
            # tail + the chunk's first `overlap` bytes.
            self._found |= self._scanner.scan_bytes(self._tail + bytes(view[:overlap]))
        self._found |= self._scanner.scan_bytes(view)
        if not overlap:
            return
        if len(view) >= overlap:
            self._tail = bytes(view[len(view) - overlap:])
        else:
            self._tail = (self._tail + bytes(view))[-overlap:]

    @property
    def found(self) -> set[int]:
        """Indexes of the needles seen so far (a copy)."""
        return set(self._found)


def scan_outputs(scanner: NeedleScanner, paths: Sequence[Path | str]) -> list[list[int]]:
    """Scan each output; return its found needle indexes, ascending, in output order."""
    return [sorted(scanner.scan_path(p)) for p in paths]


# --- walking and planning -------------------------------------------------

_KIND_NAMES = {
    stat.S_IFSOCK: "a socket", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _refuse(path: bytes, mode: int) -> RefScanError:
    kind = _KIND_NAMES.get(stat.S_IFMT(mode), f"of file type {stat.S_IFMT(mode):o}")
    return RefScanError(f"is {kind}; an output may hold only regular files, directories "
                        "and symlinks", path=path)


class _Deep:
    """A file a plain path cannot name: its directory's place in a tree, and its name."""

    __slots__ = ("tree", "place", "name")

    def __init__(self, tree: DeepTree, place: Place, name: bytes) -> None:
        self.tree = tree
        self.place = place
        self.name = name

    def display(self) -> bytes:
        return self.tree.display(self.place, self.name)


# A file to scan: its plain path, or where it is in a deep tree.
_File = bytes | _Deep

# O_NONBLOCK: a file swapped for a FIFO after the walk must not block the
# open; it is refused by the fstat after it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _open_file(file: _File) -> int:
    if isinstance(file, bytes):
        return os.open(file, _FILE_FLAGS)
    with file.tree.opened(file.place, file.name) as (path, dir_fd):
        return os.open(path, _FILE_FLAGS, dir_fd=dir_fd)


def _walk(tree: DeepTree) -> Iterable[tuple[Literal["symlink"], bytes, bytes]
                                      | tuple[Literal["file"], _File, int]]:
    """Yield ("symlink", path, target) and ("file", file, size), never following links."""
    root = tree.root
    try:
        st = os.lstat(root)
    except OSError as e:
        raise RefScanError(f"cannot scan output: {e.strerror}", path=root) from e
    if stat.S_ISLNK(st.st_mode):
        yield "symlink", root, _readlink(root)
        return
    if stat.S_ISREG(st.st_mode):
        yield "file", root, st.st_size
        return
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(root, st.st_mode)
    stack = [tree.top]
    while stack:
        place = stack.pop()
        try:
            fd = tree.open_dir(place)
        except OSError as e:
            raise RefScanError(f"cannot list directory: {e.strerror}",
                               path=tree.display(place)) from e
        try:
            try:
                with os.scandir(fd) as entries:
                    listed = list(entries)
            except OSError as e:
                raise RefScanError(f"cannot list directory: {e.strerror}",
                                   path=tree.display(place)) from e
            plain = tree.is_plain(place)
            for entry in listed:
                name = os.fsencode(entry.name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as e:
                    raise RefScanError(f"cannot stat: {e.strerror}",
                                       path=tree.display(place, name)) from e
                if stat.S_ISLNK(st.st_mode):
                    shown = tree.display(place, name)
                    yield "symlink", shown, _readlink(name, fd, shown)
                elif stat.S_ISREG(st.st_mode):
                    yield "file", tree.path(place, name) if plain else _Deep(tree, place, name), \
                        st.st_size
                elif stat.S_ISDIR(st.st_mode):
                    stack.append(tree.child(place, name))
                else:
                    raise _refuse(tree.display(place, name), st.st_mode)
        finally:
            os.close(fd)


def _readlink(path: bytes, dir_fd: int | None = None, shown: bytes | None = None) -> bytes:
    try:
        return os.readlink(path, dir_fd=dir_fd)
    except OSError as e:
        raise RefScanError(f"cannot read symlink: {e.strerror}", path=shown or path) from e


def _plan(files: list[tuple[_File, int]]) -> list[list[tuple[_File, int, int | None]]]:
    """Group files into tasks: big files cut into segments, small ones batched."""
    tasks: list[list[tuple[_File, int, int | None]]] = []
    batch: list[tuple[_File, int, int | None]] = []
    batch_bytes = 0
    for path, size in files:
        if size > _SEGMENT:
            starts = range(0, size, _SEGMENT)
            for start in starts:
                last = start + _SEGMENT >= size
                tasks.append([(path, start, None if last else start + _SEGMENT)])
            continue
        batch.append((path, 0, None))
        batch_bytes += size
        if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_FILES:
            tasks.append(batch)
            batch, batch_bytes = [], 0
    if batch:
        tasks.append(batch)
    return tasks


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1

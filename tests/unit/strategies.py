"""Hypothesis strategies for castore values, in one place.

Everything generated here is valid by the protocol's rules (PROTOCOL.md):
names are 1..255 bytes without '/' or NUL and not '.' or '..', symlink targets
1..4095 bytes without NUL, sizes fit a uint64, a Directory's names are unique
across its three lists. Tests that want invalid values derive them from these.
"""

from __future__ import annotations

from hypothesis import strategies as st

from stages.castore.nodes import Directory, DirectoryNode, FileNode, SymlinkNode

__all__ = [
    "digests",
    "directories",
    "directory_nodes",
    "file_nodes",
    "names",
    "nodes",
    "root_names",
    "sizes",
    "symlink_nodes",
    "targets",
]

def _clean(raw: bytes) -> bytes:
    return raw.replace(b"/", b"_").replace(b"\0", b"\x01")


def _stretch(seed_and_len: tuple[bytes, int]) -> bytes:
    seed, length = seed_and_len
    return (seed * (length // len(seed) + 1))[:length]


# Long values are stretched from a short seed: drawing 255 random bytes per
# name makes generation slow without finding more bugs.
_short_names = st.binary(min_size=1, max_size=16).map(_clean)
_long_names = st.tuples(_short_names, st.integers(min_value=250, max_value=255)).map(_stretch)

names = st.one_of(_short_names, _short_names, _short_names, _long_names).filter(
    lambda n: n not in (b".", b".."))
"""Valid entry names, including long and non-UTF-8 ones."""

root_names = st.just(b"") | names
"""A name for a node that stands alone: empty, or any entry name."""

digests = st.binary(min_size=32, max_size=32)
sizes = st.integers(min_value=0, max_value=(1 << 64) - 1)
_short_targets = st.binary(min_size=1, max_size=48).map(lambda t: t.replace(b"\0", b"/"))
targets = st.one_of(
    _short_targets, _short_targets, _short_targets,
    st.tuples(_short_targets, st.integers(min_value=4000, max_value=4095)).map(_stretch))
"""Valid symlink targets (1..4095 bytes, no NUL), '/' included."""


def file_nodes(name: st.SearchStrategy[bytes] = names) -> st.SearchStrategy[FileNode]:
    return st.builds(FileNode, name=name, digest=digests, size=sizes,
                     executable=st.booleans())


def directory_nodes(name: st.SearchStrategy[bytes] = names) -> st.SearchStrategy[DirectoryNode]:
    return st.builds(DirectoryNode, name=name, digest=digests, size=sizes)


def symlink_nodes(name: st.SearchStrategy[bytes] = names) -> st.SearchStrategy[SymlinkNode]:
    return st.builds(SymlinkNode, name=name, target=targets)


def nodes(name: st.SearchStrategy[bytes] = names) -> st.SearchStrategy:
    """Any one node kind."""
    return file_nodes(name) | directory_nodes(name) | symlink_nodes(name)


@st.composite
def directories(draw: st.DrawFn, max_entries: int = 8) -> Directory:
    """A valid Directory: unique names spread over the three lists."""
    entry_names = draw(st.lists(names, max_size=max_entries, unique=True))
    entries = [draw(nodes(st.just(n))) for n in entry_names]
    return Directory.from_nodes(entries)

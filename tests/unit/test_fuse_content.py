"""Content-directory names: one spelling per content, and nothing else parses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stages.castore.fuse.content import content_name, parse_content_name
from stages.castore.nodes import DirectoryNode, FileNode, SymlinkNode

digests = st.binary(min_size=32, max_size=32)
sizes = st.integers(0, 2**64 - 1)


@given(digest=digests, size=sizes, executable=st.booleans())
def test_file_names_round_trip(digest: bytes, size: int, executable: bool) -> None:
    node = FileNode(name=b"whatever", digest=digest, size=size, executable=executable)
    name = content_name(node)
    assert name.startswith("x-" if executable else "f-")
    assert parse_content_name(name.encode()) == (name[0], digest, size)


@given(digest=digests, size=sizes)
def test_directory_names_round_trip_whatever_the_size(digest: bytes, size: int) -> None:
    name = content_name(DirectoryNode(name=b"d", digest=digest, size=size))
    assert name == "d-" + digest.hex()
    assert parse_content_name(name.encode()) == ("d", digest, 0)


def test_other_spellings_are_not_names() -> None:
    h = "ab" * 32
    for bad in [f"d-{h.upper()}", f"d-{h}0", f"d-{h[:-1]}", f"f-{h}", f"f-{h}-", f"f-{h}-01",
                f"f-{h}-+1", f"f-{h}- 1", f"x-{h}-{2**64}", f"d-{h}-1", f"D-{h}", "", "d-",
                f"f-{h}-1\n", f"./d-{h}"]:
        assert parse_content_name(bad.encode()) is None, bad
    assert parse_content_name(f"f-{h}-{2**64 - 1}".encode()) == ("f", bytes.fromhex(h), 2**64 - 1)


def test_a_symlink_has_no_content_name() -> None:
    with pytest.raises(ValueError, match="SymlinkNode has no content"):
        content_name(SymlinkNode(name=b"l", target=b"t"))

"""Subordinate id ranges: parsing, choosing, the fallback."""

from __future__ import annotations

import pytest

from stages.errors import IdMapError
from stages.oci.idmap import FALLBACK_START, IdMap, choose_range, load_idmap, parse_subid


def test_parse_and_choose() -> None:
    text = "# comment\n\nalice:100000:65536\nroot:165536:1000\n0:300000:70000\nroot:400000:65536\n"
    entries = parse_subid(text)
    assert entries[0] == ("alice", 100000, 65536)
    # root's first range is too small; the numeric-uid entry comes next
    assert choose_range(entries, user="root", uid=0) == 300000
    assert choose_range(entries, user="bob", uid=1001) is None


def test_range_including_host_root_is_ignored() -> None:
    assert choose_range(parse_subid("root:0:70000\n"), user="root", uid=0) is None


@pytest.mark.parametrize("line", ["root:1", "root:x:65536", ":1:2", "root:5:0", "root:-1:5"],
                         ids=["fields", "not-int", "no-owner", "zero-count", "negative"])
def test_malformed_lines_are_errors_naming_the_line(tmp_path, line) -> None:
    f = tmp_path / "subuid"
    f.write_text("root:100000:65536\n" + line + "\n")
    with pytest.raises(IdMapError) as info:
        load_idmap(f, f, uid=0)
    assert info.value.line == 2
    assert f"{f}:2" in str(info.value)


@pytest.mark.parametrize("content", [None, "", "someoneelse:100000:65536\n"],
                         ids=["missing", "empty", "other-user"])
def test_fallback(tmp_path, content) -> None:
    f = tmp_path / "subuid"
    if content is not None:
        f.write_text(content)
    m = load_idmap(f, f, uid=0)
    assert m.host_uid(0) == FALLBACK_START
    assert m.host_uid(1000) == FALLBACK_START + 1000
    assert m.host_gid(100) == FALLBACK_START + 100


def test_uid_and_gid_files_are_separate(tmp_path) -> None:
    (tmp_path / "u").write_text("root:200000:65536\n")
    (tmp_path / "g").write_text("root:300000:65536\n")
    m = load_idmap(tmp_path / "u", tmp_path / "g", uid=0)
    assert (m.host_uid(1000), m.host_gid(100)) == (201000, 300100)
    assert m.host_uid(0) != 0 and m.host_gid(0) != 0


def test_unmapped_and_bad_ranges() -> None:
    m = IdMap.single(200000, 200000)
    with pytest.raises(IdMapError):
        m.host_uid(65536)
    with pytest.raises(IdMapError):
        IdMap.single(0, 200000)

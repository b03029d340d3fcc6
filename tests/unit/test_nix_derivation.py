"""Derivation files: parsing, serializing, store paths.

- Hypothesis round trips of generated derivations (any text, including the
  escaped characters and undecodable bytes).
- (The files Nix itself writes are checked in
  tests/integration/test_nix_derivation_files.py.)
- Hand-written files with known fields; malformed files naming line:column.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.castore.nixbase32 import ALPHABET
from stages.nix import (
    Derivation,
    DerivationOutput,
    DerivationParseError,
    NixError,
    StorePathError,
    basename,
    check_store_path,
    hash_part,
    parse_derivation,
    read_derivation,
    serialize_derivation,
)
from stages.nix.derivation import derivation_bytes

H1 = "0" * 31 + "1"
H2 = "a" * 32
H3 = "z" * 32

# --- strategies --------------------------------------------------------------

hash_parts = st.text(alphabet=ALPHABET, min_size=32, max_size=32)
_NAME_CHARS = "abcXYZ0189+-._?="
store_names = st.text(alphabet=_NAME_CHARS, min_size=1, max_size=20).filter(
    lambda n: not n.startswith("."))
store_paths = st.builds(lambda h, n: f"/nix/store/{h}-{n}", hash_parts, store_names)
drv_paths = st.builds(lambda h, n: f"/nix/store/{h}-{n}.drv", hash_parts, store_names)
# Any text: printable, the five escaped characters, undecodable bytes.
texts = st.one_of(
    st.text(max_size=30),
    st.text(alphabet='"\\\n\r\t ab(),[]', max_size=30),
    st.binary(max_size=30).map(lambda b: b.decode("utf-8", "surrogateescape")),
)
hash_algos = st.sampled_from(["sha256", "r:sha256", "sha1", "r:sha512", "md5"])
outputs = st.one_of(
    st.builds(DerivationOutput, path=store_paths),
    st.builds(DerivationOutput, path=store_paths, hash_algo=hash_algos,
              hash=st.text(alphabet="0123456789abcdef", min_size=1, max_size=64)),
    st.builds(DerivationOutput, path=st.just(""), hash_algo=hash_algos),
)
derivations = st.builds(
    Derivation,
    outputs=st.dictionaries(st.text(alphabet="abcdefgh", min_size=1, max_size=5), outputs,
                            min_size=1, max_size=4),
    input_drvs=st.dictionaries(drv_paths, st.lists(texts.filter(bool), min_size=1, max_size=3,
                                                   unique=True), max_size=3),
    input_srcs=st.lists(store_paths, unique=True, max_size=4).map(tuple),
    system=texts, builder=texts,
    args=st.lists(texts, max_size=5).map(tuple),
    env=st.dictionaries(texts, texts, max_size=6),
)


@given(derivations)
@settings(max_examples=300)
def test_generated_derivations_round_trip(drv: Derivation) -> None:
    text = serialize_derivation(drv)
    assert parse_derivation(text) == drv
    assert parse_derivation(derivation_bytes(drv)) == drv
    assert serialize_derivation(parse_derivation(text)) == text


@given(derivations)
def test_serialized_form_is_one_line_of_aterm(drv: Derivation) -> None:
    text = serialize_derivation(drv)
    assert text.startswith("Derive([(") and text.endswith("])")
    assert "\n" not in text and "\t" not in text and "\r" not in text


# --- hand-written files ---------------------------------------------------------

KNOWN = (
    'Derive([("dev","/nix/store/' + H2 + '-x-dev","",""),("out","/nix/store/' + H1
    + '-x","","")],[("/nix/store/' + H3 + '-dep.drv",["lib","out"])],["/nix/store/' + H2
    + '-src"],"x86_64-linux","/bin/b",["-c","a\\"b\\\\c\\nd\\te\\rf ü"],'
    '[("empty",""),("out","/nix/store/' + H1 + '-x")])'
)


def test_known_file_fields() -> None:
    drv = parse_derivation(KNOWN)
    assert drv.outputs == {"dev": DerivationOutput(path=f"/nix/store/{H2}-x-dev"),
                           "out": DerivationOutput(path=f"/nix/store/{H1}-x")}
    assert drv.input_drvs == {f"/nix/store/{H3}-dep.drv": ("lib", "out")}
    assert drv.input_srcs == (f"/nix/store/{H2}-src",)
    assert drv.system == "x86_64-linux" and drv.builder == "/bin/b"
    assert drv.args == ("-c", 'a"b\\c\nd\te\rf ü')
    assert drv.env == {"empty": "", "out": f"/nix/store/{H1}-x"}
    assert not drv.is_fixed_output
    assert serialize_derivation(drv) == KNOWN


def test_fixed_output_derivation() -> None:
    text = ('Derive([("out","/nix/store/' + H1 + '-f","r:sha256","' + "ab" * 32
            + '")],[],[],"s","b",[],[])')
    drv = parse_derivation(text)
    out = drv.outputs["out"]
    assert drv.is_fixed_output and out.is_fixed and out.is_recursive and out.algo == "sha256"
    two = parse_derivation(text.replace('[("out"', '[("a","/nix/store/' + H2 + '-a","",""),("out"'))
    assert not two.is_fixed_output


def test_unsorted_sets_are_sorted_as_nix_does() -> None:
    text = ('Derive([("out","","sha256","")],[],["/nix/store/' + H3 + '-b","/nix/store/' + H1
            + '-a"],"s","b",[],[("z","1"),("a","2")])')
    drv = parse_derivation(text)
    assert drv.input_srcs == (f"/nix/store/{H1}-a", f"/nix/store/{H3}-b")
    assert list(drv.env) == ["a", "z"]


def test_other_escapes_stand_for_the_character() -> None:
    drv = parse_derivation('Derive([("out","","sha256","")],[],[],"s","\\a\\$","",[])'
                           .replace(',"",[])', ',[],[])'))
    assert drv.builder == "a$"


def test_values_are_frozen_and_sorted_on_construction() -> None:
    drv = Derivation(outputs={"z": DerivationOutput(path=""), "a": DerivationOutput(path="")},
                     input_drvs={f"/nix/store/{H1}-x.drv": ["b", "a"]}, system="s",
                     builder="b", env={"b": "1", "a": "2"})
    assert list(drv.outputs) == ["a", "z"] and list(drv.env) == ["a", "b"]
    assert drv.input_drvs[f"/nix/store/{H1}-x.drv"] == ("a", "b")
    with pytest.raises(AttributeError):
        drv.system = "x"  # type: ignore[misc]  # frozen: the assignment must fail


OK_OUT = '("out","","sha256","")'
BEGIN = f'Derive([{OK_OUT}],[],[],"s","b",'


def at(text: str, anchor: str, *, last: bool = False) -> tuple[str, int, int]:
    """The text, and line 1, column of ``anchor`` (its first or last occurrence)."""
    return text, 1, (text.rindex(anchor) if last else text.index(anchor)) + 1


MALFORMED = [
    # (text, line, column, words the message must contain)
    ("", 1, 1, ["expected 'Derive('", "end of the input"]),
    ("Derivation(", 1, 1, ["expected 'Derive('"]),
    ("DrvWithVersion(\"x\",", 1, 1, ["DrvWithVersion", "not supported"]),
    (*at("Derive([]", "["), ["at least one output"]),
    (*at("Derive([(out", "out"), ["expected a string (output name)"]),
    (*at('Derive([("out","/tmp/x","","")]', '"/tmp'),
     ["output 'out'", "does not start with /nix/store/"]),
    (*at('Derive([("out","","sha3","")]', '"sha3'), ["unknown hash algorithm 'sha3'"]),
    (*at('Derive([("out","","","abc")]', '"abc'), ["has a hash but no hash algorithm"]),
    (*at('Derive([("","","","")]', '"'), ["empty output name"]),
    (*at(f'Derive([{OK_OUT},{OK_OUT}]', "(", last=True), ["duplicate output 'out'"]),
    (*at(f'Derive([{OK_OUT}];', ";"), ["expected ','"]),
    (*at(f'Derive([{OK_OUT}],[("/nix/store/{H1}-x",[])]', '"/nix'), ["does not end in .drv"]),
    (*at(f'Derive([{OK_OUT}],[],["/nix/store/{H1}-x/y"]', '"/nix'),
     ["input source", "names a file inside a store path"]),
    (*at(f'Derive([{OK_OUT}],[],["/nix/store/{"e" * 32}-x"]', '"/nix'), ["hash part", "nixbase32"]),
    (*at(BEGIN + '[],[("a","1"),("a","2")])', '("a"', last=True),
     ["duplicate environment variable 'a'"]),
    (*at(BEGIN + '[],[])\n', "\n"), ["unexpected text after"]),
    (BEGIN + '["x\ny", 7],[])', 2, 4, ["expected a string (argument)", "' 7]"]),
    (*at(BEGIN + '[],[("a","unterminated', '"unterminated'),
     ["unterminated string (variable value)"]),
    (*at(BEGIN + '[],[("a","tail\\', '"tail'), ["unterminated string"]),
    (BEGIN + '[],[("a","1")]', 1, len(BEGIN + '[],[("a","1")]') + 1,
     ["expected ')'", "end of the derivation", "end of the input"]),
]


@pytest.mark.parametrize("text,line,column,words", MALFORMED,
                         ids=[f"case{i}" for i in range(len(MALFORMED))])
def test_malformed_files_name_line_and_column(text: str, line: int, column: int,
                                              words: list[str]) -> None:
    with pytest.raises(DerivationParseError) as info:
        parse_derivation(text, source="bad.drv")
    err = info.value
    assert (err.source, err.line, err.column) == ("bad.drv", line, column), str(err)
    assert str(err).startswith(f"bad.drv:{line}:{column}: ")
    for word in words:
        assert word in str(err)
    assert isinstance(err, NixError) and isinstance(err, ValueError)


def test_read_derivation_names_a_missing_file(tmp_path) -> None:
    with pytest.raises(NixError, match="cannot read the derivation .*nope.drv"):
        read_derivation(tmp_path / "nope.drv")
    (tmp_path / "bad.drv").write_bytes(b"Derive(")
    with pytest.raises(DerivationParseError, match=r"bad\.drv:1:8:"):
        read_derivation(tmp_path / "bad.drv")


def test_parse_refuses_other_types() -> None:
    with pytest.raises(TypeError, match="bytes or str"):
        parse_derivation(42)  # type: ignore[arg-type]  # the wrong type is the test


# --- store paths ---------------------------------------------------------------

def test_store_path_parts() -> None:
    p = f"/nix/store/{H2}-hello-2.12.1"
    assert check_store_path(p) == p
    assert basename(p) == f"{H2}-hello-2.12.1"
    assert hash_part(p) == H2


@pytest.mark.parametrize("path,reason", [
    ("/nix/store", "does not start with /nix/store/"),
    ("/gnu/store/" + H1 + "-x", "does not start with /nix/store/"),
    (f"/nix/store/{H1}-x/bin", "names a file inside"),
    (f"/nix/store/{H1[:-1]}-x", "is not 32 nixbase32"),
    (f"/nix/store/{'E' * 32}-x", "is not 32 nixbase32"),
    (f"/nix/store/{'u' * 32}-x", "is not 32 nixbase32"),
    (f"/nix/store/{H1}_x", "not followed by '-'"),
    (f"/nix/store/{H1}-", "name is empty"),
    (f"/nix/store/{H1}-.hidden", "starts with a period"),
    (f"/nix/store/{H1}-a b", "illegal character ' '"),
    (f"/nix/store/{H1}-" + "x" * 212, "longer than 211"),
], ids=["no-slash", "other-store", "inside", "short-hash", "upper", "bad-char", "no-dash",
        "empty-name", "dot", "space", "long"])
def test_bad_store_paths_say_why(path: str, reason: str) -> None:
    with pytest.raises(StorePathError) as info:
        check_store_path(path)
    assert reason in str(info.value) and info.value.path == path
    with pytest.raises(StorePathError):
        hash_part(path)


def test_longest_name_is_accepted() -> None:
    p = f"/nix/store/{H1}-" + "x" * 211
    assert basename(p).endswith("x" * 211)


def _reference_unescape(raw: str) -> str:
    """Nix's parseString, character by character."""
    out, i = [], 0
    while i < len(raw):
        c = raw[i]
        if c == "\\":
            c = {"n": "\n", "r": "\r", "t": "\t"}.get(raw[i + 1], raw[i + 1])
            i += 1
        out.append(c)
        i += 1
    return "".join(out)


@given(st.lists(st.one_of(st.text(alphabet="ab\0\n\t$", max_size=3),
                          st.sampled_from(["\\n", "\\r", "\\t", '\\"', "\\\\", "\\a", "\\\0",
                                           "\\\\n", "\\$", "\\\n"])), max_size=12).map("".join))
def test_string_escapes_read_as_nix_reads_them(raw: str) -> None:
    text = f'Derive([("out","","sha256","")],[],[],"s","{raw}",[],[])'
    assert parse_derivation(text).builder == _reference_unescape(raw)

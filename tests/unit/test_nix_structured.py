"""nlohmann's dump() and Nix 2.8's .attrs.sh, on values whose output Nix 2.8 itself wrote.

Every expected string here was printed by a real Nix 2.8 build (a structured
derivation copying its .attrs.json and .attrs.sh); the corpus case
tests/nix_corpus/structured.nix compares whole files with nix-build on
every run.
"""

from __future__ import annotations

import pytest

from stages.nix.structured import attrs_shell, dump_json, hash_placeholder, parse_json


@pytest.mark.parametrize("value,printed", [
    (1e15, "1e+15"), (16777200.0, "16777200.0"), (1e10, "10000000000.0"),
    (123457000.0, "123457000.0"), (1e-07, "1e-07"), (0.1, "0.1"), (1e16, "1e+16"),
    (1e300, "1e+300"), (0.5, "0.5"), (100, "100"), (3000000000, "3000000000"),
])
def test_numbers_print_as_nlohmann_prints_them(value: object, printed: str) -> None:
    assert dump_json(value) == printed


def test_strings_and_order() -> None:
    text = dump_json(parse_json('{"s": "a\\u0001b\\u001fc\\u007fd\\b\\f/\\\\", "a": [true, null]}'))
    assert text == '{"a":[true,null],"s":"a\\u0001b\\u001fc\x7fd\\b\\f/\\\\"}'


def test_shell_keeps_nix_quirks() -> None:
    attrs = parse_json('{"big": 3000000000, "f1": 1e15, "f2": 16777200.0, "fl": 1.5, '
                       '"list": [1, "a", true, null], "nested": [[1]], "bad-name": 1, '
                       '"obj": {"b c": "x", "a": 1}, "objn": {"a": {"b": 1}}, "f": false, '
                       '"str": "it\'s"}')
    assert attrs_shell(attrs) == (
        "declare big=-1294967296\n"
        "declare f=\n"
        "declare f1=-2147483648\n"
        "declare f2=16777200\n"
        "declare -a list=(1 'a' 1 '' )\n"
        "declare -A obj=(['a']=1 ['b c']='x' )\n"
        "declare str='it'\\''s'\n")


def test_placeholder_is_nix_s() -> None:
    # builtins.placeholder "out", as nix-instantiate wrote it into a .drv.
    assert hash_placeholder("out") == "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"


def test_deep_nesting_does_not_recurse() -> None:
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert dump_json(deep) == "[" * 100_001 + "]" * 100_001


@pytest.mark.parametrize("text,words", [("1e400", "overflow"), ("-1e400", "overflow"),
                                        ("9" * 5000, "overflow")])
def test_numbers_nlohmann_refuses_are_refused(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_json('{"a": ' + text + '}')


def test_integers_beyond_64_bits_become_doubles_as_in_nlohmann() -> None:
    attrs = parse_json('{"a": 18446744073709551616, "b": 18446744073709551615}')
    assert dump_json(attrs) == '{"a":1.8446744073709552e+19,"b":18446744073709551615}'
    assert attrs_shell({"a": attrs["a"]}) == "declare a=-2147483648\n"

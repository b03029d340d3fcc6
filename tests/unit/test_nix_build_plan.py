"""Pure pieces of the Nix build orchestration: results, keys, output cycles, Nix DB hashes."""

from __future__ import annotations

import hashlib

import pytest

from stages.castore import nixbase32
from stages.castore.nodes import SymlinkNode
from stages.context import BuildSpec
from stages.nix.build import (
    DrvResult,
    NixStoreError,
    OutputResult,
    _check_output_cycles,
    _key,
    _parse_nix_db_hash,
)
from stages.nix.derivation import Derivation, DerivationOutput
from stages.nix.errors import NixError
from stages.nix.pathinfo import PathInfo

H = "0" * 31


def path(c: str, name: str) -> str:
    return f"/nix/store/{H}{c}-{name}"


def infos(refs: dict[str, list[str]]) -> tuple[list[str], list[PathInfo]]:
    names = sorted(refs)
    return names, [PathInfo(path=path(str(i), n), node=SymlinkNode(name=b"x", target=b"t"),
                            references=[path(str(names.index(r)), r) for r in refs[n]],
                            nar_sha256=b"\0" * 32, nar_size=8)
                   for i, n in enumerate(names)]


@pytest.mark.parametrize(("refs", "cycle"), [
    ({"out": ["out"], "dev": ["out", "dev"]}, None),            # self and one-way: fine
    ({"out": ["dev"], "dev": ["out"]}, "dev -> out -> dev"),
    ({"a": ["b"], "b": ["c"], "c": ["a"]}, "a -> b -> c -> a"),
], ids=["one-way", "two", "three"])
def test_output_cycles(refs: dict, cycle: str | None) -> None:
    names, pis = infos(refs)
    if cycle is None:
        _check_output_cycles("/nix/store/x.drv", names, pis)
    else:
        with pytest.raises(NixError, match=f"cycle \\({cycle}\\)"):
            _check_output_cycles("/nix/store/x.drv", names, pis)


def test_result_json_has_exactly_the_documented_fields() -> None:
    out = OutputResult(path=path("1", "x"), nar_hash="sha256:abc", references=(path("1", "x"),))
    built = DrvResult(drv_path="d", status="built", outputs={"out": out}).to_json()
    assert built == {"status": "built", "outputs": {"out": {
        "path": path("1", "x"), "nar_hash": "sha256:abc", "references": [path("1", "x")]}}}
    assert DrvResult(drv_path="d", status="failed", error="boom").to_json() == \
        {"status": "failed", "error": "boom"}


def test_keys_are_valid_build_keys() -> None:
    drv = Derivation(outputs={"out": DerivationOutput(path=path("1", "x"))}, input_drvs={},
                     input_srcs=(), system="x86_64-linux", builder="/b", args=(),
                     env={"name": "weird name!with/slashes" + "y" * 80})
    key = _key(path("2", "weird.drv"), drv, "abc123")
    BuildSpec(key=key, request_from="r")  # validates the key
    assert key.endswith("-abc123")


def test_nix_db_hash_forms() -> None:
    digest = hashlib.sha256(b"nar").digest()
    assert _parse_nix_db_hash("p", "sha256:" + digest.hex()) == digest
    assert _parse_nix_db_hash("p", "sha256:" + nixbase32.encode(digest)) == digest
    with pytest.raises(NixStoreError, match="not sha256"):
        _parse_nix_db_hash("p", "md5:00")

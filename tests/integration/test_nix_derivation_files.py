"""Derivation files as Nix writes them: parsing and serializing against Nix.

The test makes its own .drv files: every case of the Nix corpus (plus one
derivation whose attributes hold each character the ATerm format escapes,
and text that is not ASCII) is instantiated with ``nix-instantiate`` under a
fresh nonce, so nothing depends on what earlier runs left in /nix/store.
Then, for each of them (and every other .drv the store holds, which must
round-trip too):

- parse then serialize gives the file's bytes back;
- what we parse equals what ``nix show-derivation`` reads from the same file.

The .drv files the test made are deleted from the store afterwards.
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from stages.nix import read_derivation
from stages.nix.derivation import derivation_bytes

pytestmark = pytest.mark.nix

CORPUS = Path(__file__).resolve().parent.parent / "nix_corpus"
CASES = ("outputs", "chain", "sources", "passasfile", "symlinks", "big", "fixed", "failing")
# A fixed-output hash that is never built here: instantiating needs only its form.
SOME_SHA256 = "sha256:" + "0" * 52

ESCAPES_NIX = r'''
{ nonce }:
let lib = import ./lib.nix { inherit nonce; }; in
{
  escapes = lib.mk {
    name = "escapes";
    script = "echo > $out";
    quotes = "say \"hi\" and \\back\\slash";
    controls = "tab\there\nnew line\r\n";
    unicode = "grüße, ☃, 𝄞";
    empty = "";
    parens = "Derive([(\"x\",\"\")])";
  };
}
'''


def _nix(*cmd: str, cwd: Path) -> str:
    return subprocess.run(list(cmd), cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture(scope="module")
def our_drvs():
    """Every .drv that the corpus (and escapes.nix) instantiate to, freshly made."""
    base = Path(tempfile.mkdtemp(prefix="ocibuild-drvs-"))
    made: list[str] = []
    try:
        work = base / "corpus"
        shutil.copytree(CORPUS, work, symlinks=True)
        (work / "bbdir").mkdir()
        shutil.copy2("/bin/busybox", work / "bbdir" / "busybox")
        (work / "escapes.nix").write_text(ESCAPES_NIX)
        nonce = uuid.uuid4().hex[:10]
        for case in (*CASES, "escapes"):
            args = ["--argstr", "nonce", nonce]
            if case == "fixed":
                args += ["--argstr", "rhash", SOME_SHA256]
            out = _nix("nix-instantiate", *args, f"{case}.nix", cwd=work)
            made += [line for line in out.split() if line.endswith(".drv")]
        # The .drv files they depend on (lib.tools and the like) are ours too.
        closure = _nix("nix-store", "--query", "--requisites", *made, cwd=work).split()
        made = sorted({p for p in closure if p.endswith(".drv")})
        yield made
    finally:
        if made:
            subprocess.run(["nix-store", "--delete", *made], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _all_drvs(ours: list[str]) -> list[str]:
    return sorted(set(ours) | set(glob.glob("/nix/store/*.drv")))


def test_the_corpus_instantiated_to_many_derivations(our_drvs: list[str]) -> None:
    # Guards the tests below against passing over an empty list.
    assert len(our_drvs) >= 20, our_drvs
    assert sum("-escapes-" in p for p in our_drvs) == 1, our_drvs


def test_every_drv_round_trips_byte_for_byte(our_drvs: list[str]) -> None:
    for path in _all_drvs(our_drvs):
        with open(path, "rb") as f:
            data = f.read()
        assert derivation_bytes(read_derivation(path)) == data, path


def test_parse_agrees_with_nix_show_derivation(our_drvs: list[str]) -> None:
    drvs = _all_drvs(our_drvs)[:400]
    shown = json.loads(subprocess.run(["nix", "show-derivation", *drvs], check=True,
                                      capture_output=True, text=True).stdout)
    assert sorted(shown) == drvs
    for path, nix in shown.items():
        drv = read_derivation(path)
        assert {n: {k: v for k, v in (("path", o.path), ("hashAlgo", o.hash_algo),
                                       ("hash", o.hash)) if v or k == "path"}
                for n, o in drv.outputs.items()} == nix["outputs"], path
        assert {p: list(ns) for p, ns in drv.input_drvs.items()} == nix["inputDrvs"], path
        assert list(drv.input_srcs) == nix["inputSrcs"], path
        assert drv.system == nix["system"], path
        assert drv.builder == nix["builder"] and list(drv.args) == nix["args"], path
        assert dict(drv.env) == nix["env"], path


def test_the_escaped_characters_reach_the_file_and_come_back(our_drvs: list[str]) -> None:
    (path,) = [p for p in our_drvs if "-escapes-" in p]
    env = read_derivation(path).env
    assert env["quotes"] == 'say "hi" and \\back\\slash'
    assert env["controls"] == "tab\there\nnew line\r\n"
    assert env["unicode"] == "grüße, ☃, 𝄞"
    assert env["empty"] == ""

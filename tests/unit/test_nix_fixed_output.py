"""Fixed-output checks over memory:// stores.

The expected hashes are Nix's: ``nix-hash --type sha256 [--flat]`` over the
same content, printed by Nix 2.8 (hex, and base-32 with --to-base32) when
tests/integration/test_nix_env.py was written; that test also runs the
check on outputs built next to a real nix-build. Other algorithms are
checked against hashlib over the file (flat) or our NAR (recursive; the NAR
itself is compared with ``nix-store --dump`` in test_nar_vs_nix.py).
"""

from __future__ import annotations

import hashlib

import pytest

from stages.castore.addresses import Castore
from stages.castore.memory import MemoryBlobService, MemoryDirectoryService
from stages.castore.nar import nar_bytes
from stages.castore.nodes import Directory, FileNode, Node, SymlinkNode, blob_digest
from stages.nix import (
    Derivation,
    DerivationOutput,
    FixedOutputMismatch,
    NixError,
    check_fixed_output,
)
from stages.nix.errors import FixedOutputError

CONTENT = b"fixed content\n"
# nix-hash --type sha256 --flat over a file holding CONTENT (hex; base-32)
FLAT_HEX = "adcf791ae2803c0c10f0dab9c430c39ac580bf95d6a834a248f4dedd72c69665"
FLAT_B32 = "0rcnqrrdvppl92i39a6njnzq1icsqcqc9ffsy080qg40w8d7kkxd"
# nix-hash --type sha256 over a directory {f: CONTENT, l -> f}
TREE_HEX = "5aab5aa0cf14bfdfd7099e516ecdd81028f7f6a558123902c63340d6263b699b"
TREE_B32 = "16v97ckdch1kqq13j4jqlpvgfa0hv36nwlcy17bxzgqlryh5mass"
OUT = "/nix/store/" + "1" * 32 + "-fod"


def fod(algo: str, hash_: str) -> Derivation:
    return Derivation(outputs={"out": DerivationOutput(path=OUT, hash_algo=algo, hash=hash_)},
                      system="x86_64-linux", builder="/b", env={})


@pytest.fixture
async def store() -> Castore:
    return Castore(MemoryBlobService(), MemoryDirectoryService())


async def file_node(castore: Castore, data: bytes, executable: bool = False) -> FileNode:
    digest = await castore.blobs.put(data) if data else blob_digest(b"")
    return FileNode(name=b"", digest=digest, size=len(data), executable=executable)


async def tree_node(castore: Castore) -> Node:
    f = await file_node(castore, CONTENT)
    d = Directory.from_nodes([f.renamed(b"f"), SymlinkNode(name=b"l", target=b"f")])
    await castore.directories.put_tree([d])
    return d.as_node(b"")


async def test_flat_sha256_matches_nix(store: Castore) -> None:
    node = await file_node(store, CONTENT)
    await check_fixed_output(store, fod("sha256", FLAT_HEX), node)
    # the executable bit does not enter a flat hash
    await check_fixed_output(store, fod("sha256", FLAT_HEX), await file_node(store, CONTENT, True))


async def test_recursive_sha256_matches_nix(store: Castore) -> None:
    await check_fixed_output(store, fod("r:sha256", TREE_HEX), await tree_node(store))


async def test_flat_mismatch_names_both_hashes(store: Castore) -> None:
    wrong = "0" * 64
    with pytest.raises(FixedOutputMismatch) as info:
        await check_fixed_output(store, fod("sha256", wrong), await file_node(store, CONTENT))
    err = info.value
    assert err.expected == "sha256:" + "0" * 52 and err.got == "sha256:" + FLAT_B32
    assert err.output == OUT
    assert err.expected in str(err) and err.got in str(err) and OUT in str(err)


async def test_recursive_mismatch(store: Castore) -> None:
    with pytest.raises(FixedOutputMismatch) as info:
        await check_fixed_output(store, fod("r:sha256", FLAT_HEX), await tree_node(store))
    assert info.value.got == "sha256:" + TREE_B32
    assert info.value.expected == "sha256:" + FLAT_B32


async def test_flat_and_recursive_differ_for_a_file(store: Castore) -> None:
    # A file's NAR hash is not its flat hash: the mode matters.
    with pytest.raises(FixedOutputMismatch):
        await check_fixed_output(store, fod("r:sha256", FLAT_HEX), await file_node(store, CONTENT))


@pytest.mark.parametrize("algo", ["md5", "sha1", "sha512"])
async def test_other_algorithms(store: Castore, algo: str) -> None:
    node = await file_node(store, CONTENT)
    await check_fixed_output(store, fod(algo, hashlib.new(algo, CONTENT).hexdigest()), node)
    tree = await tree_node(store)
    nar = await nar_bytes(store, tree)
    await check_fixed_output(store, fod("r:" + algo, hashlib.new(algo, nar).hexdigest()), tree)
    with pytest.raises(FixedOutputMismatch) as info:
        await check_fixed_output(store, fod(algo, hashlib.new(algo, b"x").hexdigest()), node)
    assert info.value.got.startswith(algo + ":")


async def test_empty_file(store: Castore) -> None:
    node = await file_node(store, b"")
    await check_fixed_output(store, fod("sha256", hashlib.sha256(b"").hexdigest()), node)


async def test_flat_output_must_be_a_regular_file(store: Castore) -> None:
    with pytest.raises(FixedOutputError, match="must be a regular file.*is a directory"):
        await check_fixed_output(store, fod("sha256", FLAT_HEX), await tree_node(store))
    with pytest.raises(FixedOutputError, match="is a symlink"):
        await check_fixed_output(store, fod("sha256", FLAT_HEX),
                                 SymlinkNode(name=b"", target=b"x"))


async def test_bad_declarations(store: Castore) -> None:
    node = await file_node(store, CONTENT)
    with pytest.raises(FixedOutputError, match="not 64 hex digits"):
        await check_fixed_output(store, fod("sha256", "abc"), node)
    with pytest.raises(FixedOutputError, match="not 64 hex digits"):
        await check_fixed_output(store, fod("sha256", "zz" * 32), node)
    with pytest.raises(FixedOutputError, match="unknown hash algorithm 'sha3'"):
        await check_fixed_output(store, fod("sha3", "ab" * 32), node)
    plain = Derivation(outputs={"out": DerivationOutput(path=OUT)}, system="s", builder="b")
    with pytest.raises(NixError, match="not a fixed-output derivation"):
        await check_fixed_output(store, plain, node)

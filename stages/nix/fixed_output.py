"""Checking the output of a fixed-output derivation against its declared hash.

A fixed-output derivation declares the hash of its single output ``out``:

- flat (``hash_algo`` ``sha256``, ``sha1``, ``sha512``, ``md5``): the hash
  of the contents of the output, which must be a single regular file
  (executable or not);
- recursive (``r:sha256`` etc.): the hash of the output's NAR serialization.

A mismatch raises :class:`FixedOutputMismatch` naming both hashes as Nix
prints them with ``--type ALGO --base32`` (``sha256:<nixbase32>``).

Caveats:

- The declared hash is read as in a Nix 2.8 .drv: lower-case hex of the
  algorithm's digest length. (``builtins.derivation`` takes other forms from
  the user; Nix converts them to hex before writing the .drv.)
"""

from __future__ import annotations

import hashlib

from stages.castore import nixbase32
from stages.castore.addresses import Castore
from stages.castore.nar import nar_chunks, nar_hash_and_size
from stages.castore.nodes import FileNode, Node
from stages.castore.services import READ_CHUNK
from stages.nix.derivation import Derivation
from stages.nix.errors import FixedOutputError, FixedOutputMismatch

__all__ = ["check_fixed_output", "format_hash"]

_ALGOS = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


def format_hash(algo: str, digest: bytes) -> str:
    """``<algo>:<nixbase32>``, as ``nix-hash --type ALGO --base32`` prints a hash."""
    return f"{algo}:{nixbase32.encode(digest)}"


async def _file_hash(castore: Castore, algo: str, node: FileNode) -> bytes:
    hasher = hashlib.new(algo)
    if node.size:
        async with await castore.blobs.open_read(node.digest) as reader:
            while chunk := await reader.read(READ_CHUNK):
                hasher.update(chunk)
    return hasher.digest()


async def _nar_hash(castore: Castore, algo: str, node: Node) -> bytes:
    if algo == "sha256":
        return (await nar_hash_and_size(castore, node))[0]
    hasher = hashlib.new(algo)
    async for chunk in nar_chunks(castore, node):
        hasher.update(chunk)
    return hasher.digest()


async def check_fixed_output(castore: Castore, drv: Derivation, node: Node) -> None:
    """Raise unless ``node`` (the built ``out``) has the hash ``drv`` declares.

    FixedOutputError when ``drv`` is not a fixed-output derivation, its hash
    cannot be read, or a flat output is not a regular file;
    FixedOutputMismatch when the hashes differ.
    """
    if not drv.is_fixed_output:
        raise FixedOutputError("out", f"derivation {drv.name!r} is not a fixed-output "
                                      "derivation (one output 'out' with a hash)")
    out = drv.outputs["out"]
    where = out.path or "out"
    algo = out.algo
    size = _ALGOS.get(algo)
    if size is None:
        raise FixedOutputError(where, f"unknown hash algorithm {out.hash_algo!r} for {where} "
                                      f"(known: {', '.join(_ALGOS)}, optionally with 'r:')")
    try:
        expected = bytes.fromhex(out.hash)
    except ValueError:
        expected = b""
    if len(expected) != size:
        raise FixedOutputError(where, f"the declared {algo} hash of {where}, {out.hash!r}, is "
                                      f"not {size * 2} hex digits")
    if out.is_recursive:
        got = await _nar_hash(castore, algo, node)
    else:
        if not isinstance(node, FileNode):
            kind = type(node).__name__.removesuffix("Node").lower()
            raise FixedOutputError(where, f"a flat fixed output must be a regular file, but "
                                          f"{where} is a {kind} (use a recursive hash, "
                                          f"outputHashMode = \"recursive\", for other outputs)")
        got = await _file_hash(castore, algo, node)
    if got != expected:
        raise FixedOutputMismatch(output=where, expected=format_hash(algo, expected),
                                  got=format_hash(algo, got))

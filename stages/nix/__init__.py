"""Nix's own formats and Nix derivations as ocibuild builds.

What users need is here:

- store paths (:func:`check_store_path`, :func:`hash_part`,
  :func:`basename`, :data:`STORE_DIR`);
- derivations as values: :class:`Derivation`, :class:`DerivationOutput`,
  :func:`parse_derivation`, :func:`serialize_derivation` (byte-identical to
  the .drv Nix wrote), :func:`read_derivation`;
- a derivation as a build request: :func:`derivation_to_request`, giving a
  :class:`DerivationRequest`;
- fixed-output checks: :func:`check_fixed_output`;
- nixbase32 (:func:`encode`, :func:`decode`, :func:`encoded_length`) and
  NAR hashes printed as ``nix-store -q --hash`` prints them
  (:func:`format_sha256`, :func:`parse_sha256`);
- the errors, rooted at :class:`NixError` (see :mod:`stages.nix.errors`).

Caveats:

- :func:`derivation_to_request`, :class:`DerivationRequest` and
  :func:`check_fixed_output` load on first use: they need the build request
  types and castore's NAR module, which itself imports this package (for
  printing hashes), so importing them here eagerly would be circular.
"""

from __future__ import annotations

from typing import Any

from stages.castore.hashes import format_sha256, parse_sha256
from stages.castore.nixbase32 import NixBase32Error, decode, encode, encoded_length
from stages.nix.derivation import (
    Derivation,
    DerivationOutput,
    parse_derivation,
    read_derivation,
    serialize_derivation,
)
from stages.nix.errors import (
    DerivationParseError,
    FixedOutputError,
    FixedOutputMismatch,
    MissingInputError,
    NixError,
    StorePathError,
    UnsupportedDerivation,
)
from stages.nix.storepath import STORE_DIR, basename, check_store_path, hash_part

__all__ = [
    "STORE_DIR",
    "Derivation",
    "DerivationOutput",
    "DerivationParseError",
    "DerivationRequest",
    "FixedOutputError",
    "FixedOutputMismatch",
    "MissingInputError",
    "NixBase32Error",
    "NixError",
    "StorePathError",
    "UnsupportedDerivation",
    "basename",
    "check_fixed_output",
    "check_store_path",
    "decode",
    "derivation_to_request",
    "encode",
    "encoded_length",
    "format_sha256",
    "hash_part",
    "parse_derivation",
    "parse_sha256",
    "read_derivation",
    "serialize_derivation",
]

_LAZY = {
    "DerivationRequest": "stages.nix.to_request",
    "derivation_to_request": "stages.nix.to_request",
    "check_fixed_output": "stages.nix.fixed_output",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

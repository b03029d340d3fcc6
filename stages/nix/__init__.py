"""Nix's own formats, as far as ocibuild needs to speak them.

- :mod:`stages.nix.nixbase32`: Nix's base-32 alphabet and digit order, used in
  store path hash parts and in printed hashes (``sha256:1b8m03r6...``).
- :mod:`stages.nix.hashes`: hashes printed the way ``nix-store -q --hash``
  and ``nix-hash --base32`` print them.

The NAR serialization itself lives with the store it renders
(:mod:`stages.castore.nar`).
"""

from __future__ import annotations

from stages.nix.hashes import format_sha256, parse_sha256
from stages.nix.nixbase32 import NixBase32Error, decode, encode, encoded_length

__all__ = [
    "NixBase32Error",
    "decode",
    "encode",
    "encoded_length",
    "format_sha256",
    "parse_sha256",
]

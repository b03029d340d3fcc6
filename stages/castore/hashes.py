"""Hashes in the printed form Nix uses for NAR hashes.

``nix-store -q --hash PATH`` prints ``sha256:`` followed by the nixbase32 of
the sha256 of the path's NAR serialization; this module formats and parses
that form.
"""

from __future__ import annotations

from stages.castore import nixbase32

__all__ = ["format_sha256", "parse_sha256"]

_PREFIX = "sha256:"
SHA256_LEN = 32


def format_sha256(digest: bytes) -> str:
    """``sha256:<nixbase32>``, as ``nix-store -q --hash`` prints it."""
    if len(digest) != SHA256_LEN:
        raise ValueError(f"a sha256 digest is {SHA256_LEN} bytes, got {len(digest)}")
    return _PREFIX + nixbase32.encode(digest)


def parse_sha256(text: str) -> bytes:
    """The 32 digest bytes of ``sha256:<nixbase32>`` text."""
    if not text.startswith(_PREFIX):
        raise nixbase32.NixBase32Error(f"{text!r} does not start with {_PREFIX!r}")
    return nixbase32.decode(text[len(_PREFIX):], SHA256_LEN)

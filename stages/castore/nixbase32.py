"""Nix's base-32 encoding ("nixbase32").

Nix prints hashes in base 32 with its own alphabet (no ``e``, ``o``, ``u``,
``t``) and its own digit order: the bytes are read as one little-endian
integer and written most significant digit first. So the last character holds
the lowest five bits of the first byte, and a 32-byte sha256 becomes 52
characters. Treating the bytes as an integer gives exactly Nix's bit layout
(libutil/hash.cc, ``printHash32`` / ``parseHash32``) without shifting by hand.

Caveats:

- :func:`decode` infers the byte length from the text length
  (``len * 5 // 8``) and refuses text whose value needs more bytes than that,
  as Nix does; pass ``size`` to insist on a particular length.
- Upper-case letters are not accepted; Nix does not produce or accept them.
"""

from __future__ import annotations

__all__ = ["ALPHABET", "NixBase32Error", "decode", "encode", "encoded_length"]

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_DIGITS = {c: i for i, c in enumerate(ALPHABET)}


class NixBase32Error(ValueError):
    """Text that is not nixbase32 (bad character, bad length, too large)."""


def encoded_length(size: int) -> int:
    """Characters needed for ``size`` bytes (0 for 0 bytes, 52 for 32)."""
    if size < 0:
        raise ValueError(f"a byte length is not negative, got {size}")
    return (size * 8 + 4) // 5


def encode(data: bytes) -> str:
    """``data`` in nixbase32, as Nix prints it."""
    value = int.from_bytes(data, "little")
    chars = []
    for _ in range(encoded_length(len(data))):
        chars.append(ALPHABET[value & 0x1F])
        value >>= 5
    return "".join(reversed(chars))


def decode(text: str, size: int | None = None) -> bytes:
    """The bytes ``text`` encodes; NixBase32Error names what is wrong."""
    if size is None:
        size = len(text) * 5 // 8
    if len(text) != encoded_length(size):
        raise NixBase32Error(
            f"nixbase32 text of {len(text)} characters cannot encode {size} bytes "
            f"(that takes {encoded_length(size)} characters)")
    value = 0
    for position, char in enumerate(text):
        digit = _DIGITS.get(char)
        if digit is None:
            raise NixBase32Error(
                f"{char!r} at position {position} is not a nixbase32 character "
                f"(alphabet {ALPHABET})")
        value = (value << 5) | digit
    if value >> (size * 8):
        raise NixBase32Error(f"nixbase32 text {text!r} encodes more than {size} bytes")
    return value.to_bytes(size, "little")

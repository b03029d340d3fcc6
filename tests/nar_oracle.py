"""An independent NAR writer, straight from the grammar, for the tests to compare against.

A tree is described by nested values: ``bytes`` a regular file's contents,
``("x", bytes)`` an executable file, ``("l", target)`` a symlink, a ``dict``
of name to value a directory.
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["expected_nar", "s"]


def s(data: bytes) -> bytes:
    """A NAR string: its length (u64, little-endian), the bytes, zero padding to 8."""
    return struct.pack("<Q", len(data)) + data + bytes((8 - len(data) % 8) % 8)


def expected_nar(spec: Any) -> bytes:
    def node(spec) -> bytes:
        if isinstance(spec, bytes):
            return s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + s(spec) + s(b")")
        if spec[0] == "x":
            return (s(b"(") + s(b"type") + s(b"regular") + s(b"executable") + s(b"")
                    + s(b"contents") + s(spec[1]) + s(b")"))
        if spec[0] == "l":
            return s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(spec[1]) + s(b")")
        raise AssertionError(spec)

    def tree(spec) -> bytes:
        if not isinstance(spec, dict):
            return node(spec)
        out = s(b"(") + s(b"type") + s(b"directory")
        for name in sorted(spec):
            out += (s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node")
                    + tree(spec[name]) + s(b")"))
        return out + s(b")")

    return s(b"nix-archive-1") + tree(spec)

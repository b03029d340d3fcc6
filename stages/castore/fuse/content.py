"""Names of content in the mount server's content directory.

The mount server shows any directory or file of the store, by digest, under
``<mountpoint>/.by-digest/``; nothing needs adding first. A name there says
what the content is:

- ``d-<digest>``: the directory with that digest;
- ``f-<digest>-<size>``: a file with that blob and size;
- ``x-<digest>-<size>``: the same, executable.

``<digest>`` is the 64 lower-case hex digits of the BLAKE3 digest and
``<size>`` a decimal without leading zeros: each content has one name. The
build service binds a build's inputs from here, so the kernel's cached
entries and pages of an input are shared by every build that uses it.

This module imports nothing heavy: the service side uses it too.
"""

from __future__ import annotations

import re

from stages.castore.nodes import DirectoryNode, FileNode, Node

__all__ = ["CONTENT_DIR", "content_name", "parse_content_name"]

#: The content directory's name at the mount's root.
CONTENT_DIR = ".by-digest"

_NAME = re.compile(rb"(?:d-([0-9a-f]{64})|([fx])-([0-9a-f]{64})-(0|[1-9][0-9]{0,19}))")


def content_name(node: Node) -> str:
    """The name of a directory's or file's content in the content directory."""
    if isinstance(node, DirectoryNode):
        return f"d-{node.digest.hex()}"
    if isinstance(node, FileNode):
        return f"{'x' if node.executable else 'f'}-{node.digest.hex()}-{node.size}"
    raise ValueError(f"a {type(node).__name__} has no content to mount "
                     f"(input {node.name.decode('utf-8', 'replace')!r})")


def parse_content_name(name: bytes) -> tuple[str, bytes, int] | None:
    """``(kind, digest, size)`` of a content-directory name, kind ``"d"``,
    ``"f"`` or ``"x"`` (size 0 for a directory); None for any other name."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    if m.group(1) is not None:
        return "d", bytes.fromhex(m.group(1).decode()), 0
    size = int(m.group(4))
    if size >= 1 << 64:
        return None
    return m.group(2).decode(), bytes.fromhex(m.group(3).decode()), size

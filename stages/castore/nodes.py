"""Castore's data model: nodes, directories, digests, and their wire form.

The domain types here are frozen attrs values. Protobuf messages
(``stages.proto.castore_pb2``) are converted to and from them only in this
module (``*_to_proto`` / ``*_from_proto``), and every conversion from the wire
validates, so code past this boundary can trust what it holds.

Caveats:

- A node's ``name`` is empty where the node stands alone (the root of an
  import, an output of a build); inside a Directory every name is checked.
- A Directory's digest is BLAKE3 of its deterministic protobuf encoding; it is
  computed once per value and cached.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Iterable

import attrs
import blake3

from stages.castore.errors import ValidationError
from stages.proto import castore_pb2

__all__ = [
    "DIGEST_LEN",
    "EMPTY_DIRECTORY_DIGEST",
    "Directory",
    "DirectoryNode",
    "FileNode",
    "Node",
    "SymlinkNode",
    "blob_digest",
    "directory_from_proto",
    "directory_to_proto",
    "node_from_json",
    "node_from_json_value",
    "node_from_proto",
    "node_to_json",
    "node_to_json_value",
    "node_to_proto",
    "validate_digest",
    "validate_name",
]

DIGEST_LEN = 32
MAX_NAME_LEN = 255
MAX_TARGET_LEN = 4095


def blob_digest(data: bytes) -> bytes:
    """The digest of a blob: BLAKE3 of its bytes."""
    return blake3.blake3(data).digest()


def validate_digest(digest: bytes, *, name: bytes | None = None) -> None:
    if not isinstance(digest, bytes) or len(digest) != DIGEST_LEN:
        raise ValidationError(
            "digest-length",
            f"a digest is {DIGEST_LEN} bytes of BLAKE3, got "
            f"{len(digest) if isinstance(digest, bytes) else type(digest).__name__}",
            name=name)


def validate_name(name: bytes) -> None:
    """Check an entry name as it must be inside a Directory."""
    if not name:
        raise ValidationError("name-empty", "an entry name must not be empty", name=name)
    if len(name) > MAX_NAME_LEN:
        raise ValidationError("name-too-long",
                              f"an entry name is at most {MAX_NAME_LEN} bytes", name=name)
    if b"/" in name:
        raise ValidationError("name-slash", "an entry name must not contain '/'", name=name)
    if b"\0" in name:
        raise ValidationError("name-nul", "an entry name must not contain NUL", name=name)
    if name in (b".", b".."):
        raise ValidationError("name-dot", "an entry name must not be '.' or '..'", name=name)


def _check_name(_inst: object, _attr: object, name: bytes) -> None:
    # Empty names are allowed on a lone node; Directory checks its entries.
    if not isinstance(name, bytes):
        raise ValidationError("name-type", f"a name is bytes, got {type(name).__name__}")
    if name:
        validate_name(name)


def _check_digest(inst: object, _attr: object, digest: bytes) -> None:
    validate_digest(digest, name=getattr(inst, "name", None))


def _check_target(inst: object, _attr: object, target: bytes) -> None:
    name = getattr(inst, "name", None)
    if not isinstance(target, bytes):
        raise ValidationError("symlink-target-type", "a symlink target is bytes", name=name)
    if not target:
        raise ValidationError("symlink-target-empty", "a symlink target must not be empty",
                              name=name)
    if len(target) > MAX_TARGET_LEN:
        raise ValidationError("symlink-target-too-long",
                              f"a symlink target is at most {MAX_TARGET_LEN} bytes", name=name)
    if b"\0" in target:
        raise ValidationError("symlink-target-nul", "a symlink target must not contain NUL",
                              name=name)


def _check_size(inst: object, _attr: object, size: int) -> None:
    if not isinstance(size, int) or size < 0 or size >= 1 << 64:
        raise ValidationError("size-range", f"size {size!r} is not a uint64",
                              name=getattr(inst, "name", None))


@attrs.frozen(kw_only=True)
class FileNode:
    """A regular file: its blob's digest and length, and the exec bit."""

    name: bytes = attrs.field(validator=_check_name)
    digest: bytes = attrs.field(validator=_check_digest)
    size: int = attrs.field(validator=_check_size)
    executable: bool = False

    def renamed(self, name: bytes) -> FileNode:
        return attrs.evolve(self, name=name)


@attrs.frozen(kw_only=True)
class DirectoryNode:
    """A reference to a Directory by digest, with that Directory's size."""

    name: bytes = attrs.field(validator=_check_name)
    digest: bytes = attrs.field(validator=_check_digest)
    size: int = attrs.field(validator=_check_size)

    def renamed(self, name: bytes) -> DirectoryNode:
        return attrs.evolve(self, name=name)


@attrs.frozen(kw_only=True)
class SymlinkNode:
    """A symbolic link; its target is kept as raw bytes and never resolved."""

    name: bytes = attrs.field(validator=_check_name)
    target: bytes = attrs.field(validator=_check_target)

    def renamed(self, name: bytes) -> SymlinkNode:
        return attrs.evolve(self, name=name)


Node = FileNode | DirectoryNode | SymlinkNode


def _check_entries(directory: Directory) -> None:
    seen: dict[bytes, str] = {}
    for kind, entries in (("directories", directory.directories),
                          ("files", directory.files),
                          ("symlinks", directory.symlinks)):
        previous: bytes | None = None
        for entry in entries:
            validate_name(entry.name)
            if previous is not None and entry.name <= previous:
                if entry.name == previous:
                    raise ValidationError("name-duplicate",
                                          f"name appears twice in {kind}", name=entry.name)
                raise ValidationError("names-sorted",
                                      f"{kind} must be sorted bytewise by name; "
                                      f"{entry.name!r} comes after {previous!r}",
                                      name=entry.name)
            previous = entry.name
            if entry.name in seen:
                raise ValidationError("name-duplicate",
                                      f"name appears in both {seen[entry.name]} and {kind}",
                                      name=entry.name)
            seen[entry.name] = kind


# Typed converters (attrs' mypy plugin cannot solve converter=tuple's type variable).
def _directory_nodes(items: Iterable[DirectoryNode]) -> tuple[DirectoryNode, ...]:
    return tuple(items)


def _file_nodes(items: Iterable[FileNode]) -> tuple[FileNode, ...]:
    return tuple(items)


def _symlink_nodes(items: Iterable[SymlinkNode]) -> tuple[SymlinkNode, ...]:
    return tuple(items)


@attrs.frozen(kw_only=True, cache_hash=True)
class Directory:
    """One directory's entries, in the three sorted lists of the protocol.

    Use :meth:`from_nodes` to build one from entries in any order.
    """

    directories: tuple[DirectoryNode, ...] = attrs.field(default=(), converter=_directory_nodes)
    files: tuple[FileNode, ...] = attrs.field(default=(), converter=_file_nodes)
    symlinks: tuple[SymlinkNode, ...] = attrs.field(default=(), converter=_symlink_nodes)

    def __attrs_post_init__(self) -> None:
        _check_entries(self)

    @classmethod
    def from_nodes(cls, nodes: Iterable[Node]) -> Directory:
        """Sort named entries into a Directory (duplicates are refused)."""
        dirs: list[DirectoryNode] = []
        files: list[FileNode] = []
        links: list[SymlinkNode] = []
        for node in nodes:
            if isinstance(node, DirectoryNode):
                dirs.append(node)
            elif isinstance(node, FileNode):
                files.append(node)
            else:
                links.append(node)
        key = lambda n: n.name
        return cls(directories=sorted(dirs, key=key), files=sorted(files, key=key),
                   symlinks=sorted(links, key=key))

    def entries(self) -> list[Node]:
        """All entries, sorted bytewise by name across the three kinds."""
        return sorted([*self.directories, *self.files, *self.symlinks], key=lambda n: n.name)

    @functools.cached_property
    def size(self) -> int:
        """Files and symlinks, plus 1 + size for each child directory."""
        return (len(self.files) + len(self.symlinks)
                + sum(1 + d.size for d in self.directories))

    @functools.cached_property
    def canonical_bytes(self) -> bytes:
        return directory_to_proto(self).SerializeToString(deterministic=True)

    @functools.cached_property
    def digest(self) -> bytes:
        return blake3.blake3(self.canonical_bytes).digest()

    def as_node(self, name: bytes = b"") -> DirectoryNode:
        """A DirectoryNode pointing at this directory."""
        return DirectoryNode(name=name, digest=self.digest, size=self.size)


EMPTY_DIRECTORY_DIGEST = bytes.fromhex(
    "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")


# --- the protobuf boundary -------------------------------------------------

def _dnode_to_proto(n: DirectoryNode) -> castore_pb2.DirectoryNode:
    return castore_pb2.DirectoryNode(name=n.name, digest=n.digest, size=n.size)


def _fnode_to_proto(n: FileNode) -> castore_pb2.FileNode:
    return castore_pb2.FileNode(name=n.name, digest=n.digest, size=n.size,
                                executable=n.executable)


def _snode_to_proto(n: SymlinkNode) -> castore_pb2.SymlinkNode:
    return castore_pb2.SymlinkNode(name=n.name, target=n.target)


def directory_to_proto(d: Directory) -> castore_pb2.Directory:
    return castore_pb2.Directory(
        directories=[_dnode_to_proto(n) for n in d.directories],
        files=[_fnode_to_proto(n) for n in d.files],
        symlinks=[_snode_to_proto(n) for n in d.symlinks],
    )


def directory_from_proto(msg: castore_pb2.Directory) -> Directory:
    """Convert and validate a Directory message (raises ValidationError)."""
    return Directory(
        directories=[DirectoryNode(name=n.name, digest=n.digest, size=n.size)
                     for n in msg.directories],
        files=[FileNode(name=n.name, digest=n.digest, size=n.size, executable=n.executable)
               for n in msg.files],
        symlinks=[SymlinkNode(name=n.name, target=n.target) for n in msg.symlinks],
    )


def node_to_proto(node: Node) -> castore_pb2.Node:
    if isinstance(node, DirectoryNode):
        return castore_pb2.Node(directory=_dnode_to_proto(node))
    if isinstance(node, FileNode):
        return castore_pb2.Node(file=_fnode_to_proto(node))
    return castore_pb2.Node(symlink=_snode_to_proto(node))


def node_from_proto(msg: castore_pb2.Node) -> Node:
    """Convert and validate a Node message (raises ValidationError)."""
    which = msg.WhichOneof("node")
    if which == "directory":
        d = msg.directory
        return DirectoryNode(name=d.name, digest=d.digest, size=d.size)
    if which == "file":
        f = msg.file
        return FileNode(name=f.name, digest=f.digest, size=f.size, executable=f.executable)
    if which == "symlink":
        s = msg.symlink
        return SymlinkNode(name=s.name, target=s.target)
    raise ValidationError("node-empty", "a Node must hold a directory, file or symlink")


def node_to_json_value(node: Node) -> dict:
    """A node's proto-JSON as a JSON value: what json_format gives, made directly.

    Build stages keep nodes in their results this way, once or twice per
    output; json_format takes ~10x longer for the same dict.
    """
    b64 = base64.b64encode
    fields: dict = {}
    if node.name:
        fields["name"] = b64(node.name).decode()
    if isinstance(node, SymlinkNode):
        if node.target:
            fields["target"] = b64(node.target).decode()
        return {"symlink": fields}
    fields["digest"] = b64(node.digest).decode()
    if node.size:
        fields["size"] = str(node.size)
    if isinstance(node, DirectoryNode):
        return {"directory": fields}
    if node.executable:
        fields["executable"] = True
    return {"file": fields}


_CANONICAL_KEYS = {"directory": {"name", "digest", "size"},
                   "file": {"name", "digest", "size", "executable"},
                   "symlink": {"name", "target"}}


def _canonical(value: object) -> tuple[str, dict] | None:
    """(kind, fields) of a value in exactly the form node_to_json_value makes, else None."""
    if not isinstance(value, dict) or len(value) != 1:
        return None
    kind, fields = next(iter(value.items()))
    keys = _CANONICAL_KEYS.get(kind)
    if keys is None or not isinstance(fields, dict) or not set(fields) <= keys:
        return None
    for key, v in fields.items():
        if key == "executable":
            if v is not True:
                return None
        elif key == "size":
            if not isinstance(v, str) or not v.isdigit() or v[0] == "0":
                return None
        elif not isinstance(v, str):
            return None
    return kind, fields


def node_from_json_value(value: object) -> Node:
    """The node of a proto-JSON value; malformed input raises ValidationError.

    The form node_to_json_value makes is read directly; any other (other
    spellings proto-JSON allows, or mistakes) goes through json_format.
    """
    canonical = _canonical(value)
    if canonical is not None:
        kind, f = canonical
        try:
            name = base64.b64decode(f.get("name", ""), validate=True)
            other = base64.b64decode(f.get("target" if kind == "symlink" else "digest", ""),
                                     validate=True)
        except binascii.Error:
            pass  # another base64 alphabet, or a mistake: json_format tells
        else:
            if kind == "symlink":
                return SymlinkNode(name=name, target=other)
            size = int(f.get("size", "0"))
            if kind == "directory":
                return DirectoryNode(name=name, digest=other, size=size)
            return FileNode(name=name, digest=other, size=size,
                            executable=f.get("executable", False))
    if not isinstance(value, dict):
        raise ValidationError("node-json", f"not a proto-JSON tvix.castore.v1.Node: "
                                           f"{value!r} is not an object")
    return _parsed_by_json_format("ParseDict", value)


def _parsed_by_json_format(how: str, source: object) -> Node:
    """The node json_format's ``Parse`` (text) or ``ParseDict`` (value) reads."""
    from google.protobuf import json_format

    msg = castore_pb2.Node()
    try:
        getattr(json_format, how)(source, msg)
    except json_format.ParseError as exc:
        raise ValidationError("node-json", f"not a proto-JSON tvix.castore.v1.Node: {exc}") from exc
    return node_from_proto(msg)


def node_to_json(node: Node) -> str:
    """One line of proto-JSON (google.protobuf.json_format) for a node."""
    return json.dumps(node_to_json_value(node))


def node_from_json(text: str) -> Node:
    """Parse one proto-JSON Node; malformed input raises ValidationError.

    Strict as json_format is (duplicate keys, JSON null): for text from
    outside; stage results use :func:`node_from_json_value`.
    """
    return _parsed_by_json_format("Parse", text)

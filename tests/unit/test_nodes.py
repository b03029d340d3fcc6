"""The castore data model: protobuf round trips, every validation rule of
PROTOCOL.md, and digests and sizes computed independently of the code.

Expected digests are computed here from a hand-written protobuf encoder
(varints and tags, fields in number order, defaults omitted) and the blake3
package, never through stages.castore's own encoding.
"""

from __future__ import annotations

import base64
import json

import blake3
import pytest
import strategies as cst
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from stages.castore.errors import ValidationError
from stages.castore.memory import MemoryDirectoryService
from stages.castore.nodes import (
    EMPTY_DIRECTORY_DIGEST,
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
    directory_from_proto,
    directory_to_proto,
    node_from_json,
    node_from_proto,
    node_to_json,
    node_to_proto,
)
from stages.castore.services import ClosureValidator
from stages.proto import castore_pb2

D1 = bytes(range(32))
D2 = bytes(range(32, 64))


# --- an independent encoder for the canonical form ---------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _bytes_field(number: int, value: bytes) -> bytes:
    if not value:
        return b""
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _uint_field(number: int, value: int) -> bytes:
    if not value:
        return b""
    return _varint(number << 3 | 0) + _varint(value)


def _encode_entry(entry: DirectoryNode | FileNode | SymlinkNode) -> bytes:
    if isinstance(entry, SymlinkNode):
        return _bytes_field(1, entry.name) + _bytes_field(2, entry.target)
    body = _bytes_field(1, entry.name) + _bytes_field(2, entry.digest) + _uint_field(3, entry.size)
    if isinstance(entry, FileNode):
        body += _uint_field(4, int(entry.executable))
    return body


def _encode_directory(d: Directory) -> bytes:
    out = b""
    for number, entries in ((1, d.directories), (2, d.files), (3, d.symlinks)):
        for entry in entries:
            out += _bytes_field(number, _encode_entry(entry)) or _varint(number << 3 | 2) + b"\0"
    return out


# --- digests and sizes -------------------------------------------------------

def test_empty_directory_digest_is_the_one_in_protocol_md() -> None:
    given_in_protocol = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert Directory().digest.hex() == given_in_protocol
    assert EMPTY_DIRECTORY_DIGEST.hex() == given_in_protocol
    assert Directory().size == 0


def test_digest_of_a_known_directory_matches_hand_encoding() -> None:
    child = Directory(files=[FileNode(name=b"x", digest=D1, size=3)])
    d = Directory(
        directories=[DirectoryNode(name=b"sub", digest=child.digest, size=child.size)],
        files=[FileNode(name=b"a", digest=D1, size=300, executable=True),
               FileNode(name=b"b", digest=D2, size=0)],
        symlinks=[SymlinkNode(name=b"l", target=b"../a")],
    )
    # Written out by hand: tag 0x0a = field 1 (directories), length-delimited.
    sub = b"\x0a\x03sub" + b"\x12\x20" + child.digest + b"\x18\x01"
    fa = b"\x0a\x01a" + b"\x12\x20" + D1 + b"\x18\xac\x02" + b"\x20\x01"
    fb = b"\x0a\x01b" + b"\x12\x20" + D2
    sl = b"\x0a\x01l" + b"\x12\x04../a"
    wire = (b"\x0a" + bytes([len(sub)]) + sub + b"\x12" + bytes([len(fa)]) + fa
            + b"\x12" + bytes([len(fb)]) + fb + b"\x1a" + bytes([len(sl)]) + sl)
    assert d.canonical_bytes == wire
    assert d.digest == blake3.blake3(wire).digest()
    # 2 files + 1 symlink + (1 + child's 1 file)
    assert d.size == 5
    assert d.as_node(b"n") == DirectoryNode(name=b"n", digest=d.digest, size=5)


@given(cst.directories())
def test_digest_is_blake3_of_canonical_encoding(d: Directory) -> None:
    assert d.canonical_bytes == _encode_directory(d)
    assert d.digest == blake3.blake3(_encode_directory(d)).digest()


@given(cst.directories())
def test_size_rule(d: Directory) -> None:
    expected = len(d.files) + len(d.symlinks) + sum(1 + c.size for c in d.directories)
    assert d.size == expected


def test_nested_sizes() -> None:
    leaf = Directory()  # size 0
    mid = Directory(directories=[leaf.as_node(b"e1"), leaf.as_node(b"e2")],
                    files=[FileNode(name=b"f", digest=D1, size=1)])
    top = Directory(directories=[mid.as_node(b"m")],
                    symlinks=[SymlinkNode(name=b"s", target=b"t")])
    assert mid.size == 1 + (1 + 0) + (1 + 0)
    assert top.size == 1 + (1 + 3)


# --- round trips -------------------------------------------------------------

@given(cst.nodes(cst.root_names))
def test_node_proto_round_trip(node) -> None:
    wire = node_to_proto(node).SerializeToString(deterministic=True)
    msg = castore_pb2.Node()
    msg.ParseFromString(wire)
    assert node_from_proto(msg) == node


@given(cst.nodes(cst.root_names))
def test_node_json_round_trip(node) -> None:
    text = node_to_json(node)
    assert "\n" not in text
    assert node_from_json(text) == node
    # It is proto-JSON: bytes as base64 under the oneof's field name.
    doc = json.loads(text)
    (kind,) = doc
    assert kind == {FileNode: "file", DirectoryNode: "directory", SymlinkNode: "symlink"}[type(node)]
    assert base64.b64decode(doc[kind].get("name", "")) == node.name


@given(cst.directories())
def test_directory_proto_round_trip(d: Directory) -> None:
    msg = castore_pb2.Directory()
    msg.ParseFromString(directory_to_proto(d).SerializeToString())
    back = directory_from_proto(msg)
    assert back == d
    assert back.digest == d.digest


@given(cst.directories())
def test_directory_json_round_trip(d: Directory) -> None:
    text = json_format.MessageToJson(directory_to_proto(d))
    msg = json_format.Parse(text, castore_pb2.Directory())
    assert directory_from_proto(msg) == d


@given(cst.directories())
def test_from_nodes_sorts_any_order(d: Directory) -> None:
    shuffled = list(reversed(d.entries()))
    assert Directory.from_nodes(shuffled) == d
    assert [e.name for e in d.entries()] == sorted(e.name for e in d.entries())


# --- every validation rule ---------------------------------------------------

def _wire_dir(**lists) -> castore_pb2.Directory:
    return castore_pb2.Directory(**lists)


def _check(exc: ValidationError, rule: str, *, name: bytes | None = None,
           digest: bytes | None = None) -> None:
    assert exc.rule == rule
    assert str(exc).startswith(rule + ":")
    if name is not None:
        assert exc.name == name
        assert repr(name) in str(exc)
    if digest is not None:
        assert exc.digest == digest
        assert digest.hex() in str(exc)


NAME_RULES = [
    pytest.param(b"", "name-empty", id="empty"),
    pytest.param(b"a/b", "name-slash", id="slash"),
    pytest.param(b"a\0b", "name-nul", id="nul"),
    pytest.param(b".", "name-dot", id="dot"),
    pytest.param(b"..", "name-dot", id="dotdot"),
    pytest.param(b"n" * 256, "name-too-long", id="too-long"),
]


@pytest.mark.parametrize("kind", ["directories", "files", "symlinks"])
@pytest.mark.parametrize("bad, rule", NAME_RULES)
def test_name_rules_inside_a_directory(kind: str, bad: bytes, rule: str) -> None:
    entry = {"directories": castore_pb2.DirectoryNode(name=bad, digest=D1, size=0),
             "files": castore_pb2.FileNode(name=bad, digest=D1, size=0),
             "symlinks": castore_pb2.SymlinkNode(name=bad, target=b"t")}[kind]
    with pytest.raises(ValidationError) as info:
        directory_from_proto(_wire_dir(**{kind: [entry]}))
    _check(info.value, rule, name=bad)


@pytest.mark.parametrize("bad, rule", [p for p in NAME_RULES if p.id != "empty"])
def test_name_rules_on_a_lone_node(bad: bytes, rule: str) -> None:
    msg = castore_pb2.Node(file=castore_pb2.FileNode(name=bad, digest=D1, size=1))
    with pytest.raises(ValidationError) as info:
        node_from_proto(msg)
    _check(info.value, rule, name=bad)


def test_lone_node_may_be_anonymous() -> None:
    assert node_from_proto(castore_pb2.Node(
        symlink=castore_pb2.SymlinkNode(name=b"", target=b"x"))).name == b""


def test_name_of_255_bytes_is_allowed() -> None:
    assert Directory(files=[FileNode(name=b"n" * 255, digest=D1, size=0)]).size == 1


def test_name_type() -> None:
    with pytest.raises(ValidationError) as info:
        FileNode(name="text", digest=D1, size=0)  # type: ignore[arg-type]  # str on purpose
    _check(info.value, "name-type")


@pytest.mark.parametrize("kind", ["directories", "files", "symlinks"])
def test_names_sorted(kind: str) -> None:
    make = {"directories": lambda n: castore_pb2.DirectoryNode(name=n, digest=D1),
            "files": lambda n: castore_pb2.FileNode(name=n, digest=D1),
            "symlinks": lambda n: castore_pb2.SymlinkNode(name=n, target=b"t")}[kind]
    # Bytewise: b"B" (0x42) sorts before b"a" (0x61); b"a" before b"a\xff".
    directory_from_proto(_wire_dir(**{kind: [make(b"B"), make(b"a"), make(b"a\xff")]}))
    with pytest.raises(ValidationError) as info:
        directory_from_proto(_wire_dir(**{kind: [make(b"a"), make(b"B")]}))
    _check(info.value, "names-sorted", name=b"B")


@pytest.mark.parametrize("kind", ["directories", "files", "symlinks"])
def test_name_duplicate_in_one_list(kind: str) -> None:
    make = {"directories": lambda n: castore_pb2.DirectoryNode(name=n, digest=D1),
            "files": lambda n: castore_pb2.FileNode(name=n, digest=D1),
            "symlinks": lambda n: castore_pb2.SymlinkNode(name=n, target=b"t")}[kind]
    with pytest.raises(ValidationError) as info:
        directory_from_proto(_wire_dir(**{kind: [make(b"same"), make(b"same")]}))
    _check(info.value, "name-duplicate", name=b"same")


@pytest.mark.parametrize("first, second", [("directories", "files"),
                                           ("directories", "symlinks"),
                                           ("files", "symlinks")])
def test_name_duplicate_across_lists(first: str, second: str) -> None:
    make = {"directories": castore_pb2.DirectoryNode(name=b"x", digest=D1),
            "files": castore_pb2.FileNode(name=b"x", digest=D1),
            "symlinks": castore_pb2.SymlinkNode(name=b"x", target=b"t")}
    with pytest.raises(ValidationError) as info:
        directory_from_proto(_wire_dir(**{first: [make[first]], second: [make[second]]}))
    _check(info.value, "name-duplicate", name=b"x")


@pytest.mark.parametrize("length", [0, 31, 33, 64])
@pytest.mark.parametrize("kind", ["directory", "file"])
def test_digest_length(kind: str, length: int) -> None:
    bad = b"\x01" * length
    msg = (castore_pb2.Node(directory=castore_pb2.DirectoryNode(name=b"d", digest=bad))
           if kind == "directory"
           else castore_pb2.Node(file=castore_pb2.FileNode(name=b"d", digest=bad)))
    with pytest.raises(ValidationError) as info:
        node_from_proto(msg)
    _check(info.value, "digest-length", name=b"d")
    assert str(length) in str(info.value)


@pytest.mark.parametrize("target, rule", [
    pytest.param(b"", "symlink-target-empty", id="empty"),
    pytest.param(b"a\0b", "symlink-target-nul", id="nul"),
    pytest.param(b"t" * 4096, "symlink-target-too-long", id="too-long"),
])
def test_symlink_target_rules(target: bytes, rule: str) -> None:
    with pytest.raises(ValidationError) as info:
        directory_from_proto(_wire_dir(symlinks=[castore_pb2.SymlinkNode(name=b"l", target=target)]))
    _check(info.value, rule, name=b"l")


def test_symlink_target_of_4095_bytes_is_allowed() -> None:
    assert SymlinkNode(name=b"l", target=b"t" * 4095).target == b"t" * 4095


def test_symlink_target_type() -> None:
    with pytest.raises(ValidationError) as info:
        SymlinkNode(name=b"l", target="x")  # type: ignore[arg-type]  # str on purpose
    _check(info.value, "symlink-target-type", name=b"l")


@pytest.mark.parametrize("size", [-1, 1 << 64])
def test_size_range(size: int) -> None:
    with pytest.raises(ValidationError) as info:
        FileNode(name=b"f", digest=D1, size=size)
    _check(info.value, "size-range", name=b"f")


def test_node_empty() -> None:
    with pytest.raises(ValidationError) as info:
        node_from_proto(castore_pb2.Node())
    _check(info.value, "node-empty")
    for text in ("{}", "[]"):
        with pytest.raises(ValidationError) as info:
            node_from_json(text)
        _check(info.value, "node-empty")


@pytest.mark.parametrize("text", ["", "{", "null", '{"file": {"name": 5}}',
                                  '{"nosuch": {}}', '{"file": {"size": "-1"}}'])
def test_node_json(text: str) -> None:
    with pytest.raises(ValidationError) as info:
        node_from_json(text)
    _check(info.value, "node-json")


# --- the rules of a leaves-to-root upload ------------------------------------

def test_directory_size_checked_on_upload() -> None:
    child = Directory(files=[FileNode(name=b"f", digest=D1, size=1)])
    lying = Directory(directories=[DirectoryNode(name=b"c", digest=child.digest, size=7)])
    v = ClosureValidator()
    v.add(child)
    with pytest.raises(ValidationError) as info:
        v.add(lying)
    _check(info.value, "directory-size", name=b"c", digest=child.digest)


def test_put_order() -> None:
    child = Directory(files=[FileNode(name=b"f", digest=D1, size=1)])
    parent = Directory(directories=[child.as_node(b"c")])
    with pytest.raises(ValidationError) as info:
        ClosureValidator().add(parent)
    _check(info.value, "put-order", name=b"c", digest=child.digest)


def test_put_empty() -> None:
    with pytest.raises(ValidationError) as info:
        ClosureValidator().finalize()
    _check(info.value, "put-empty")


def test_put_disconnected() -> None:
    stray = Directory(files=[FileNode(name=b"stray", digest=D2, size=2)])
    root = Directory(files=[FileNode(name=b"f", digest=D1, size=1)])
    v = ClosureValidator()
    v.add(stray)
    v.add(root)
    with pytest.raises(ValidationError) as info:
        v.finalize()
    _check(info.value, "put-disconnected", digest=stray.digest)


async def test_recursive_get_is_breadth_first_each_once() -> None:
    leaf = Directory(files=[FileNode(name=b"leaf", digest=D1, size=1)])
    a = Directory(directories=[leaf.as_node(b"l1")])
    b = Directory(directories=[leaf.as_node(b"l2")], files=[FileNode(name=b"f", digest=D2, size=1)])
    root = Directory(directories=[a.as_node(b"a"), b.as_node(b"b")])
    service = MemoryDirectoryService()
    assert await service.put_tree([leaf, a, b, root]) == root.digest
    got = [d async for d in service.get_recursive(root.digest)]
    assert got == [root, a, b, leaf]


@given(st.lists(cst.names, min_size=2, max_size=6, unique=True))
def test_from_nodes_refuses_duplicates_across_kinds(entry_names: list[bytes]) -> None:
    dup = entry_names[0]
    with pytest.raises(ValidationError) as info:
        Directory.from_nodes([FileNode(name=dup, digest=D1, size=0),
                              SymlinkNode(name=dup, target=b"t"),
                              *[FileNode(name=n, digest=D1, size=0) for n in entry_names[1:]]])
    _check(info.value, "name-duplicate", name=dup)


@given(cst.nodes(cst.root_names))
def test_node_json_value_is_what_json_format_makes(node) -> None:
    from stages.castore.nodes import node_from_json_value, node_to_json_value

    proto = node_to_proto(node)
    value = node_to_json_value(node)
    assert value == json.loads(json_format.MessageToJson(proto, indent=None))
    assert node_to_json(node) == json_format.MessageToJson(proto, indent=None)
    assert node_from_json_value(value) == node
    # Other spellings proto-JSON allows are read as json_format reads them.
    assert node_from_json_value(json_format.MessageToDict(
        proto, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)) == node
    urlsafe = json.loads(json.dumps(value).replace("+", "-").replace("/", "_"))
    assert node_from_json_value(urlsafe) == node


def test_node_json_value_refuses_what_json_format_refuses() -> None:
    from stages.castore.nodes import node_from_json_value

    digest = base64.b64encode(b"\x01" * 32).decode()
    for bad in [[1], "x", {"directory": 5}, {"nope": {}},
                {"file": {"digest": digest, "size": "-1"}},
                {"file": {"digest": digest, "size": "1x"}},
                {"file": {"digest": digest, "executable": "yes"}},
                {"file": {"digest": "!!!"}},
                {"directory": {"digest": digest}, "file": {"digest": digest}}]:
        with pytest.raises(ValidationError):
            node_from_json_value(bad)

"""NAR export from memory:// stores, and nixbase32.

Expected NAR bytes are written out here with a small independent writer that
follows the format's grammar; the byte-for-byte comparison with `nix-store
--dump` over real trees is in tests/integration/test_nar_vs_nix.py.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nar_oracle import expected_nar, s

from stages.castore import nixbase32
from stages.castore.addresses import Castore
from stages.castore.errors import CorruptionError, NotFoundError, ValidationError
from stages.castore.hashes import format_sha256, parse_sha256
from stages.castore.memory import MemoryBlobService, MemoryDirectoryService
from stages.castore.nar import format_nar_hash, nar_bytes, nar_chunks, nar_hash_and_size
from stages.castore.nodes import Directory, DirectoryNode, FileNode, SymlinkNode, blob_digest
from stages.castore.services import READ_CHUNK


def memory_castore() -> Castore:
    return Castore(MemoryBlobService(), MemoryDirectoryService())


async def put_spec(castore: Castore, spec, name: bytes = b""):
    """Store a tree described as nested values; return its root node.

    bytes: a file; ("x", bytes): an executable file; ("l", target): a
    symlink; dict: a directory of name -> spec.
    """
    uploads: list[Directory] = []
    node = await _build(castore, spec, name, uploads)
    if uploads:
        await castore.directories.put_tree(uploads)  # children before parents
    return node


async def _build(castore: Castore, spec, name: bytes, uploads: list[Directory]):
    if isinstance(spec, bytes):
        return FileNode(name=name, digest=await castore.blobs.put(spec), size=len(spec))
    if isinstance(spec, tuple) and spec[0] == "x":
        return FileNode(name=name, digest=await castore.blobs.put(spec[1]), size=len(spec[1]),
                        executable=True)
    if isinstance(spec, tuple) and spec[0] == "l":
        return SymlinkNode(name=name, target=spec[1])
    children = [await _build(castore, child, child_name, uploads)
                for child_name, child in spec.items()]
    directory = Directory.from_nodes(children)
    uploads.append(directory)
    return directory.as_node(name)


SPECS = {
    "empty-file": b"",
    "file": b"hello\n",
    "file-8-bytes": b"12345678",
    "exec-file": ("x", b"#!/bin/sh\necho hi\n"),
    "symlink": ("l", b"../some/where"),
    "empty-dir": {},
    "mixed-dir": {
        b"b": b"bee",
        b"a": ("x", b""),
        b"B": ("l", b"/abs"),
        b"sub": {b"deeper": {b"f": b"x" * 100}, b"empty": {}},
        b"\xff\xfe": b"non-utf8 name",
        b"a.b": b"dot in name",
    },
}


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
async def test_nar_matches_the_grammar(spec) -> None:
    castore = memory_castore()
    node = await put_spec(castore, spec, b"rootname")
    nar = await nar_bytes(castore, node)
    assert nar == expected_nar(spec)
    digest, size = await nar_hash_and_size(castore, node)
    assert (digest, size) == (hashlib.sha256(nar).digest(), len(nar))


async def test_root_name_is_not_part_of_the_nar() -> None:
    castore = memory_castore()
    a = await nar_bytes(castore, await put_spec(castore, {b"f": b"1"}, b"one"))
    b = await nar_bytes(castore, await put_spec(castore, {b"f": b"1"}, b""))
    assert a == b


async def test_entries_sorted_bytewise_across_kinds() -> None:
    # Directories, files and symlinks interleave in the NAR by name alone.
    castore = memory_castore()
    node = await put_spec(castore, {b"c": {}, b"a": b"", b"b": ("l", b"t"), b"A": {}})
    nar = await nar_bytes(castore, node)
    positions = [nar.index(s(b"name") + s(n)) for n in (b"A", b"a", b"b", b"c")]
    assert positions == sorted(positions)


@given(st.dictionaries(st.binary(min_size=1, max_size=12).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")),
    st.binary(max_size=40) | st.tuples(st.just("x"), st.binary(max_size=20))
    | st.tuples(st.just("l"), st.binary(min_size=1, max_size=20).filter(lambda t: b"\0" not in t)),
    max_size=8))
async def test_flat_directories_match_the_grammar(spec) -> None:
    castore = memory_castore()
    assert await nar_bytes(castore, await put_spec(castore, spec)) == expected_nar(spec)


async def test_large_file_streams_in_bounded_chunks() -> None:
    castore = memory_castore()
    data = bytes(range(256)) * (12 * 4096 + 3)  # ~12 MiB, not a multiple of 8
    node = await put_spec(castore, data)
    sizes = []
    hasher = hashlib.sha256()
    async for chunk in nar_chunks(castore, node):
        assert chunk
        sizes.append(len(chunk))
        hasher.update(chunk)
    assert max(sizes) <= READ_CHUNK + 512 * 1024
    assert len(sizes) > 4
    assert hasher.digest() == hashlib.sha256(expected_nar(data)).digest()


async def test_many_small_files_are_gathered_into_few_chunks() -> None:
    castore = memory_castore()
    spec = {f"f{i:04}".encode(): str(i).encode() for i in range(2000)}
    chunks = [c async for c in nar_chunks(castore, await put_spec(castore, spec))]
    assert b"".join(chunks) == expected_nar(spec)
    assert len(chunks) < 20


# --- errors ------------------------------------------------------------------

async def test_missing_blob_names_its_digest() -> None:
    digest = blob_digest(b"not stored")
    node = FileNode(name=b"f", digest=digest, size=10)
    with pytest.raises(NotFoundError) as info:
        await nar_bytes(memory_castore(), node)
    assert info.value.digest == digest
    assert digest.hex() in str(info.value)


async def test_missing_directory_names_its_digest() -> None:
    missing = Directory(files=[FileNode(name=b"x", digest=bytes(32), size=1)])
    with pytest.raises(NotFoundError) as info:
        await nar_bytes(memory_castore(), missing.as_node(b"d"))
    assert missing.digest.hex() in str(info.value)


async def test_missing_subdirectory_names_its_digest() -> None:
    castore = memory_castore()
    node = await put_spec(castore, {b"sub": {b"f": b"1"}})
    sub = (await castore.directories.get(node.digest)).directories[0]
    del castore.directories.directories[sub.digest]
    with pytest.raises(NotFoundError) as info:
        await nar_bytes(castore, node)
    assert sub.digest.hex() in str(info.value)


async def test_corrupt_blob_is_an_error_naming_it() -> None:
    castore = memory_castore()
    node = await put_spec(castore, b"original bytes")
    castore.blobs.blobs[node.digest] = b"tampered bytes"
    with pytest.raises(CorruptionError) as info:
        await nar_bytes(castore, node)
    assert node.digest.hex() in str(info.value)


async def test_file_size_mismatch() -> None:
    castore = memory_castore()
    node = await put_spec(castore, b"four")
    lying = FileNode(name=b"f", digest=node.digest, size=5)
    with pytest.raises(ValidationError) as info:
        await nar_bytes(castore, lying)
    assert info.value.rule == "file-size"
    assert node.digest.hex() in str(info.value)


async def test_directory_size_mismatch() -> None:
    castore = memory_castore()
    node = await put_spec(castore, {b"f": b"1", b"g": b"2"})
    lying = DirectoryNode(name=b"d", digest=node.digest, size=9)
    with pytest.raises(ValidationError) as info:
        await nar_bytes(castore, lying)
    assert info.value.rule == "directory-size"


async def test_empty_file_needs_no_stored_blob() -> None:
    node = FileNode(name=b"e", digest=blob_digest(b""), size=0)
    assert await nar_bytes(memory_castore(), node) == expected_nar(b"")


# --- nixbase32 and printed hashes --------------------------------------------

# Printed by Nix 2.8: `nix-hash --type TYPE --to-base32 HEX`.
NIX_PRINTED = [
    ("00" * 32, "0" * 52),
    ("ff" * 32, "1" + "z" * 51),
    ("0123456789abcdef" * 4, "1vydmf4nfi9307pwvaw9cx2j60ggrnmqjrs54c0yzkdbi5kla8q1"),
    ("0123456789abcdef0123456789abcdef01234567", "cx2j60ggrnmqjrs54c0yzkdbi5kla8q1"),
    ("0123456789abcdef" * 2, "7grnmqjrs54c0yzkdbi5kla8q1"),
    ("ab" * 64, "2mspaxbmfmspaxbmfmspaxbmfmspaxbmfmspaxbmfmspaxbmfmspaxbmfmspaxbmf"
                "mspaxbmfmspaxbmfmspaxbmfmspaxbmfmspaxb"),
    # The NAR hash of a directory holding one file "a" with "hi\n".
    ("878832cd22b5e038e117b701378558f8a9b6cad7381a0e6d57a9e865d34f85a6",
     "19l59z9nbs59axnhw6iqsz5bdagqb22kf0dp2zhkiq5m4b6k5247"),
]


@pytest.mark.parametrize("hexdigest, printed", NIX_PRINTED, ids=[p for _, p in NIX_PRINTED])
def test_nixbase32_matches_nix(hexdigest: str, printed: str) -> None:
    assert nixbase32.encode(bytes.fromhex(hexdigest)) == printed
    assert nixbase32.decode(printed) == bytes.fromhex(hexdigest)


@given(st.binary(max_size=80))
def test_nixbase32_round_trip(data: bytes) -> None:
    text = nixbase32.encode(data)
    assert len(text) == nixbase32.encoded_length(len(data))
    assert set(text) <= set(nixbase32.ALPHABET)
    assert nixbase32.decode(text) == data


@pytest.mark.parametrize("text, complaint", [
    ("e" + "0" * 51, "'e' at position 0"),
    ("0" * 51, "cannot encode"),
    ("2" + "0" * 51, "more than 32 bytes"),
    ("0" * 51 + "U", "'U' at position 51"),
])
def test_nixbase32_decode_errors(text: str, complaint: str) -> None:
    with pytest.raises(nixbase32.NixBase32Error, match=complaint):
        nixbase32.decode(text, 32 if len(text) == 52 else None)


def test_format_nar_hash() -> None:
    digest = bytes.fromhex(NIX_PRINTED[-1][0])
    assert format_nar_hash(digest) == "sha256:" + NIX_PRINTED[-1][1]
    assert format_sha256(digest) == format_nar_hash(digest)
    assert parse_sha256(format_nar_hash(digest)) == digest
    with pytest.raises(ValueError, match="32 bytes"):
        format_sha256(b"short")
    with pytest.raises(nixbase32.NixBase32Error, match="sha256:"):
        parse_sha256("md5:" + NIX_PRINTED[-1][1])


async def test_streaming_memory_stays_bounded() -> None:
    # The blob already sits in the memory store; rendering its NAR must only
    # allocate about a chunk at a time, not another copy of the blob.
    import tracemalloc

    castore = memory_castore()
    data = os.urandom(48 << 20)
    node = await put_spec(castore, {b"big": data, b"small": b"s"})
    del data
    tracemalloc.start()
    try:
        size = 0
        async for chunk in nar_chunks(castore, node):
            size += len(chunk)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 48 << 20
    assert peak < 8 << 20, f"peak {peak / (1 << 20):.1f} MiB while streaming a 48 MiB blob"


async def test_corruption_in_a_local_store_is_caught(tmp_path) -> None:
    from stages.castore.addresses import open_castore

    address = f"local://{tmp_path / 'store'}"
    castore = open_castore(address, address)
    try:
        node = await put_spec(castore, {b"a": b"A" * 5000, b"b": b"B" * 7000})
        assert await nar_bytes(castore, node) == expected_nar({b"a": b"A" * 5000,
                                                               b"b": b"B" * 7000})
    finally:
        await castore.aclose()
    packs = sorted((tmp_path / "store").rglob("*.pack"))
    assert packs, "the local store keeps blobs in pack files"
    for pack in packs:
        raw = bytearray(pack.read_bytes())
        where = raw.find(b"B" * 7000)
        if where >= 0:
            raw[where + 3000] ^= 0xFF
            pack.write_bytes(bytes(raw))
    castore = open_castore(address, address)
    try:
        with pytest.raises(CorruptionError) as info:
            await nar_bytes(castore, node)
        assert blob_digest(b"B" * 7000).hex() in str(info.value)
    finally:
        await castore.aclose()

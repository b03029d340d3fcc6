"""Ingest of what only root can read or make: files without read bits for
their owner (the service runs as root and must read a builder's outputs
whatever their modes) and device nodes (refused, naming the path)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import blake3
import pytest

from stages.castore.addresses import Castore
from stages.castore.errors import IngestError
from stages.castore.ingest import ingest_path
from stages.castore.nodes import FileNode

pytestmark = pytest.mark.root


@pytest.mark.parametrize("mode,executable", [(0o100, True), (0o011, False), (0o000, False)],
                         ids=["100", "011", "000"])
async def test_root_reads_a_file_without_read_bits(castore: Castore, tmp_path: Path, mode: int,
                                                   executable: bool) -> None:
    path = tmp_path / "tool"
    path.write_bytes(b"#!/bin/sh\n")
    os.chmod(path, mode)
    node = await ingest_path(castore, path)
    assert node == FileNode(name=b"tool", digest=blake3.blake3(b"#!/bin/sh\n").digest(),
                            size=10, executable=executable)
    assert await castore.blobs.get(node.digest) == b"#!/bin/sh\n"


async def test_device_is_refused(castore: Castore, tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    os.mknod(tmp_path / "tree" / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(IngestError, match=r"null.*character device"):
        await ingest_path(castore, tmp_path / "tree")

"""ocibuild's content-addressed store (castore), wire-compatible with tvix.

What users need is here:

- the data model: :class:`FileNode`, :class:`DirectoryNode`,
  :class:`SymlinkNode` (together :data:`Node`) and :class:`Directory`, with
  their protobuf and proto-JSON conversions;
- the errors, rooted at :class:`CastoreError`;
- the service interfaces (:class:`BlobService`, :class:`DirectoryService`)
  and :func:`open_castore`, which picks backends by address;
- :func:`ingest_path` (a filesystem path into the store);
- NAR export: :func:`nar_chunks`, :func:`nar_hash_and_size`,
  :func:`format_nar_hash`.

Caveats:

- Importing this package loads protobuf and blake3, nothing heavier. Backends
  (the local store, gRPC) load when an address asks for them, the FUSE
  filesystem only from :mod:`stages.castore.fuse`, and :func:`ingest_path` on
  first use.
"""

from __future__ import annotations

from typing import Any

from stages.castore.addresses import (
    Castore,
    default_store_dir,
    open_blob_service,
    open_castore,
    open_directory_service,
)
from stages.castore.errors import (
    CastoreError,
    CorruptionError,
    IngestError,
    NotFoundError,
    StoreError,
    ValidationError,
)
from stages.castore.nar import (
    format_nar_hash,
    nar_bytes,
    nar_chunks,
    nar_hash_and_size,
    write_nar,
)
from stages.castore.nodes import (
    EMPTY_DIRECTORY_DIGEST,
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    blob_digest,
    directory_from_proto,
    directory_to_proto,
    node_from_json,
    node_from_proto,
    node_to_json,
    node_to_proto,
)
from stages.castore.services import (
    BlobReader,
    BlobService,
    BlobWriter,
    DirectoryPutter,
    DirectoryService,
)

__all__ = [
    "EMPTY_DIRECTORY_DIGEST",
    "BlobReader",
    "BlobService",
    "BlobWriter",
    "Castore",
    "CastoreError",
    "CorruptionError",
    "Directory",
    "DirectoryNode",
    "DirectoryPutter",
    "DirectoryService",
    "FileNode",
    "IngestError",
    "Node",
    "NotFoundError",
    "StoreError",
    "SymlinkNode",
    "ValidationError",
    "blob_digest",
    "default_store_dir",
    "directory_from_proto",
    "directory_to_proto",
    "format_nar_hash",
    "ingest_path",
    "nar_bytes",
    "nar_chunks",
    "nar_hash_and_size",
    "node_from_json",
    "node_from_proto",
    "node_to_json",
    "node_to_proto",
    "open_blob_service",
    "open_castore",
    "open_directory_service",
    "write_nar",
]


def __getattr__(name: str) -> Any:
    # ingest pulls in threads and filesystem walking; load it on first use.
    if name == "ingest_path":
        from stages.castore.ingest import ingest_path

        return ingest_path
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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

- Importing this package loads nothing: each name loads its module on first
  use. Backends (the local store, gRPC) load when an address asks for them,
  the FUSE filesystem only from :mod:`stages.castore.fuse`.
"""

from __future__ import annotations

from stages.util.lazy import lazy_exports

# Where each public name lives. Loaded on first use (PEP 562): a process that
# needs one corner of the package (the FUSE mount server needs nodes and the
# local store) does not pay for the rest (asyncio, NAR, the backends).
_HOMES = {
    "stages.castore.addresses": ("Castore", "default_store_dir", "open_blob_service",
                                 "open_castore", "open_directory_service"),
    "stages.castore.errors": ("CastoreError", "CorruptionError", "IngestError",
                              "NotFoundError", "StoreError", "ValidationError"),
    "stages.castore.nar": ("format_nar_hash", "nar_bytes", "nar_chunks", "nar_hash_and_size",
                           "write_nar"),
    "stages.castore.nodes": ("EMPTY_DIRECTORY_DIGEST", "Directory", "DirectoryNode", "FileNode",
                             "Node", "SymlinkNode", "blob_digest", "directory_from_proto",
                             "directory_to_proto", "node_from_json", "node_from_proto",
                             "node_to_json", "node_to_proto"),
    "stages.castore.services": ("BlobReader", "BlobService", "BlobWriter", "DirectoryPutter",
                                "DirectoryService"),
    "stages.castore.ingest": ("ingest_path",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

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

__getattr__ = lazy_exports(__name__, _HOME_OF)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

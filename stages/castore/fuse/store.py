"""The synchronous store reader the FUSE server reads castore through.

The mount server runs in its own process and answers the kernel from a single
trio thread, so it needs plain, blocking, positional reads, not the async
services. :class:`StoreReader` is that small interface; the persistent local
store (:mod:`stages.castore.local`) implements it directly.

Caveats:

- ``memory://`` stores live inside one process and cannot be shared with the
  mount server; they are refused with a clear error.
- Remote stores (``grpc+unix``, ``grpc+http``, ``grpc+https``) are read
  through :class:`stages.castore.grpc_client.GrpcSyncReader`: directories and
  sizes cached, each blob fetched whole (verified) into an unlinked spool
  file at its first open and read from there (the protocol has no range
  reads). A remote store that is down at mount time is a clear StoreError.
- ``read_blob_at`` and ``map_blob`` are unverified; the FUSE layer
  calls ``verify_blob`` once per blob per server lifetime before serving its
  bytes (``on_chunk`` lets it see the bytes as they are hashed).
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

from stages.castore.addresses import default_address
from stages.castore.errors import StoreError
from stages.castore.nodes import Directory

if TYPE_CHECKING:
    from stages.castore.local import BlobMap

__all__ = ["StoreReader", "check_address", "check_servable", "open_reader", "resolve_addresses"]


@runtime_checkable
class StoreReader(Protocol):
    """What the FUSE server needs from a store: sizes, ranges, checks, dirs."""

    def blob_size(self, digest: bytes) -> int | None: ...

    def read_blob_at(self, digest: bytes, offset: int, n: int) -> bytes: ...

    def map_blob(self, digest: bytes) -> BlobMap: ...

    def verify_blob(self, digest: bytes,
                    on_chunk: Callable[[int, memoryview], None] | None = None) -> None: ...

    def get_directory(self, digest: bytes) -> Directory | None: ...


def resolve_addresses(blob_address: str | None,
                      directory_address: str | None) -> tuple[str, str]:
    """Fill in unset addresses as the rest of ocibuild does (env, then default)."""
    blob = blob_address or os.environ.get("BLOB_SERVICE_ADDR") or default_address()
    directory = (directory_address or os.environ.get("DIRECTORY_SERVICE_ADDR")
                 or default_address())
    return blob, directory


def check_address(address: str) -> Path:
    """The store directory of a ``local://`` address, or StoreError saying why not."""
    url = urllib.parse.urlsplit(address)
    if url.scheme == "local":
        if url.netloc or not url.path.startswith("/"):
            raise StoreError(address, "a local store address is local:///absolute/dir")
        return Path(url.path)
    if url.scheme == "memory":
        raise StoreError(address, "a memory:// store lives inside one process and cannot "
                                  "be served by the FUSE mount server; use local:///abs/dir")
    if not url.scheme:
        raise StoreError(address, "not a URL; the FUSE mount serves local:///abs/dir stores")
    if url.scheme in _GRPC_SCHEMES:
        raise StoreError(address, f"a {url.scheme}:// store is remote and has no store "
                                  f"directory")
    raise StoreError(address, f"the FUSE mount cannot read {url.scheme}:// stores; "
                              f"use local:///abs/dir or grpc+unix:///abs/path")


_GRPC_SCHEMES = ("grpc+unix", "grpc+http", "grpc+https")


def _is_grpc(address: str) -> bool:
    return urllib.parse.urlsplit(address).scheme in _GRPC_SCHEMES


def check_servable(address: str) -> None:
    """StoreError unless the FUSE mount can serve the address (local or gRPC)."""
    if _is_grpc(address):
        from stages.castore.grpc_client import parse_address

        parse_address(address)
        return
    check_address(address)


class _SplitReader:
    """Blobs from one store, directories from another."""

    def __init__(self, blobs: StoreReader, directories: StoreReader) -> None:
        self._blobs = blobs
        self._dirs = directories
        self.blob_size = blobs.blob_size
        self.read_blob_at = blobs.read_blob_at
        if hasattr(blobs, "map_blob"):  # the FUSE layer looks for it
            self.map_blob = blobs.map_blob
        self.verify_blob = blobs.verify_blob
        self.get_directory = directories.get_directory


def open_reader(blob_address: str | None = None,
                directory_address: str | None = None) -> StoreReader:
    """Open the store(s) named by the addresses for synchronous reading."""
    blob_address, directory_address = resolve_addresses(blob_address, directory_address)
    blob_remote, dir_remote = _is_grpc(blob_address), _is_grpc(directory_address)
    if not blob_remote and not dir_remote:
        blob_dir = check_address(blob_address)
        dir_dir = check_address(directory_address)
        from stages.castore.local import open_local_store

        blobs = open_local_store(blob_dir)
        if dir_dir == blob_dir:
            return blobs
        return _SplitReader(blobs, open_local_store(dir_dir))
    from stages.castore.grpc_client import GrpcSyncReader

    remote = GrpcSyncReader(blob_address if blob_remote else None,
                            directory_address if dir_remote else None)
    if blob_remote and dir_remote:
        return remote
    from stages.castore.local import open_local_store

    if blob_remote:
        return _SplitReader(remote, open_local_store(check_address(directory_address)))
    return _SplitReader(open_local_store(check_address(blob_address)), remote)

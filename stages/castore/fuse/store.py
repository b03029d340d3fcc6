"""The synchronous store reader the FUSE server reads castore through.

The mount server runs in its own process and answers the kernel from a single
trio thread, so it needs plain, blocking, positional reads, not the async
services. :class:`StoreReader` is that small interface; the persistent local
store (:mod:`stages.castore.local`) implements it directly.

Caveats:

- ``memory://`` stores live inside one process and cannot be shared with the
  mount server; they are refused with a clear error.
- Each backend opens its own reader (:attr:`Backend.reader
  <stages.castore.addresses.Backend.reader>`). Remote stores (``grpc+unix``,
  ``grpc+http``, ``grpc+https``) are read through
  :class:`stages.grpc.castore_reader.GrpcSyncReader`: directories and
  sizes cached, each blob fetched whole (verified) into an unlinked spool
  file at its first open and read from there (the protocol has no range
  reads). A remote store that is down at mount time is a clear StoreError.
- ``read_blob_at`` and ``map_blob`` are unverified; the FUSE layer
  calls ``verify_blob`` once per blob per server lifetime before serving its
  bytes (``on_chunk`` lets it see the bytes as they are hashed).
"""

from __future__ import annotations

from stages.castore.addresses import Backend, backend_for, resolve_address
from stages.castore.errors import StoreError
from stages.castore.services import StoreReader

__all__ = ["StoreReader", "check_servable", "open_reader", "resolve_addresses"]


def resolve_addresses(blob_address: str | None,
                      directory_address: str | None) -> tuple[str, str]:
    """Fill in unset addresses as the rest of ocibuild does (env, then default)."""
    return resolve_address("blob", blob_address), resolve_address("directory", directory_address)


def _servable(address: str) -> Backend:
    backend, url = backend_for(address)
    if backend.reader is None:
        raise StoreError(address, f"{backend.not_servable}; the FUSE mount serves "
                                  f"local:///abs/dir and grpc+unix:///abs/path stores")
    if backend.check is not None:
        backend.check(address)
    return backend


def check_servable(address: str) -> None:
    """StoreError unless the FUSE mount can serve the address (local or gRPC)."""
    _servable(address)


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
    """Open the store(s) named by the addresses for synchronous reading.

    One reader when both addresses are the same, else blobs from one and
    directories from the other.
    """
    blob_address, directory_address = resolve_addresses(blob_address, directory_address)
    blob_backend = _servable(blob_address)
    dir_backend = _servable(directory_address)
    assert blob_backend.reader is not None and dir_backend.reader is not None
    if blob_address == directory_address:
        return blob_backend.reader(blob_address, directory_address)
    return _SplitReader(blob_backend.reader(blob_address, None),
                        dir_backend.reader(None, directory_address))

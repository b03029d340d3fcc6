"""Choosing castore backends by address, as tvix does.

Addresses are URLs:

- ``memory://``: in-process, nothing persisted.
- ``local:///abs/dir``: ocibuild's persistent on-disk store (the embedded
  default). Without an address, the store lives in ``$OCIBUILD_STORE`` if set,
  else ``$XDG_DATA_HOME/ocibuild/store`` (``~/.local/share/ocibuild/store``).
- ``grpc+unix:///abs/path``, ``grpc+http://host:port``,
  ``grpc+https://host:port``: a remote castore over gRPC.

``BLOB_SERVICE_ADDR`` and ``DIRECTORY_SERVICE_ADDR`` select the backends
when no address is passed explicitly.
"""

from __future__ import annotations

import importlib
import os
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import attrs

from stages.castore.errors import StoreError

if TYPE_CHECKING:
    from stages.castore.services import BlobService, DirectoryService

__all__ = [
    "Castore",
    "default_store_dir",
    "open_blob_service",
    "open_castore",
    "open_directory_service",
]

BlobFactory = Callable[[urllib.parse.SplitResult, str], "BlobService"]
DirectoryFactory = Callable[[urllib.parse.SplitResult, str], "DirectoryService"]

def _memory_blobs(url: urllib.parse.SplitResult, addr: str) -> BlobService:
    from stages.castore.memory import MemoryBlobService

    return MemoryBlobService()


def _memory_directories(url: urllib.parse.SplitResult, addr: str) -> DirectoryService:
    from stages.castore.memory import MemoryDirectoryService

    return MemoryDirectoryService()


# scheme -> factory; backends register themselves here.
BLOB_BACKENDS: dict[str, BlobFactory] = {"memory": _memory_blobs}
DIRECTORY_BACKENDS: dict[str, DirectoryFactory] = {"memory": _memory_directories}
# scheme -> the module that registers it, imported when an address asks for it
# (gRPC alone costs ~0.1 s to import).
BACKEND_MODULES = {
    "local": "stages.castore.local",
    "grpc+unix": "stages.castore.grpc_client",
    "grpc+http": "stages.castore.grpc_client",
    "grpc+https": "stages.castore.grpc_client",
}


def default_store_dir() -> Path:
    explicit = os.environ.get("OCIBUILD_STORE")
    if explicit:
        return Path(explicit)
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data_home) / "ocibuild" / "store"


def default_address() -> str:
    return "local://" + str(default_store_dir().absolute())


def _split(address: str) -> urllib.parse.SplitResult:
    url = urllib.parse.urlsplit(address)
    if not url.scheme:
        raise StoreError(address, "not a URL; expected e.g. memory://, local:///abs/dir, "
                                  "grpc+unix:///abs/path or grpc+http://host:port")
    return url


def _load_backend(scheme: str) -> None:
    # Importing a backend module registers its schemes.
    module = BACKEND_MODULES.get(scheme)
    if module is not None and scheme not in BLOB_BACKENDS:
        importlib.import_module(module)


def _known(table: dict) -> str:
    return ", ".join(sorted(set(table) | set(BACKEND_MODULES)))


def open_blob_service(address: str | None = None) -> BlobService:
    address = address or os.environ.get("BLOB_SERVICE_ADDR") or default_address()
    url = _split(address)
    _load_backend(url.scheme)
    factory = BLOB_BACKENDS.get(url.scheme)
    if factory is None:
        raise StoreError(address, f"unknown blob service scheme {url.scheme!r}; "
                                  f"known: {_known(BLOB_BACKENDS)}")
    return factory(url, address)


def open_directory_service(address: str | None = None) -> DirectoryService:
    address = address or os.environ.get("DIRECTORY_SERVICE_ADDR") or default_address()
    url = _split(address)
    _load_backend(url.scheme)
    factory = DIRECTORY_BACKENDS.get(url.scheme)
    if factory is None:
        raise StoreError(address, f"unknown directory service scheme {url.scheme!r}; "
                                  f"known: {_known(DIRECTORY_BACKENDS)}")
    return factory(url, address)


@attrs.frozen
class Castore:
    """A blob service and a directory service used together."""

    blobs: BlobService
    directories: DirectoryService

    async def aclose(self) -> None:
        await self.blobs.aclose()
        await self.directories.aclose()


def open_castore(blob_address: str | None = None,
                 directory_address: str | None = None) -> Castore:
    return Castore(open_blob_service(blob_address), open_directory_service(directory_address))

"""Choosing castore backends by address, as tvix does.

Addresses are URLs:

- ``memory://``: in-process, nothing persisted.
- ``local:///abs/dir``: ocibuild's persistent on-disk store (the embedded
  default). Without an address, the store lives in ``$OCIBUILD_STORE`` if set,
  else in the user's data directory (:func:`stages.util.dirs.data_dir`:
  ``$XDG_DATA_HOME/ocibuild/store``, ``~/.local/share/ocibuild/store``).
- ``grpc+unix:///abs/path``, ``grpc+http://host:port``,
  ``grpc+https://host:port``: a remote castore over gRPC.

``BLOB_SERVICE_ADDR`` and ``DIRECTORY_SERVICE_ADDR`` select the backends
when no address is passed explicitly.

Each scheme is served by a :class:`Backend`. castore's own (``memory``,
``local``) are known here by module; any other comes from an installed
distribution's entry point in the group ``ocibuild.castore_backends``,
named by the scheme (ocibuild's gRPC client registers ``grpc+unix``,
``grpc+http`` and ``grpc+https`` that way, in pyproject.toml). castore
itself never imports a backend that lives above it, and a new backend needs
no change here.

Caveats:

- A backend's module is imported when an address first asks for its scheme
  (gRPC alone costs ~0.1 s to import); the entry points are read once per
  process, only for a scheme that is not castore's own.
"""

from __future__ import annotations

import functools
import importlib
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

import attrs

from stages.castore.errors import StoreError
from stages.util.dirs import data_dir
from stages.util.plugins import load_plugin, plugin_names

if TYPE_CHECKING:
    from stages.castore.services import BlobService, DirectoryService, StoreReader

__all__ = [
    "BACKEND_GROUP",
    "Backend",
    "Castore",
    "backend_for",
    "default_address",
    "default_store_dir",
    "open_blob_service",
    "open_castore",
    "open_directory_service",
    "open_service",
    "resolve_address",
]

BACKEND_GROUP = "ocibuild.castore_backends"
#: castore's own backends: scheme -> "module:attribute" of its Backend.
_OWN = {
    "memory": "stages.castore.memory:BACKEND",
    "local": "stages.castore.local:BACKEND",
}
_ENV = {"blob": "BLOB_SERVICE_ADDR", "directory": "DIRECTORY_SERVICE_ADDR"}
Kind = Literal["blob", "directory"]


@attrs.frozen(kw_only=True)
class Backend:
    """How the stores of one address scheme are opened.

    ``blobs`` and ``directories`` open the async services from the split
    address and the address as given (for messages). ``reader`` opens the
    blocking :class:`~stages.castore.fuse.store.StoreReader` the FUSE mount
    server reads through, from a blob address and a directory address (one
    of them may be None: that side is another backend's); None when the
    mount cannot serve this scheme, with ``not_servable`` saying why.
    ``check`` refuses a malformed address (StoreError) without opening it.
    """

    blobs: Callable[[urllib.parse.SplitResult, str], BlobService]
    directories: Callable[[urllib.parse.SplitResult, str], DirectoryService]
    reader: Callable[[str | None, str | None], StoreReader] | None = None
    not_servable: str = "the FUSE mount cannot read these stores"
    check: Callable[[str], object] | None = None


def default_store_dir() -> Path:
    explicit = os.environ.get("OCIBUILD_STORE")
    if explicit:
        return Path(explicit)
    return data_dir() / "store"


def default_address() -> str:
    return "local://" + str(default_store_dir().absolute())


def resolve_address(kind: Kind, address: str | None) -> str:
    """``address``, else the kind's environment variable, else the default store."""
    return address or os.environ.get(_ENV[kind]) or default_address()


def _split(address: str) -> urllib.parse.SplitResult:
    url = urllib.parse.urlsplit(address)
    if not url.scheme:
        raise StoreError(address, "not a URL; expected e.g. memory://, local:///abs/dir, "
                                  "grpc+unix:///abs/path or grpc+http://host:port")
    return url


def _known() -> str:
    return ", ".join(f"{s}://" for s in sorted(set(_OWN) | set(plugin_names(BACKEND_GROUP))))


@functools.cache
def _backend(scheme: str) -> Backend | None:
    own = _OWN.get(scheme)
    if own is not None:
        module, _, attr = own.partition(":")
        found = getattr(importlib.import_module(module), attr)
    else:
        found = load_plugin(BACKEND_GROUP, scheme)
    if found is not None and not isinstance(found, Backend):
        raise TypeError(f"castore backend for {scheme}:// is {type(found).__name__}, "
                        f"not a Backend")
    return found


def backend_for(address: str) -> tuple[Backend, urllib.parse.SplitResult]:
    """The backend serving ``address``, or StoreError naming the known schemes."""
    url = _split(address)
    backend = _backend(url.scheme)
    if backend is None:
        raise StoreError(address, f"unknown store scheme {url.scheme!r}; known: {_known()}")
    return backend, url


@overload
def open_service(kind: Literal["blob"], address: str | None = None) -> BlobService: ...
@overload
def open_service(kind: Literal["directory"], address: str | None = None) -> DirectoryService: ...
def open_service(kind: Kind, address: str | None = None) -> BlobService | DirectoryService:
    """The blob or directory service at ``address`` (see :func:`resolve_address`)."""
    address = resolve_address(kind, address)
    backend, url = backend_for(address)
    return (backend.blobs if kind == "blob" else backend.directories)(url, address)


def open_blob_service(address: str | None = None) -> BlobService:
    return open_service("blob", address)


def open_directory_service(address: str | None = None) -> DirectoryService:
    return open_service("directory", address)


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

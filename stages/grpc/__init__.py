"""ocibuild over gRPC: the castore and the build service, servers and clients.

- addresses, channels, the one retry policy and the status-code boundary:
  :mod:`stages.grpc.channels`;
- the castore (``tvix.castore.v1``): :mod:`stages.grpc.castore_client`
  (async services, the ``grpc+...`` store backend),
  :mod:`stages.grpc.castore_reader` (the FUSE mount server's blocking
  reader), :mod:`stages.grpc.castore_server`; the fast chunk codec in
  :mod:`stages.grpc.wire`;
- the build service (``tvix.build.v1``): :mod:`stages.grpc.build_service`
  (servicer and client);
- ``ocibuild serve`` (:mod:`stages.grpc.serve`) and remote builds that
  upload their inputs first (:mod:`stages.grpc.remote`).

This package sits above :mod:`stages.service`; nothing below imports it
(the store and build-service backends it offers are found through entry
points, see pyproject.toml).
"""

from __future__ import annotations

from stages.util.lazy import lazy_exports

_HOMES = {
    "stages.grpc.channels": ("GrpcOptions", "parse_address"),
    "stages.grpc.castore_client": ("GrpcBlobService", "GrpcDirectoryService"),
    "stages.grpc.castore_reader": ("GrpcSyncReader",),
    "stages.grpc.castore_server": ("add_castore_servicers", "start_castore_server"),
    "stages.grpc.build_service": ("BuildServicer", "GrpcBuildService", "add_build_servicer"),
    "stages.grpc.serve": ("serve",),
    "stages.grpc.remote": ("remote_build", "remote_builds"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME_OF)

__getattr__ = lazy_exports(__name__, _HOME_OF)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""Build services by address, as tvix spells them (``BUILD_SERVICE_ADDR``).

- ``oci:///abs/state/dir``: :class:`~stages.service.oci.OciBuildService`
  keeping its state there, building in runc containers;
- ``bwrap:///abs/state/dir``: the same service, building with bubblewrap
  (the same sandbox, :mod:`stages.oci.bwrap`);
- ``dummy://``: refuses every build (for wiring tests);
- without an address: ``oci://`` + the default state directory
  (:func:`stages.service.runs.default_state_dir`);
- any other scheme: an installed distribution's entry point in the group
  ``ocibuild.build_services``, named by the scheme: a callable taking the
  address and options (ocibuild's gRPC client registers ``grpc+unix``,
  ``grpc+http`` and ``grpc+https``, its Ray client ``ray``, in
  pyproject.toml). The service layer never imports the layers above it.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

from stages.errors import ServiceError
from stages.service.base import BuildService, DummyBuildService
from stages.service.oci import OciBuildService
from stages.service.runs import default_state_dir
from stages.util.plugins import load_plugin, plugin_names

__all__ = ["BUILD_SERVICE_GROUP", "LOCAL_SCHEMES", "open_build_service"]

BUILD_SERVICE_GROUP = "ocibuild.build_services"
#: The schemes of the service on this machine, by the runtime they build with.
LOCAL_SCHEMES = {"oci": "runc", "bwrap": "bwrap"}


def open_build_service(address: str | None = None, **kw: Any) -> BuildService:
    """A build service by address (``BUILD_SERVICE_ADDR`` when None).

    ``kw`` goes to OciBuildService (jobs, keep, timeout, stores, ...), or
    to a plugin's opener (which refuses what it does not take).
    """
    address = address or os.environ.get("BUILD_SERVICE_ADDR")
    if not address:
        return OciBuildService(default_state_dir(), **kw)
    url = urllib.parse.urlsplit(address)
    if url.scheme == "dummy":
        return DummyBuildService()
    if url.scheme in LOCAL_SCHEMES:
        if url.netloc or not url.path.startswith("/"):
            raise ServiceError(address, f"an {url.scheme}:// address needs an absolute path: "
                                        f"{url.scheme}:///abs/state/dir")
        return OciBuildService(url.path, runtime=LOCAL_SCHEMES[url.scheme], **kw)
    opener = load_plugin(BUILD_SERVICE_GROUP, url.scheme) if url.scheme else None
    if opener is None:
        known = ["dummy://", "oci:///abs/path", "bwrap:///abs/path",
                 *(f"{s}://" for s in plugin_names(BUILD_SERVICE_GROUP))]
        raise ServiceError(address, f"unknown build service scheme {url.scheme!r}; known: "
                                    f"{', '.join(known)}")
    service: BuildService = opener(address, **kw)
    return service

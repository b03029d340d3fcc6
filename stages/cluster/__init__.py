"""Builds across machines on a Ray cluster (``ray://`` build service addresses).

- :mod:`stages.cluster.service`: :class:`RayBuildService`, the client side:
  one actor per node offering the ``ocibuild`` resource, builds placed on
  them, lost nodes' builds run again elsewhere;
- :mod:`stages.cluster.node`: :class:`BuildNode`, the actor: a node's
  :class:`~stages.service.OciBuildService` with a local cache of the
  shared castore.

Ray itself (PyPI ``ray``) is an optional dependency: ``ocibuild[ray]``.
"""

from __future__ import annotations

from stages.util.lazy import lazy_exports

_HOME_OF = {"RayBuildService": "stages.cluster.service",
            "open_ray_build_service": "stages.cluster.service",
            "BuildNode": "stages.cluster.node"}

__all__ = ["BuildNode", "RayBuildService", "open_ray_build_service"]

__getattr__ = lazy_exports(__name__, _HOME_OF)

"""The build service: ``do_build(request) -> Build`` and what runs it here.

- :class:`BuildService`, the interface; :func:`open_build_service` picks an
  implementation by address (:mod:`stages.service.addresses`);
- :class:`OciBuildService`, builds as seven-stage graphs in runc
  containers (:mod:`stages.service.oci`);
- instances on a state directory and the recovery of dead ones
  (:mod:`stages.service.recovery`);
- run records: the builds of a run, their results, the list of runs
  (:mod:`stages.service.runs`), and their pruning (:mod:`stages.service.prune`).

Importing this package loads nothing of the build machinery (the pipeline,
the graph, the request model): a starting service spawns its FUSE mount
server first and imports them while that boots.
"""

from __future__ import annotations

from stages.util.lazy import lazy_exports

_HOMES = {
    "stages.service.base": ("BuildService", "DummyBuildService"),
    "stages.service.oci": ("OciBuildService",),
    "stages.service.addresses": ("open_build_service",),
    "stages.service.recovery": ("cleanup_dead_instances",),
    "stages.service.runs": ("build_result", "default_state_dir", "list_runs",
                            "load_build_specs"),
    "stages.service.prune": ("prune_runs",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "BuildService",
    "DummyBuildService",
    "OciBuildService",
    "build_result",
    "cleanup_dead_instances",
    "default_state_dir",
    "list_runs",
    "load_build_specs",
    "open_build_service",
    "prune_runs",
]

__getattr__ = lazy_exports(__name__, _HOME_OF)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

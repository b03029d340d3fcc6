"""OCI plumbing for builds: user-namespace id maps, bundle layout, the runc driver.

The spec and bundle stages themselves live in ``stages.spec`` and
``stages.bundle``; this package holds what they and the run stage share.
"""

from stages.oci.idmap import FALLBACK_START, IdMap, IdMapping, load_idmap
from stages.oci.layout import BundleLayout
from stages.oci.runc import RuncContainer, cleanup_stale_containers, list_containers

__all__ = [
    "FALLBACK_START",
    "BundleLayout",
    "IdMap",
    "IdMapping",
    "RuncContainer",
    "cleanup_stale_containers",
    "list_containers",
    "load_idmap",
    "validate_config",
]


def __getattr__(name: str):  # noqa: ANN202
    # validate_config pulls in jsonschema (~80 ms): only for those who use it.
    if name == "validate_config":
        from stages.oci.schema import validate_config

        return validate_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

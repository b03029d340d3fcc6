"""OCI plumbing for builds: user-namespace id maps, bundle layout, the runc driver.

The spec and bundle stages themselves live in ``stages.spec`` and
``stages.bundle``; this package holds what they and the run stage share.
"""

from __future__ import annotations

from stages.util.lazy import lazy_exports

__all__ = [
    "FALLBACK_START",
    "BundleLayout",
    "IdMap",
    "IdMapping",
    "RuncContainer",
    "cleanup_stale_containers",
    "check_traversable",
    "list_containers",
    "load_idmap",
    "validate_config",
]

# Loaded on first use (PEP 562): a service starting its mount server needs the
# id map, not the request model behind the layout, nor jsonschema (~80 ms)
# behind validate_config.
_HOME_OF = {
    "FALLBACK_START": "stages.oci.idmap", "IdMap": "stages.oci.idmap",
    "IdMapping": "stages.oci.idmap", "load_idmap": "stages.oci.idmap",
    "BundleLayout": "stages.oci.layout", "check_traversable": "stages.oci.layout",
    "RuncContainer": "stages.oci.runc", "cleanup_stale_containers": "stages.oci.runc",
    "list_containers": "stages.oci.runc", "validate_config": "stages.oci.schema",
}

__getattr__ = lazy_exports(__name__, _HOME_OF)

"""Validation of config.json against the OCI runtime-spec JSON schema.

The schema (runtime-spec 1.0.2 with the later fixes that runc 1.1
implements) is not shipped in the package: it is read from
``$OCI_RUNTIME_SPEC_SCHEMA_DIR`` or else from where Debian's
``golang-github-opencontainers-specs-dev`` installs it (``make install``
does). Its files ``$ref`` each other by relative name
(``defs.json#/...``), so all of them are loaded into one
``referencing.Registry`` under ``file://`` URIs.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from stages.errors import SpecError

__all__ = ["DEBIAN_SCHEMA_DIR", "config_validator", "default_schema_dir", "validate_config"]

DEBIAN_SCHEMA_DIR = Path("/usr/share/gocode/src/github.com/opencontainers/runtime-spec/schema")


def default_schema_dir() -> Path:
    env = os.environ.get("OCI_RUNTIME_SPEC_SCHEMA_DIR")
    if env:
        return Path(env)
    return DEBIAN_SCHEMA_DIR


@functools.cache
def config_validator(schema_dir: Path | None = None) -> jsonschema.Draft4Validator:
    """A Draft 4 validator for config-schema.json with all its $refs resolvable."""
    d = (schema_dir or default_schema_dir()).resolve()
    if not (d / "config-schema.json").exists():
        raise SpecError("schema", "schema-missing",
                        f"no config-schema.json in {d}: install the Debian package "
                        "golang-github-opencontainers-specs-dev (make install) "
                        "or set OCI_RUNTIME_SPEC_SCHEMA_DIR")
    registry: Registry = Registry()
    for f in sorted(d.glob("*.json")):
        registry = registry.with_resource(
            f.as_uri(), Resource.from_contents(json.loads(f.read_text()),
                                               default_specification=DRAFT4))
    root = registry[(d / "config-schema.json").as_uri()].contents
    root = {**root, "id": (d / "config-schema.json").as_uri()}
    return jsonschema.Draft4Validator(root, registry=registry)


def validate_config(config: dict, schema_dir: Path | None = None) -> None:
    """Raise SpecError naming every place where ``config`` breaks the schema."""
    errors = sorted(config_validator(schema_dir).iter_errors(config), key=lambda e: e.path)
    if errors:
        detail = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                           for e in errors[:5])
        raise SpecError("config.json", "oci-schema", f"does not match the OCI schema: {detail}")

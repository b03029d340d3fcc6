"""Lazy package attributes: a package's names load their modules on first use."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from stages.util.lazy import lazy_exports


def test_a_name_loads_its_home_once(monkeypatch) -> None:
    pkg = types.ModuleType("fakepkg")
    monkeypatch.setitem(sys.modules, "fakepkg", pkg)
    monkeypatch.setattr(pkg, "__getattr__", lazy_exports("fakepkg", {"dumps": "json"}),
                        raising=False)
    import json

    assert pkg.dumps is json.dumps
    assert pkg.__dict__["dumps"] is json.dumps  # set on the package: no second lookup
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        pkg.nope  # noqa: B018 - the attribute lookup is what is tested


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_the_mount_server_loads_no_asyncio_client() -> None:
    mods = _imported_after("import stages.castore.fuse.server")
    assert "stages.castore.fuse.client" not in mods
    assert "stages.castore.nar" not in mods and "stages.castore.memory" not in mods
    assert "grpc" not in mods


def test_every_public_name_resolves() -> None:
    import stages.castore
    import stages.castore.fuse
    import stages.oci

    for pkg in (stages.castore, stages.castore.fuse, stages.oci):
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, f"{pkg.__name__}.{name}"

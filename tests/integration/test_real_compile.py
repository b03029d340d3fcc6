"""A real compile: Brotli's library and tool, built by Nix and by ocibuild, same bytes.

The derivations (tests/real_compile/brotli.nix) compile Brotli 1.1.0's 31
library sources and its command-line tool with ``zig cc`` (clang, from the
ziglang wheel: a 340 MB toolchain as an input source), archive the library
and link the tool against it. Nix 2.8 builds them with ``nix-build``;
ocibuild with ``ocibuild nix build`` (the CLI, its own store and state).
Every output's NAR hash and references must be equal, and the tool built by
ocibuild, exported from its store, must round-trip data outside the sandbox.
A nonce makes the derivations new each run; everything the test added to
the Nix store is deleted at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from real_compile import prepare

pytestmark = [pytest.mark.nix, pytest.mark.runc, pytest.mark.fuse, pytest.mark.root,
              pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
OCIBUILD = [sys.executable, "-m", "stages.cli"]


def _sh(*args: str, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=500,
                          env=env)
    assert proc.returncode == 0, f"{args[:3]}: {proc.stderr[-2000:]}"
    return proc.stdout


def test_brotli_builds_as_under_nix_and_runs() -> None:
    work = Path(tempfile.mkdtemp(prefix="ocibuild-real-compile-", dir="/var/tmp"))
    os.chmod(work, 0o711)
    made: list[str] = []
    try:
        nix_file = prepare(work / "src-tree")
        nonce = uuid.uuid4().hex
        drvs = {}
        for attr in ("lib", "cli"):
            drvs[attr] = _sh("nix-instantiate", str(nix_file), "--argstr", "nonce", nonce,
                             "-A", attr, cwd=work).strip()
        made += drvs.values()
        nix_out = {attr: _sh("nix-build", "--no-out-link", drv, cwd=work).strip()
                   for attr, drv in drvs.items()}
        made[:0] = nix_out.values()

        env = {k: v for k, v in os.environ.items()
               if k not in ("BUILD_SERVICE_ADDR", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR")}
        store = f"local://{work}/store"
        env.update(BLOB_SERVICE_ADDR=store, DIRECTORY_SERVICE_ADDR=store,
                   OCIBUILD_STATE=str(work / "state"), PYTHONPATH=str(REPO))
        ours = json.loads(_sh(*OCIBUILD, "nix", "build", "--json", "--jobs", "2",
                              drvs["lib"], drvs["cli"], cwd=work, env=env))
        for attr in ("lib", "cli"):
            result = ours[drvs[attr]]
            assert result["status"] == "built", result
            out = result["outputs"]["out"]
            path = nix_out[attr]
            assert out["path"] == path
            nix_hash = _sh("nix-store", "-q", "--hash", path, cwd=work).strip()
            nix_refs = sorted(_sh("nix-store", "-q", "--references", path, cwd=work).split())
            assert out["nar_hash"] == nix_hash, attr
            assert sorted(out["references"]) == nix_refs, attr
            # A real dependency was found in the binaries, not a vacuous match.
            assert any("zig-0.13.0" in r for r in nix_refs), nix_refs

        # The tool ocibuild built runs outside the sandbox.
        export = work / "export"
        export.mkdir()
        _sh(*OCIBUILD, "nix", "export", nix_out["cli"], str(export), cwd=work, env=env)
        tool = export / Path(nix_out["cli"]).name / "bin" / "brotli"
        data = os.urandom(1 << 16) + b"brotli" * 10_000
        packed = subprocess.run([str(tool), "-c"], input=data, capture_output=True,
                                check=True).stdout
        assert len(packed) < len(data)
        assert subprocess.run([str(tool), "-dc"], input=packed, capture_output=True,
                              check=True).stdout == data
    finally:
        if made:
            subprocess.run(["nix-store", "--delete", *made], capture_output=True, timeout=120)
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)

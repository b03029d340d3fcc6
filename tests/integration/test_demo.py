"""`make demo` runs dag_examples/demo.py: it must run as written and agree with Nix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.nix
def test_demo_runs_and_matches_nix(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR")}
    env["OCIBUILD_STORE"] = str(tmp_path / "store")
    result = subprocess.run([sys.executable, str(REPO / "dag_examples" / "demo.py")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    ours = lines["NAR hash"].strip()
    theirs = lines["nix-store"].split()[0]
    assert ours.startswith("sha256:") and ours == theirs
    assert "match" in lines
    # It used the store it was told to use.
    assert (tmp_path / "store").is_dir()

"""nix.conf's sandbox paths, read by ``ocibuild nix build`` as Nix reads them.

A nix.conf of this test (the project's own settings plus
``extra-sandbox-paths``) names a mapped path (TARGET=SOURCE), a path bound
at its own place, and an optional one whose source is missing. A
derivation reads what it finds there; nix-build and ``ocibuild nix build``,
both under that NIX_CONF_DIR, must give the same output.
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

pytestmark = [pytest.mark.nix, pytest.mark.runc, pytest.mark.fuse, pytest.mark.root,
              pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
EXPR = r"""
{ nonce, same }:
let bbd = builtins.path { path = ./bbdir; name = "busybox"; }; B = "${bbd}/busybox";
in derivation {
  name = "sandbox-paths-probe"; inherit nonce; system = builtins.currentSystem; builder = B;
  args = [ "sh" "-c" ''
    { ${B} cat /ocibuild-sbx-data/file; ${B} cat ${same}/file;
      ${B} test -e /ocibuild-sbx-missing && echo missing-is-there || echo no-missing;
      ${B} ls /ocibuild-sbx-data; } > $out
  '' ];
}
"""


def test_sandbox_paths_are_bound_as_nix_binds_them() -> None:
    work = Path(tempfile.mkdtemp(prefix="ocibuild-sbx-", dir="/var/tmp"))
    os.chmod(work, 0o711)
    made: list[str] = []
    try:
        (work / "data").mkdir()
        (work / "data" / "file").write_text("mapped data\n")
        (work / "same").mkdir()
        (work / "same" / "file").write_text("same-path data\n")
        conf = work / "conf"
        conf.mkdir()
        (conf / "nix.conf").write_text(
            (REPO / ".nix" / "nix.conf").read_text()
            + f"extra-sandbox-paths = /ocibuild-sbx-data={work}/data {work}/same "
              f"/ocibuild-sbx-missing=/no/such/dir?\n")
        (work / "bbdir").mkdir()
        shutil.copy2("/bin/busybox", work / "bbdir" / "busybox")
        (work / "probe.nix").write_text(EXPR)
        env = {**os.environ, "NIX_CONF_DIR": str(conf), "NIX_REMOTE": "local",
               "PYTHONPATH": str(REPO)}
        for k in ("BUILD_SERVICE_ADDR", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR"):
            env.pop(k, None)

        def run(*cmd: str) -> str:
            proc = subprocess.run(list(cmd), cwd=work, env=env, capture_output=True, text=True,
                                  timeout=100)
            assert proc.returncode == 0, proc.stderr[-2000:]
            return proc.stdout

        drv = run("nix-instantiate", "probe.nix", "--argstr", "nonce", uuid.uuid4().hex,
                  "--argstr", "same", str(work / "same")).strip()
        made.append(drv)
        out = run("nix-build", "--no-out-link", drv).strip()
        made.insert(0, out)
        assert Path(out).read_text() == "mapped data\nsame-path data\nno-missing\nfile\n"
        store = f"local://{work}/store"
        ours = json.loads(run(sys.executable, "-m", "stages.cli", "nix", "build", "--json",
                              "--state-dir", str(work / "state"), "--blob-service-addr", store,
                              "--directory-service-addr", store, drv))[drv]
        assert ours["status"] == "built", ours
        assert ours["outputs"]["out"]["nar_hash"] == run("nix-store", "-q", "--hash",
                                                         out).strip()
    finally:
        if made:
            subprocess.run(["nix-store", "--delete", *made], capture_output=True,
                           env={**os.environ, "NIX_REMOTE": "local"})
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)

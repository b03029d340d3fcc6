"""``ocibuild nix build`` killed with SIGKILL mid-build: its container dies with it.

With either runtime: runc (the supervisor kills the containers) or bwrap
(the sandbox dies with bwrap's parent).

The same guarantee as for ``ocibuild build`` and ``ocibuild serve``
(test_build_cli.py, test_serve.py): the service's supervisor kills the
containers of an instance whose owner died, within 2 s; the next start on
the state directory removes the rest. Real Nix instantiates the derivation
(a static busybox sleeping under a marker), real runc runs it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from integration_helpers import processes_with

from stages.service import OciBuildService
from stages.service.oci import RUNTIMES

pytestmark = [pytest.mark.nix, pytest.mark.runc, pytest.mark.fuse, pytest.mark.root,
              pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
EXPR = r"""
{ marker }:
let bbd = builtins.path { path = ./bbdir; name = "busybox"; };
in derivation {
  name = "sleeper"; system = builtins.currentSystem; builder = "${bbd}/busybox";
  args = [ "sh" "-c" "${bbd}/busybox sleep ${marker}; echo > $out" ];
}
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_sigkill_of_nix_build_kills_its_container_within_2s(runtime: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="ocibuild-nix-kill-", dir="/var/tmp"))
    os.chmod(work, 0o711)
    drv = None
    try:
        (work / "bbdir").mkdir()
        shutil.copy2("/bin/busybox", work / "bbdir" / "busybox")
        (work / "sleeper.nix").write_text(EXPR)
        marker = str(9_000_000 + uuid.uuid4().int % 1_000_000)
        # (a new marker per runtime: each its own derivation)
        drv = subprocess.run(["nix-instantiate", "sleeper.nix", "--argstr", "marker", marker],
                             cwd=work, check=True, capture_output=True, text=True).stdout.strip()
        store = f"local://{work}/store"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for k in ("BUILD_SERVICE_ADDR", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR"):
            env.pop(k, None)
        scheme = "oci" if runtime == "runc" else runtime
        cmd = [sys.executable, "-m", "stages.cli", "nix", "build", "--build-service-addr",
               f"{scheme}://{work / 'state'}", "--blob-service-addr", store,
               "--directory-service-addr", store, drv]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not processes_with(f"sleep {marker}"):
                assert time.monotonic() < deadline and proc.poll() is None, "never started"
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        killed = time.monotonic()
        while processes_with(f"sleep {marker}") and time.monotonic() < killed + 2:
            time.sleep(0.05)
        assert processes_with(f"sleep {marker}") == [], "the container outlived its owner"
        # The next start on the state directory cleans the rest of the dead instance.
        (inst,) = (work / "state" / "instances").iterdir()

        async def restart() -> list[str]:
            async with OciBuildService(work / "state", blob_address=store,
                                       directory_address=store, jobs=1) as svc:
                return svc.cleaned

        assert f"instance {inst.name}" in asyncio.run(restart())
        assert not inst.exists()
    finally:
        if drv:
            subprocess.run(["nix-store", "--delete", drv], capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)

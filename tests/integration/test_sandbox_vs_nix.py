"""Our sandbox against Nix's: the same probe, byte for byte.

A derivation whose builder is a static busybox prints /etc/passwd,
/etc/group, /etc/hosts, its whole environment (``env``), ``id``, the hostname
and its working directory into $out. It is built once by a real sandboxed
nix-build, and once through validate + bundle + spec + runc from the
BuildRequest that tvix's rules make of the same derivation (PROTOCOL.md,
"Nix derivations as build requests"), read from ``nix show-derivation``.
The two outputs must be identical.

Nothing is excluded from the comparison: the output path and the builder
path would legitimately differ between two builders, but here the request
names the very store paths the derivation does (the busybox input is the real
store directory, bind-mounted at its own path, and $out is the derivation's
output path), so they agree. The order of ``env``'s lines is busybox sh's
own (not sorted); it is the same on both sides because the same binary sees
the same variables. NIX_BUILD_CORES is Nix's ``cores`` setting, 0 here,
meaning every core: the request gets os.cpu_count(), as a builder on this
machine would.

A nonce attribute makes every run a fresh derivation; the test deletes its
output and .drv from the store afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from stages.bundle import write_bundle
from stages.castore.nodes import DirectoryNode
from stages.oci.bwrap import BwrapSandbox
from stages.oci.idmap import BUILD_GID, BUILD_UID, load_idmap
from stages.oci.runc import RuncContainer, cleanup_stale_containers
from stages.oci.schema import validate_config
from stages.request import BuildConstraints, BuildRequest, EnvVar
from stages.service.oci import RUNTIMES
from stages.validate import validate_request

pytestmark = [pytest.mark.nix, pytest.mark.runc, pytest.mark.timeout(120)]

PROBE = r"""
let bbd = builtins.path { path = ./bbdir; name = "busybox"; };
in derivation {
  name = "ocibuild-sandbox-probe";
  system = builtins.currentSystem;
  builder = "${bbd}/busybox";
  nonce = "@NONCE@";
  args = [ "sh" "-c" "B=${bbd}/busybox; { $B cat /etc/passwd; echo --; $B cat /etc/group; echo --; $B cat /etc/hosts; echo --; $B env; echo --; $B id; $B hostname; $B pwd; } > $out" ];
}
"""

# Nix 2.8's fixed sandbox variables (libstore/build/local-derivation-goal.cc,
# initEnv), as tvix puts them under the derivation's env.
NIX_FIXED_ENV = {
    "HOME": "/homeless-shelter",
    "NIX_BUILD_TOP": "/build",
    "NIX_LOG_FD": "2",
    "NIX_STORE": "/nix/store",
    "PATH": "/path-not-set",
    "PWD": "/build",
    "TEMP": "/build",
    "TEMPDIR": "/build",
    "TERM": "xterm-256color",
    "TMP": "/build",
    "TMPDIR": "/build",
}


def _nix(*args: str, cwd: Path) -> str:
    return subprocess.run(list(args), cwd=cwd, check=True, capture_output=True, text=True,
                          timeout=90).stdout


def request_from_drv(drv: dict) -> BuildRequest:
    """The BuildRequest tvix makes of a derivation without input derivations."""
    assert not drv["inputDrvs"]
    env = {**NIX_FIXED_ENV, "NIX_BUILD_CORES": str(os.cpu_count()), **drv["env"]}
    outputs = sorted(o["path"].lstrip("/") for o in drv["outputs"].values())
    inputs = sorted(os.path.basename(p) for p in drv["inputSrcs"])
    return BuildRequest(
        inputs=[DirectoryNode(name=n.encode(), digest=b"\0" * 32, size=0) for n in inputs],
        command_args=[drv["builder"], *drv["args"]],
        working_dir="build",
        scratch_paths=["build", "nix/store"],
        inputs_dir="nix/store",
        outputs=outputs,
        environment_vars=[EnvVar(key=k, value=v.encode()) for k, v in sorted(env.items())],
        constraints=BuildConstraints(system=drv["system"]),
    )


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_sandbox_matches_nix_byte_for_byte(runtime: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="ocibuild-vs-nix-"))
    os.chmod(work, 0o711)
    state = work / "state"
    to_delete: list[str] = []
    try:
        (work / "bbdir").mkdir()
        shutil.copy2("/bin/busybox", work / "bbdir" / "busybox")
        (work / "probe.nix").write_text(PROBE.replace("@NONCE@", uuid.uuid4().hex))
        drv_path = _nix("nix-instantiate", "probe.nix", cwd=work).strip()
        to_delete.append(drv_path)
        out_path = _nix("nix-store", "--realise", drv_path, cwd=work).strip()
        to_delete.insert(0, out_path)
        nix_output = Path(out_path).read_bytes()
        drv = json.loads(_nix("nix", "show-derivation", drv_path, cwd=work))[drv_path]

        req = validate_request(request_from_drv(drv))
        layout = write_bundle(work / "bundle", req, idmap=load_idmap(),
                              input_paths={n.name: "/nix/store/" + n.name.decode()
                                           for n in req.inputs})
        validate_config(json.loads(layout.config.read_text()))
        idmap = load_idmap()
        name = f"vs-nix-{uuid.uuid4().hex[:8]}"
        sandbox = (RuncContainer(layout.root, name, state_root=state) if runtime == "runc" else
                   BwrapSandbox(layout.root, name, uid=idmap.host_uid(BUILD_UID),
                                gid=idmap.host_gid(BUILD_GID)))
        async with sandbox as c:
            await c.run(log_path=layout.log, timeout=60)
        ours = layout.host_path(req.scratch_paths, out_path.lstrip("/")).read_bytes()

        # section by section first, for a readable failure
        for nix_part, our_part in zip(nix_output.split(b"--\n"), ours.split(b"--\n")):
            assert our_part == nix_part
        assert ours == nix_output
        # and the probe did print what it should (a vacuous match is no match)
        assert b"nixbld:x:1000:100:" in nix_output and b"uid=1000(nixbld)" in nix_output
    finally:
        try:
            await cleanup_stale_containers(state)
        finally:
            if to_delete:
                subprocess.run(["nix-store", "--delete", *to_delete], capture_output=True,
                               timeout=60)
            subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)

"""Stop a build after its bundle stage, look inside the bundle, then resume it.

Run: ``.venv/bin/python dag_examples/build_stop_resume.py`` (as root).

The same walkthrough as ``ocibuild build --stop-after bundle REQUEST``, then
``ocibuild resume RUN``, in Python:

1. A service runs the build with ``stop_after="bundle"``: validate, spec and
   bundle run; the run is *stopped* and the bundle stays on disk (marked
   kept, so a restarting service does not clean it away).
2. We inspect the bundle: highlights of its ``config.json`` (the OCI runtime
   spec: argv, user, namespaces, id mappings, mounts) and ``rootfs/etc``,
   whose passwd, group and hosts are those of Nix's sandbox.
3. The service resumes the run from its run directory: the finished stages
   are reused; mount, run, ingest and teardown run. We print the output and
   every stage's state.

Caveat: the example resumes in the service that stopped the run. The spec
stage's config.json names that service instance's FUSE mountpoint, so a
resume by another service instance (``ocibuild resume`` in a new process) of
a build WITH inputs needs ``from_stage="spec"`` until the spec stops naming
per-instance paths.

Store and state: as in ``build_hello.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from stages.castore import FileNode, ingest_path, open_castore
from stages.request import BuildConstraints, BuildRequest, EnvVar
from stages.service import OciBuildService, build_result


def request_for(tools_name: str, tools_node) -> BuildRequest:
    bb = f"/nix/store/{tools_name}/busybox"
    return BuildRequest(
        inputs=[tools_node],
        command_args=["/bin/sh", "-c", "echo \"built by $(id -u):$(id -g) on $(hostname)\" > out"],
        working_dir="build",
        scratch_paths=["build"],
        inputs_dir="nix/store",
        outputs=["build/out"],
        environment_vars=[EnvVar(key="PATH", value=os.path.dirname(bb).encode())],
        constraints=BuildConstraints(system="x86_64-linux", provide_bin_sh=True),
    )


def show_bundle(bundle: Path) -> None:
    config = json.loads((bundle / "config.json").read_text())
    proc = config["process"]
    linux = config["linux"]
    print(f"bundle:      {bundle}")
    print(f"  args:      {proc['args']}")
    print(f"  user:      uid {proc['user']['uid']} gid {proc['user']['gid']}, "
          f"cwd {proc['cwd']}, hostname {config['hostname']}")
    print(f"  env:       {proc['env']}")
    print(f"  namespaces: {[ns['type'] for ns in linux['namespaces']]}")
    for kind in ("uidMappings", "gidMappings"):
        m = linux[kind][0]
        print(f"  {kind}: container {m['containerID']} -> host {m['hostID']} "
              f"(size {m['size']})")
    print("  mounts:")
    for m in config["mounts"]:
        opts = ",".join(m.get("options", []))
        print(f"    {m['destination']:<24} {m['type']:<7} {opts}")
    print("  rootfs/etc:")
    for f in sorted((bundle / "rootfs" / "etc").iterdir()):
        print(f"    {f.name}:")
        for line in f.read_text().splitlines():
            print(f"      {line}")


async def main() -> int:
    castore = open_castore()
    try:
        with tempfile.TemporaryDirectory(prefix="ocibuild-stop-") as tmp:
            tools_dir = Path(tmp) / "tools"
            tools_dir.mkdir()
            shutil.copy2("/bin/busybox", tools_dir / "busybox")
            tools = await ingest_path(castore, tools_dir)
        request = request_for("tools", tools)

        async with OciBuildService() as svc:
            # 1. Stop after the bundle stage.
            run, specs = await svc.run_builds([request], stop_after="bundle")
            bundle = svc.bundles_dir / specs[0].key
            print(f"run:         {run.run_dir} ({run.status.value})")
            for name, outcome in run.stages.items():
                print(f"  {name:<9} {outcome.state.value}")

            # 2. Inspect what it left.
            show_bundle(bundle)

            # 3. Resume the run from its directory, to the end.
            run, specs = await svc.resume_run(run.run_dir)
        build = build_result(run, specs[0])
        out = build.outputs[0]
        assert isinstance(out, FileNode), "the example's output is one file"
        print(f"resumed:     {run.status.value}")
        for name, outcome in run.stages.items():
            took = f"{outcome.duration * 1000:.1f} ms" if outcome.duration is not None else ""
            print(f"  {name:<9} {outcome.state.value:<9} {took}")
        print(f"output:      build/out -> {out.digest.hex()}")
        print(f"contents:    {(await castore.blobs.get(out.digest)).decode()!r}")
        print(f"bundle gone: {not bundle.exists()}")
    finally:
        await castore.aclose()
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("build_stop_resume.py: run as root (runc with user namespaces, FUSE)")
    sys.exit(asyncio.run(main()))

"""A hello build, constructed in Python, run in a real runc container.

Run: ``.venv/bin/python dag_examples/build_hello.py`` (as root; ``make demo``
runs it too).

1. Makes a small input directory, ``hello-tools``: a copy of the static
   busybox and a data file, ``greeting.txt``.
2. Imports it into the store with :func:`stages.castore.ingest_path`.
3. Builds a :class:`stages.request.BuildRequest` in code: the builder is that
   busybox, seen read-only at ``/nix/store/hello-tools``; it upper-cases the
   greeting into ``/build/out``.
4. Runs it on :class:`stages.service.OciBuildService` (the seven stages:
   validate, spec, bundle, mount, run, ingest, teardown), showing the
   builder's output as it comes, and prints the output node, its contents
   read back from the store, and its NAR hash.

Where things live: the store is ``$BLOB_SERVICE_ADDR``/``$DIRECTORY_SERVICE_ADDR``,
else ``$OCIBUILD_STORE``, else the embedded local store; runs and bundles go
to ``$OCIBUILD_STATE``, else ``/var/lib/ocibuild`` for root.

Caveats: needs root, runc, /dev/fuse and /bin/busybox (static).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pipeline import Event, EventKind
from stages.castore import (
    FileNode,
    Node,
    format_nar_hash,
    ingest_path,
    nar_hash_and_size,
    open_castore,
)
from stages.request import BuildConstraints, BuildRequest, EnvVar
from stages.service import OciBuildService, default_state_dir

GREETING = "hello from a runc container\n"


def make_tools(root: Path) -> Path:
    """The input: a directory with a static busybox and a data file."""
    tools = root / "hello-tools"
    tools.mkdir()
    shutil.copy2("/bin/busybox", tools / "busybox")
    (tools / "greeting.txt").write_text(GREETING)
    return tools


def hello_request(tools: Node) -> BuildRequest:
    """The build: busybox upper-cases the greeting into build/out."""
    name = tools.name.decode()
    bb = f"/nix/store/{name}/busybox"
    script = f"{bb} tr a-z A-Z < /nix/store/{name}/greeting.txt > out && {bb} echo built"
    return BuildRequest(
        inputs=[tools],
        command_args=[bb, "sh", "-c", script],
        working_dir="build",
        scratch_paths=["build"],
        inputs_dir="nix/store",
        outputs=["build/out"],
        environment_vars=[EnvVar(key="HOME", value=b"/homeless-shelter")],
        constraints=BuildConstraints(system="x86_64-linux"),
    )


async def main() -> int:
    castore = open_castore()
    try:
        with tempfile.TemporaryDirectory(prefix="ocibuild-hello-") as tmp:
            tools = await ingest_path(castore, make_tools(Path(tmp)))
        print(f"input:     {tools.name.decode()} -> {tools.digest.hex()} (BLAKE3)")

        request = hello_request(tools)
        print(f"command:   {' '.join(request.command_args)}")

        def show_log(event: Event) -> None:
            # The builder's stdout/stderr arrive as log events of the run stage.
            if event.kind is EventKind.LOG and event.stage == "run":
                print(f"log:       {event.message}")

        async with OciBuildService(subscribers=[show_log]) as svc:
            build = await svc.do_build(request)
        print(f"state dir: {default_state_dir()}")

        (out,) = build.outputs
        assert isinstance(out, FileNode)
        contents = await castore.blobs.get(out.digest)
        nar_hash, nar_size = await nar_hash_and_size(castore, out)
        print(f"output:    build/out -> file {out.digest.hex()} ({out.size} bytes)")
        print(f"NAR hash:  {format_nar_hash(nar_hash)} ({nar_size} bytes of NAR)")
        print(f"contents:  {contents.decode()!r}")
    finally:
        await castore.aclose()
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("build_hello.py: run as root (runc with user namespaces, FUSE)")
    sys.exit(asyncio.run(main()))

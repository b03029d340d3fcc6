"""The ingest stage: each output into castore, and its references found.

Outputs are read from the host side of the bundle (the scratch directory
holding them, see :class:`~stages.oci.layout.BundleLayout`), imported with
:func:`~stages.castore.ingest.ingest_path` (symlinks stored, never
followed), and scanned for the request's ``refscan_needles`` (file contents
and symlink targets, :mod:`stages.castore.refscan`). Outputs are handled in
parallel. A missing output fails the build naming it.

Caveat: an output is found on the host by walking its path from the host
directory of its scratch path; a symlink among the directories above it
(``nix/store/x`` a symlink, output ``nix/store/x/y``) fails the build
naming it. Following it would resolve on the host, not in the sandbox, and
an absolute target would read the host's own files into the output.

The result is the wire form of a ``Build`` without its request: each
output's anonymous root node (proto-JSON) and the ascending needle indexes
found in it, in the order of ``request.outputs``.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.castore.ingest import ingest_path
from stages.castore.nodes import Node, node_from_json_value, node_to_json_value
from stages.context import BuildHost, BuildSpec, StageContext, request_of
from stages.errors import OutputError
from stages.oci.layout import longest_scratch_prefix
from stages.request import Build, BuildRequest, OutputNeedles

if TYPE_CHECKING:
    from stages.castore.refscan import NeedleScanner
    from stages.oci.layout import BundleLayout

__all__ = ["build_from_result", "output_host_path", "stage"]


def output_host_path(layout: BundleLayout, req: BuildRequest, output: str) -> Path:
    """The host path of ``output``, refusing a symlink or non-directory above it.

    The builder has exited (its container is gone), so nothing can swap a
    component between this check and the import.
    """
    scratch = longest_scratch_prefix(output, req.scratch_paths)
    if scratch is None:  # validation keeps outputs in scratch paths; be safe anyway
        raise OutputError(output, "lies in no scratch path")
    path = layout.scratch_dir(req.scratch_paths, scratch)
    parts = output[len(scratch) + 1:].split("/") if output != scratch else []
    for i, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise OutputError(output, "the builder did not create this output") from None
        if i == len(parts) - 1:
            break
        above = "/".join([scratch, *parts[:i + 1]])
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(output, f"{above} is a symlink; the path to an output is "
                                      f"not followed through symlinks (it would resolve on "
                                      f"the host, outside the sandbox)")
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(output, f"{above} is not a directory")
    return path


async def _one(host: BuildHost, path: Path, output: str,
               scanner: NeedleScanner | None) -> tuple[Node, list[int]]:
    node = await ingest_path(host.castore, path)
    found: list[int] = []
    if scanner is not None:
        found = sorted(await asyncio.to_thread(scanner.scan_path, path))
    return node.renamed(b""), found


async def stage(build: BuildSpec, host: BuildHost, ctx: StageContext) -> dict[str, Any]:
    req = request_of(build, ctx)
    layout = host.layout(build)
    scanner = None
    if req.refscan_needles:
        from stages.castore.refscan import NeedleScanner

        scanner = NeedleScanner(req.refscan_needles)
    paths = [output_host_path(layout, req, out) for out in req.outputs]
    results = await asyncio.gather(*(
        _one(host, path, out, scanner) for path, out in zip(paths, req.outputs)))
    for out, (node, found) in zip(req.outputs, results):
        ctx.log(f"output {out}: {type(node).__name__} needles {found}")
    return {"outputs": [node_to_json_value(node) for node, _ in results],
            "needles": [found for _, found in results]}


def build_from_result(request: BuildRequest, result: dict) -> Build:
    """The Build message of a finished ingest stage's result."""
    return Build(build_request=request,
                 outputs=[node_from_json_value(n) for n in result["outputs"]],
                 outputs_needles=[OutputNeedles(needles=n) for n in result["needles"]])

"""The ingest stage: each output into castore, and its references found.

Outputs are read from the host side of the bundle (the scratch directory
holding them, see :class:`~stages.oci.layout.BundleLayout`), imported with
:func:`~stages.castore.ingest.ingest_path` (symlinks stored, never
followed), and scanned for the request's ``refscan_needles`` (file contents
and symlink targets, :mod:`stages.refscan`). Outputs are handled in
parallel. A missing output fails the build naming it.

The result is the wire form of a ``Build`` without its request: each
output's anonymous root node (proto-JSON) and the ascending needle indexes
found in it, in the order of ``request.outputs``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.castore.ingest import ingest_path
from stages.castore.nodes import Node, node_from_json, node_to_json
from stages.errors import OutputError
from stages.request import Build, BuildRequest, OutputNeedles

if TYPE_CHECKING:
    from stages.build import BuildHost, BuildSpec
    from stages.refscan import NeedleScanner

__all__ = ["build_from_result", "stage"]


async def _one(host: BuildHost, path: Path, output: str,
               scanner: NeedleScanner | None) -> tuple[Node, list[int]]:
    try:
        os.lstat(path)
    except FileNotFoundError:
        raise OutputError(output, "the builder did not create this output") from None
    node = await ingest_path(host.castore, path)
    found: list[int] = []
    if scanner is not None:
        found = sorted(await asyncio.to_thread(scanner.scan_path, path))
    return node.renamed(b""), found


async def stage(build: BuildSpec, host: BuildHost, ctx: Any) -> dict:
    req = build.request
    layout = host.layout(build.key)
    scanner = None
    if req.refscan_needles:
        from stages.refscan import NeedleScanner

        scanner = NeedleScanner(req.refscan_needles)
    results = await asyncio.gather(*(
        _one(host, layout.host_path(req, out), out, scanner) for out in req.outputs))
    for out, (node, found) in zip(req.outputs, results):
        ctx.log(f"output {out}: {type(node).__name__} needles {found}")
    return {"outputs": [json.loads(node_to_json(node)) for node, _ in results],
            "needles": [found for _, found in results]}


def build_from_result(request: BuildRequest, result: dict) -> Build:
    """The Build message of a finished ingest stage's result."""
    return Build(build_request=request,
                 outputs=[node_from_json(json.dumps(n)) for n in result["outputs"]],
                 outputs_needles=[OutputNeedles(needles=n) for n in result["needles"]])

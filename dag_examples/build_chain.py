"""A chain of builds as ONE pipeline DAG: each build's output is the next one's input.

Run: ``.venv/bin/python dag_examples/build_chain.py`` (as root).

The outer pipeline (a :class:`pipeline.Graph`) has four stages; each build
stage runs a whole build (itself the seven-stage graph) through
``OciBuildService.do_build``. The service is a shared pipeline resource
(``builder``): started before the first build stage, stopped after the last::

    tools ──> words ──> sorted ──> report
    (sorted also reads tools; report reads tools, words and sorted)

- ``tools``: imports a directory holding a static busybox into the store;
- ``words``: a build writing one word per line;
- ``sorted``: a build whose input is ``words``'s output node: ``sort -u``;
- ``report``: a build with both earlier outputs as inputs: a directory with
  ``count`` (lines of sorted), ``first`` (its first line) and ``total``
  (lines of words).

The scheduler starts a stage as soon as its dependencies are done; stage
results are JSON (output nodes as proto-JSON), so the run could be stored
and resumed. At the end the chain is printed, drawn with
:func:`pipeline.to_text`, and the report read back from the store.

Store and state: as in ``build_hello.py`` (``$OCIBUILD_STORE``,
``$OCIBUILD_STATE``, else the defaults).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pipeline import Graph, Resource, Runner, Stage, to_text
from stages.castore import (
    DirectoryNode,
    Node,
    ingest_path,
    node_from_json,
    node_to_json,
    open_castore,
)
from stages.castore.addresses import Castore
from stages.request import BuildConstraints, BuildRequest
from stages.service import OciBuildService

WORDS = ["pear", "apple", "fig", "apple", "kiwi", "banana", "fig"]


def node_json(node: Node) -> dict:
    return json.loads(node_to_json(node))


def from_json(value: dict, name: str) -> Node:
    """A stage result (an output node) back as a node, named for use as an input."""
    return node_from_json(json.dumps(value)).renamed(name.encode())


def request(script: str, inputs: list[Node], output: str = "build/out") -> BuildRequest:
    """A build run by the busybox of the ``tools`` input, with /bin/sh from it."""
    inputs = sorted(inputs, key=lambda n: n.name)
    return BuildRequest(
        inputs=inputs,
        command_args=["/nix/store/tools/busybox", "sh", "-c", script],
        working_dir="build",
        scratch_paths=["build"],
        inputs_dir="nix/store",
        outputs=[output],
        constraints=BuildConstraints(system="x86_64-linux"),
    )


BB = "/nix/store/tools/busybox"


def make_graph(castore: Castore, tools_dir: Path) -> Graph:
    async def tools(ctx) -> dict:
        return node_json(await ingest_path(castore, tools_dir))

    async def words(ctx) -> dict:
        tools_node = from_json(ctx.results["tools"], "tools")
        script = f"for w in {' '.join(WORDS)}; do {BB} echo $w; done > out"
        build = await ctx.resources["builder"].do_build(request(script, [tools_node]))
        return node_json(build.outputs[0])

    async def sorted_(ctx) -> dict:
        inputs = [from_json(ctx.results["tools"], "tools"),
                  from_json(ctx.results["words"], "words")]
        build = await ctx.resources["builder"].do_build(
            request(f"{BB} sort -u /nix/store/words > out", inputs))
        return node_json(build.outputs[0])

    async def report(ctx) -> dict:
        inputs = [from_json(ctx.results["tools"], "tools"),
                  from_json(ctx.results["words"], "words"),
                  from_json(ctx.results["sorted"], "sorted")]
        script = (f"{BB} mkdir out && "
                  f"{BB} wc -l < /nix/store/sorted > out/count && "
                  f"{BB} head -n 1 /nix/store/sorted > out/first && "
                  f"{BB} wc -l < /nix/store/words > out/total")
        build = await ctx.resources["builder"].do_build(request(script, inputs))
        return node_json(build.outputs[0])

    builder = Resource(name="builder", kind="builder", factory=lambda ctx: OciBuildService(),
                       description="the OCI build service, shared by every build stage")
    return Graph(
        stages=[
            Stage(name="tools", fn=tools, description="import busybox into the store"),
            Stage(name="words", fn=words, deps=["tools"], resources=["builder"],
                  description="build: one word per line"),
            Stage(name="sorted", fn=sorted_, deps=["tools", "words"], resources=["builder"],
                  description="build: sort -u of words"),
            Stage(name="report", fn=report, deps=["tools", "words", "sorted"],
                  resources=["builder"], description="build: counts of words and sorted"),
        ],
        resources=[builder],
        version="build-chain-example-1",
    )


async def main() -> int:
    castore = open_castore()
    try:
        with tempfile.TemporaryDirectory(prefix="ocibuild-chain-") as tmp:
            tools_dir = Path(tmp) / "tools"
            tools_dir.mkdir()
            shutil.copy2("/bin/busybox", tools_dir / "busybox")
            graph = make_graph(castore, tools_dir)
            run = await Runner(graph).run()

        print("the chain:")
        for name in graph.names:
            outcome = run.stages[name]
            node = node_from_json(json.dumps(outcome.result)) if outcome.state.ok else None
            digest = getattr(node, "digest", b"").hex()
            print(f"  {name:<7} {outcome.state.value:<9} {type(node).__name__:<14} {digest}")
        print()
        print(to_text(graph, run), end="")
        if not all(o.state.ok for o in run.stages.values()):
            for o in run.stages.values():
                if o.error:
                    print(f"{o.name}: {o.error}", file=sys.stderr)
            return 1

        report = node_from_json(json.dumps(run.stages["report"].result))
        assert isinstance(report, DirectoryNode)
        directory = await castore.directories.get(report.digest)
        assert directory is not None
        print()
        print("report (read back from the store):")
        for f in directory.files:
            text = (await castore.blobs.get(f.digest)).decode().strip()
            print(f"  {f.name.decode()}: {text}")
    finally:
        await castore.aclose()
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("build_chain.py: run as root (runc with user namespaces, FUSE)")
    sys.exit(asyncio.run(main()))

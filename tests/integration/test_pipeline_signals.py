"""A real SIGINT/SIGTERM to a process running a pipeline releases every resource.

The child process runs a pipeline under ``run_sync``; its resources append
``acquire NAME`` / ``release NAME`` lines to a file (flushed at once), so the
test checks the releases without trusting the child's own summary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent('''
    import asyncio, contextlib, os, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from pipeline import Graph, Resource, Stage, Caps, RunCancelled, run_sync

    trace = Path(sys.argv[1])
    slow_release = float(sys.argv[3])

    def note(line):
        with open(trace, "a") as f:
            f.write(line + "\\n")
            f.flush()

    def tracked(name):
        @contextlib.asynccontextmanager
        async def factory(ctx):
            note(f"acquire {{name}}@{{ctx.name}}")
            try:
                yield name
            finally:
                if slow_release:
                    note(f"releasing {{name}}@{{ctx.name}}")
                    await asyncio.sleep(slow_release)
                note(f"release {{name}}@{{ctx.name}}")
        return factory

    async def quick(ctx):
        return ctx.name

    async def hang(ctx):
        note(f"running {{ctx.name}}")
        await asyncio.Event().wait()

    async def teardown(ctx):
        states = sorted(f"{{n}}={{o.state.value}}" for n, o in ctx.outcomes.items())
        note("teardown " + " ".join(states))

    stages = [Stage(name="prepare", fn=quick, resources=["mount"])]
    for i in range(3):
        stages.append(Stage(name=f"work{{i}}", fn=hang, deps=["prepare"],
                            resources=["mount", Resource(name="box", factory=tracked("box"))]))
    stages.append(Stage(name="after", fn=quick, deps=["work0"]))
    stages.append(Stage(name="teardown", fn=teardown, deps=["after", "work1", "work2"],
                        always=True))
    graph = Graph(stages=stages, resources=[Resource(name="mount", factory=tracked("mount"))])
    try:
        run_sync(graph, run_root=sys.argv[2], caps=Caps(kinds={{"box": 3}}))
    except RunCancelled as exc:
        note(f"cancelled {{exc.signal}} {{exc.run.run_dir}}")
        sys.exit(130)
    note("finished")
''')


def wait_for(path: Path, text: str, count: int = 1, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if content.count(text) >= count:
            return content
        time.sleep(0.01)
    raise AssertionError(f"{text!r} x{count} not seen in {path}:\n{content}")


@pytest.mark.parametrize("sig,twice", [
    (signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True),
], ids=["sigint", "sigterm", "sigint-twice-during-cleanup"])
def test_signal_releases_every_resource(tmp_path, sig, twice):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO)))
    trace = tmp_path / "trace.txt"
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, str(script), str(trace), str(runs),
                             "0.3" if twice else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(trace, "running work", count=3)
        os.kill(proc.pid, sig)
        if twice:
            wait_for(trace, "releasing box")
            os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = trace.read_text().splitlines()
    assert proc.returncode == 130, (proc.returncode, err)
    acquired = sorted(x.split()[1] for x in lines if x.startswith("acquire "))
    released = sorted(x.split()[1] for x in lines if x.startswith("release "))
    assert acquired == released == sorted(["mount@prepare", "box@work0", "box@work1",
                                           "box@work2"])
    # Shared resource released last (reverse acquisition order).
    assert [x for x in lines if x.startswith("release ")][-1] == "release mount@prepare"
    teardown = [x for x in lines if x.startswith("teardown ")]
    assert teardown == ["teardown after=cancelled work1=cancelled work2=cancelled"]
    assert lines[-1].startswith(f"cancelled {sig.name} ")
    if twice:
        assert "still cleaning up" in err
    run_dir = Path(lines[-1].split()[-1])
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "cancelled"
    assert state["stages"]["prepare"]["state"] == "finished"
    assert state["stages"]["work0"]["state"] == "cancelled"

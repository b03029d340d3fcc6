"""``python -m pipeline`` end to end on a user's graph outside the repository.

The test writes a module of its own into a temporary directory and drives
the command line as a user would (subprocesses, that directory as cwd):
run, a failure named by ``why``, resume after the cause is mended, stop
after a stage and resume, drawings, and the one-line errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

USER_GRAPHS = '''
import os
from pipeline import Graph, Stage

async def fetch(ctx):
    ctx.log("fetching")
    return {"n": 3}

async def double(ctx):
    return ctx.results["fetch"]["n"] * 2

async def flaky(ctx):
    if not os.path.exists("mended"):
        raise RuntimeError("not mended yet")
    return "ok"

async def report(ctx):
    with open("report.txt", "w") as f:
        f.write(f"{ctx.results['double']} {ctx.results['flaky']}")
    return "written"

def make():
    return Graph(stages=[
        Stage(name="fetch", fn=fetch),
        Stage(name="double", fn=double, deps=["fetch"]),
        Stage(name="flaky", fn=flaky, deps=["fetch"]),
        Stage(name="report", fn=report, deps=["double", "flaky"]),
    ])

GRAPH = make()
NOT_A_GRAPH = 3

import asyncio
import contextlib
from pipeline import Resource

@contextlib.asynccontextmanager
async def slot(ctx):
    yield

async def busy(ctx):
    await asyncio.sleep(0.05)

tried = []

async def once_more(ctx):
    tried.append(1)
    if len(tried) == 1:
        raise RuntimeError("first attempt fails")

async def hog(ctx):
    while not os.path.exists("release"):
        await asyncio.sleep(0.02)

def live():
    def holding(name, deps=()):
        return Stage(name=name, fn=hog, deps=deps,
                     resources=[Resource(name=f"r_{name}", kind="slot", factory=slot)])
    return Graph(stages=[holding("first"), holding("second")])

def capped():
    jobs = [Stage(name=f"job{i}", fn=busy,
                  resources=[Resource(name=f"w{i}", kind="worker", factory=slot)])
            for i in range(4)]
    return Graph(stages=[*jobs, Stage(name="retried", fn=once_more, retries=1),
                         Stage(name="after", fn=busy, deps=["job0", "retried"])])
'''


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_RUN_ROOT"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def _only_run(cwd: Path) -> str:
    (run,) = sorted(p.name for p in (cwd / "pipeline-runs").iterdir())
    return run


@pytest.fixture
def user(tmp_path: Path) -> Path:
    (tmp_path / "graphs.py").write_text(USER_GRAPHS)
    return tmp_path


def test_run_fails_why_names_the_cause_resume_mends_it(user: Path) -> None:
    first = cli(user, "run", "graphs.py:make", "--progress", "json")
    assert first.returncode == 1, first.stderr
    events = [json.loads(line) for line in first.stderr.splitlines() if line.startswith("{")]
    assert {"stage_failed", "stage_finished"} <= {e["event"] for e in events}
    assert {e["run"] for e in events} == {_only_run(user)}
    run = _only_run(user)
    assert cli(user, "why", run, "report").stdout.strip() == (
        "report did not run: its dependency flaky failed: stage 'flaky' failed: "
        "RuntimeError: not mended yet")
    assert cli(user, "why", run, "double").stdout.startswith("double finished in ")
    listing = cli(user, "runs").stdout
    assert run in listing and "failed" in listing and "graphs.py:make" in listing

    (user / "mended").touch()
    second = cli(user, "resume", run, "--progress", "plain")
    assert second.returncode == 0, second.stderr
    assert "fetch: reused" in second.stderr and "double: reused" in second.stderr
    assert (user / "report.txt").read_text() == "6 ok"
    assert cli(user, "why", run, "report").stdout.startswith("report finished")
    shown = cli(user, "show", run).stdout
    assert "report  <- double, flaky  (finished" in shown


def test_stop_after_then_resume_from_a_stage(user: Path) -> None:
    (user / "mended").touch()
    stopped = cli(user, "run", "graphs.py:GRAPH", "--stop-after", "fetch", "--progress",
                  "plain")
    assert stopped.returncode == 0 and "stopped as asked" in stopped.stderr
    run = _only_run(user)
    assert "stopped as asked" in cli(user, "why", run, "report").stdout
    assert not (user / "report.txt").exists()
    done = cli(user, "resume", run, "--from", "double", "--caps", "cpu=1")
    assert done.returncode == 0, done.stderr
    assert (user / "report.txt").read_text() == "6 ok"


def test_drawings_of_a_graph_and_of_a_run(user: Path) -> None:
    mermaid = cli(user, "show", "graphs.py:make", "--format", "mermaid").stdout
    assert mermaid.startswith("flowchart") and mermaid.count("-->") == 4
    dot = cli(user, "show", "graphs.py:make", "--format", "dot").stdout
    assert "digraph" in dot and dot.count("->") == 4
    cli(user, "run", "graphs.py:make")
    svg = user / "run.svg"
    out = cli(user, "show", _only_run(user), "-o", str(svg))
    assert out.returncode == 0, out.stderr
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    texts = {t.text for t in root.iter() if t.tag.endswith("text")}
    assert {"fetch", "double", "flaky", "report"} <= texts


def test_timeline_of_a_run_from_its_directory_alone(user: Path) -> None:
    out = cli(user, "run", "graphs.py:capped", "--caps", "worker=2")
    assert out.returncode == 0, out.stderr
    run = _only_run(user)
    (user / "graphs.py").unlink()  # the run directory is enough
    svg = user / "timeline.svg"
    shown = cli(user, "show", run, "--format", "timeline", "-o", str(svg))
    assert shown.returncode == 0, shown.stderr
    root = ET.parse(svg).getroot()
    bars = [e for e in root.iter() if e.tag.endswith("rect") and e.get("class") == "stage"]
    assert sorted(b.get("data-stage") for b in bars) == [
        "after", "job0", "job1", "job2", "job3", "retried"]
    assert {b.get("fill") for b in bars} == {"#8ecf8e"}  # finished, all of them
    lines = [e for e in root.iter() if e.tag.endswith("polyline")]
    assert [e.get("data-kind") for e in lines] == ["worker"]
    texts = [t.text or "" for t in root.iter() if t.tag.endswith("text")]
    assert "worker (at most 2)" in texts  # the cap held: never more than two at once
    assert "×2" in texts  # the retried stage's two attempts
    titles = [t.text or "" for t in root.iter() if t.tag.endswith("title")]
    assert any(t.startswith("retried: finished") and "2 attempts" in t for t in titles)


def test_why_names_the_cap_a_stage_waits_for_while_the_run_goes_on(user: Path) -> None:
    import time

    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_RUN_ROOT"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "graphs.py:live",
                             "--caps", "slot=1"], cwd=user, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        said = {}
        while time.monotonic() < deadline:
            runs = list((user / "pipeline-runs").glob("*/journal.jsonl"))
            if runs:
                run = runs[0].parent.name
                said = {name: cli(user, "why", run, name).stdout.strip()
                        for name in ("first", "second")}
                if all("waits for cap" in t or "runs now" in t for t in said.values()):
                    break
            time.sleep(0.1)
        # One holds the only slot; the other waits for it, as the run directory says.
        assert sorted(said.values(), key=lambda t: "waits" in t)[1].endswith(
            "its dependencies are done"), said
        assert any(t.split(" waits for cap 'slot' (at most 1 at once), for ")[0] in
                   ("first", "second") for t in said.values()), said
        assert any("runs now" in t for t in said.values()), said
        (user / "release").touch()
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        assert cli(user, "why", run, "second").stdout.startswith("second finished")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("args", "message"), [
    (["run", "graphs.py"], "expected MODULE:ATTR"),
    (["run", "graphs.py:nope"], "has no attribute 'nope'"),
    (["run", "graphs.py:NOT_A_GRAPH"], "is a int, not a Graph"),
    (["run", "no_such_module:make"], "no module 'no_such_module'"),
    (["run", "graphs.py:make", "--stop-after", "zz"], "--stop-after 'zz': no such stage"),
    (["run", "graphs.py:make", "--caps", "cpu=0"], "expected KIND=N with N >= 1"),
    (["resume", "20990101-000000-abcdef"], "no run '20990101-000000-abcdef'"),
    (["show", "graphs.py:make", "--format", "svg"], "give -o FILE"),
])
def test_bad_input_is_one_line_and_creates_no_run(user: Path, args: list[str],
                                                  message: str) -> None:
    out = cli(user, *args)
    assert out.returncode == 1, out
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert not (user / "pipeline-runs").exists() or not list((user / "pipeline-runs").iterdir())


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "pipeline-run"
    assert script.exists(), "pip install -e . makes it"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "Exit codes" in out.stdout

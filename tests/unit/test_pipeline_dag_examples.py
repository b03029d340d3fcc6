"""Each pipeline example in dag_examples/ runs as written (a subprocess) and says
what its docstring promises. (The build examples there are tested with the
build stages.)"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "dag_examples"


def run_example(name: str, out: Path) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_capped_pool(tmp_path):
    out = run_example("capped_pool.py", tmp_path)
    lines = out.splitlines()
    opened = [x for x in lines if x.startswith("open  connection")]
    closed = [x for x in lines if x.startswith("close connection")]
    assert len(opened) == len(closed) == 8
    # Never more than two connections open at once, by the printed log itself.
    depth = peak = 0
    for x in lines:
        if x.startswith("open  connection"):
            depth += 1
        elif x.startswith("close connection"):
            depth -= 1
        peak = max(peak, depth)
    assert peak == 2
    assert lines.index("close cache (8 entries)") > max(lines.index(x) for x in closed)
    assert "index: {'total': 872, 'cached': 8}" in out
    assert (tmp_path / next(p.name for p in tmp_path.iterdir()) / "journal.jsonl").exists()


def test_failing_teardown(tmp_path):
    out = run_example("failing_teardown.py", tmp_path)
    assert "teardown sees package: abandoned (dependency 'compile' failed)" in out
    assert "teardown sees docs: finished" in out
    made = next(x for x in out.splitlines() if x.startswith("made work directory"))
    assert not Path(made.split()[-1]).exists()
    assert "x compile" in out and (tmp_path / "events.jsonl").stat().st_size > 0


def test_stop_and_resume(tmp_path):
    out = run_example("stop_and_resume.py", tmp_path)
    assert "1. stopped after parse (stopped)" in out
    assert "report: sum=16 max=gamma" in out
    assert "5. refused: cannot resume" in out
    for name in ("stopped.svg", "finished.svg"):
        root = ET.parse(tmp_path / name).getroot()
        assert root.tag.endswith("svg")
    stopped = (tmp_path / "stopped.svg").read_text()
    assert "pending" in stopped and "finished" in stopped


def test_word_counts_through_the_command_line_only(tmp_path):
    """dag_examples/word_counts.py has no __main__: the CLI runs it, why names a
    failure, resume finishes it, show draws its timeline."""
    import json
    import os
    import shutil

    shutil.copy(EXAMPLES / "word_counts.py", tmp_path / "word_counts.py")

    def cli(*args, **env):
        full = {k: v for k, v in os.environ.items()
                if k not in ("PIPELINE_RUN_ROOT", "WORD_COUNTS_FAIL")}
        return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env={**full, **env})

    assert 'if __name__ == "__main__"' not in (EXAMPLES / "word_counts.py").read_text()
    failed = cli("run", "word_counts.py:graph", "--caps", "reader=2", WORD_COUNTS_FAIL="sea")
    assert failed.returncode == 1, failed.stderr
    (run,) = [p.name for p in (tmp_path / "pipeline-runs").iterdir()]
    assert cli("why", run, "publish").stdout.strip() == (
        "publish did not run: its dependency count_sea failed: stage 'count_sea' failed: "
        "RuntimeError: cannot read sea")
    done = cli("resume", run)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "word_counts.json").read_text()) == {
        "fox": 9, "rain": 9, "sea": 7, "total": 25}
    svg = cli("show", run, "--format", "timeline").stdout
    root = ET.fromstring(svg)
    bars = [e for e in root.iter() if e.tag.endswith("rect") and e.get("class") == "stage"]
    assert len(bars) == 5

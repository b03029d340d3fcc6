"""``ocibuild build/graph/runs/resume/shell`` where no container is needed.

Errors the user causes are one line on stderr with exit 1 and no traceback;
``graph`` draws the seven stages in every format. The CLI runs in-process
(stages.cli.main) for speed.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from stages.cli import main
from stages.request import BuildConstraints, BuildRequest, EnvVar, write_request_file

CHAIN = ["validate", "spec", "bundle", "mount", "run", "ingest", "teardown"]
# The chain, plus teardown after every stage (it waits for all of them).
EDGES = sorted({*zip(CHAIN, CHAIN[1:]), *((s, "teardown") for s in CHAIN[:-1])})


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("BUILD_SERVICE_ADDR", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OCIBUILD_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("OCIBUILD_STORE", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def request_file(tmp_path: Path) -> Path:
    req = BuildRequest(command_args=["/bin/sh", "-c", "true"], working_dir="build",
                       scratch_paths=["build"], inputs_dir="nix/store", outputs=["build/out"],
                       environment_vars=[EnvVar(key="PATH", value=b"/bin")],
                       constraints=BuildConstraints(system="x86_64-linux", provide_bin_sh=True))
    path = tmp_path / "req.json"
    write_request_file(path, req)
    return path


def one_error_line(capsys: pytest.CaptureFixture, code: int) -> str:
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ocibuild: error: ")
    return lines[0]


# --- graph --------------------------------------------------------------------------------


def test_graph_dot(request_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["graph", str(request_file), "--format", "dot"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("digraph")
    edges = re.findall(r'^\s*"(\w+)" -> "(\w+)";', out, re.M)
    assert sorted(edges) == EDGES


def test_graph_mermaid(request_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["graph", str(request_file), "--format", "mermaid"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("flowchart")
    ids = dict((label, node) for node, label in
               re.findall(r'^\s*(\w+)\[+"(\w+)(?:<br/>[^"]*)?"\]+', out, re.M))
    assert sorted(ids) == sorted(CHAIN)
    edges = re.findall(r"^\s*(\w+) --> (\w+)$", out, re.M)
    assert sorted(edges) == sorted((ids[a], ids[b]) for a, b in EDGES)


def test_graph_svg_to_a_file(request_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.svg"
    assert main(["graph", str(request_file), "-o", str(out)]) == 0
    root = ET.parse(out).getroot()
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert set(CHAIN) <= texts


def test_graph_svg_needs_an_output_file(request_file: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    line = one_error_line(capsys, main(["graph", str(request_file), "--format", "svg"]))
    assert "needs -o FILE" in line


def test_graph_unknown_suffix(request_file: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    line = one_error_line(capsys, main(["graph", str(request_file), "-o",
                                        str(tmp_path / "g.gif")]))
    assert "unknown format 'gif'" in line


# --- request files and arguments ------------------------------------------------------------


def test_missing_request_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    line = one_error_line(capsys, main(["build", str(tmp_path / "nope.json")]))
    assert "nope.json" in line


@pytest.mark.parametrize(("name", "data", "what"), [
    ("bad.json", "{not json", "bad.json"),
    ("bad.json", '{"commandArgs": 3}', "bad.json"),
    ("bad.txtpb", "command_args: [", "bad.txtpb"),
    ("bad.pb", b"\xff\xff\xff", "bad.pb"),
    ("req.yaml", "{}", "req.yaml"),
], ids=["json-syntax", "json-type", "textproto", "binary", "unknown-suffix"])
def test_bad_request_file(capsys: pytest.CaptureFixture, tmp_path: Path, name: str,
                          data: str | bytes, what: str) -> None:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    line = one_error_line(capsys, main(["build", str(path)]))
    assert what in line
    assert not (tmp_path / "state").exists(), "nothing is created for a bad request file"


def test_unknown_stop_after_stage(request_file: Path, capsys: pytest.CaptureFixture,
                                  tmp_path: Path) -> None:
    line = one_error_line(capsys, main(["build", "--stop-after", "bundel", str(request_file)]))
    assert "unknown stage 'bundel'" in line
    assert ", ".join(CHAIN) in line
    assert not (tmp_path / "state").exists()


def test_jobs_below_one(request_file: Path, capsys: pytest.CaptureFixture) -> None:
    line = one_error_line(capsys, main(["build", "--jobs", "0", str(request_file)]))
    assert "--jobs must be at least 1" in line


def test_dummy_build_service_addr_refuses(request_file: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setenv("BUILD_SERVICE_ADDR", "dummy://")
    line = one_error_line(capsys, main(["build", str(request_file)]))
    assert "dummy://" in line and "refuses every build" in line
    assert not (tmp_path / "state").exists()


def test_relative_oci_build_service_addr_refused(request_file: Path,
                                                 capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUILD_SERVICE_ADDR", "oci://relative/state")
    line = one_error_line(capsys, main(["build", str(request_file)]))
    assert "oci://relative/state" in line and "absolute path" in line


# --- runs, resume, shell --------------------------------------------------------------------


def test_runs_honours_build_service_addr(capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setenv("BUILD_SERVICE_ADDR", f"oci://{tmp_path}/other")
    assert main(["runs"]) == 0
    assert capsys.readouterr().out.strip() == f"no runs in {tmp_path}/other/runs"
    # --state-dir wins over the environment.
    assert main(["runs", "--state-dir", str(tmp_path / "third")]) == 0
    assert capsys.readouterr().out.strip() == f"no runs in {tmp_path}/third/runs"


def test_runs_lists_finished_and_unreadable_runs(capsys: pytest.CaptureFixture,
                                                 tmp_path: Path) -> None:
    from pipeline import Graph, Stage, run_sync

    async def ok(ctx):
        return 1

    run_sync(Graph(stages=[Stage(name="only", fn=ok)]), run_root=tmp_path / "state" / "runs",
             handle_signals=False)
    (tmp_path / "state" / "runs" / "zz-broken").mkdir()
    assert main(["runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"\S+\s+finished\s+1 finished", lines[0]), lines[0]
    assert lines[1].startswith("zz-broken  unreadable: ")


@pytest.mark.parametrize("command", [["resume", "no-such-run"], ["shell", "no-such-run"]])
def test_unknown_run(command: list[str], capsys: pytest.CaptureFixture) -> None:
    line = one_error_line(capsys, main(command))
    assert "no run 'no-such-run'" in line and "ocibuild runs" in line


def test_resume_of_a_directory_that_is_no_build_run(capsys: pytest.CaptureFixture,
                                                     tmp_path: Path) -> None:
    d = tmp_path / "state" / "runs" / "plain"
    d.mkdir(parents=True)
    line = one_error_line(capsys, main(["resume", "plain"]))
    assert "not a build run directory" in line


def test_shell_names_the_builds_of_a_run(capsys: pytest.CaptureFixture, tmp_path: Path,
                                         request_file: Path) -> None:
    from stages.context import BuildSpec
    from stages.request import read_request_file
    from stages.service.runs import save_specs as _save_specs

    run = tmp_path / "state" / "runs" / "r1"
    run.mkdir(parents=True)
    req = read_request_file(request_file)
    _save_specs(run, [BuildSpec(request=req, key="r1.0"), BuildSpec(request=req, key="r1.1")],
                None)
    line = one_error_line(capsys, main(["shell", "--build", "r1.7", "r1", "--", "/bin/true"]))
    assert "no build 'r1.7' in this run; builds: r1.0, r1.1" in line


def test_only_commands_that_build_here_prestart_a_mount_server(monkeypatch) -> None:
    from stages.cli import _mounts_inputs

    monkeypatch.delenv("BUILD_SERVICE_ADDR", raising=False)
    assert _mounts_inputs(["build", "r.json"])
    assert _mounts_inputs(["nix", "build", "/nix/store/x.drv"])
    for argv in (["build", "--help", "r.json"], ["nix", "build", "-h"], ["runs"],
                 ["castore", "import", "x"], ["nix", "export", "p", "d"], []):
        assert not _mounts_inputs(argv), argv
    monkeypatch.setenv("BUILD_SERVICE_ADDR", "grpc+http://[::1]:8000")
    assert not _mounts_inputs(["build", "r.json"])  # builds on the server
    assert _mounts_inputs(["nix", "build", "/nix/store/x.drv"])
    monkeypatch.setenv("BUILD_SERVICE_ADDR", "oci:///var/lib/ocibuild")
    assert _mounts_inputs(["build", "r.json"])

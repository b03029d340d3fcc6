"""Finding outputs on the host (stages.ingest.output_host_path), without following symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.errors import OutputError
from stages.ingest import output_host_path
from stages.oci.layout import BundleLayout
from stages.request import BuildRequest


def _req(outputs: list[str]) -> BuildRequest:
    return BuildRequest(command_args=["/b"], working_dir="build",
                        scratch_paths=["build", "build/nested", "nix/store"],
                        inputs_dir="nix/store", outputs=outputs)


@pytest.fixture
def layout(tmp_path: Path) -> BundleLayout:
    lay = BundleLayout(tmp_path / "bundle")
    for i in range(3):
        (lay.root / "scratch" / str(i)).mkdir(parents=True)
    return lay


def test_found_in_the_longest_scratch_path(layout: BundleLayout) -> None:
    req = _req(["build/a/b", "build/nested/x", "nix/store/out"])
    (layout.root / "scratch/0/a").mkdir()
    (layout.root / "scratch/0/a/b").write_text("b")
    (layout.root / "scratch/1/x").symlink_to("/etc")  # the output itself may be a symlink
    (layout.root / "scratch/2/out").mkdir()
    assert [output_host_path(layout, req, o) for o in req.outputs] == [
        layout.root / "scratch/0/a/b", layout.root / "scratch/1/x",
        layout.root / "scratch/2/out"]


@pytest.mark.parametrize("target", ["/etc", "../../..", "sibling"])
def test_symlink_above_the_output_refused(layout: BundleLayout, target: str) -> None:
    req = _req(["nix/store/evil/passwd"])
    (layout.root / "scratch/2/sibling").mkdir()
    (layout.root / "scratch/2/sibling/passwd").write_text("x")
    (layout.root / "scratch/2/evil").symlink_to(target)
    with pytest.raises(OutputError, match=r"nix/store/evil is a symlink") as info:
        output_host_path(layout, req, "nix/store/evil/passwd")
    assert info.value.output == "nix/store/evil/passwd"


def test_file_above_the_output_refused(layout: BundleLayout) -> None:
    (layout.root / "scratch/0/f").write_text("x")
    with pytest.raises(OutputError, match=r"build/f is not a directory"):
        output_host_path(layout, _req(["build/f/g"]), "build/f/g")


@pytest.mark.parametrize("output", ["build/missing", "build/missing/deeper"])
def test_missing_output_named(layout: BundleLayout, output: str) -> None:
    with pytest.raises(OutputError, match="did not create this output") as info:
        output_host_path(layout, _req([output]), output)
    assert info.value.output == output


def test_dangling_symlink_output_is_found(layout: BundleLayout) -> None:
    os.symlink("/nowhere", layout.root / "scratch/2/dangling")
    assert output_host_path(layout, _req(["nix/store/dangling"]), "nix/store/dangling") == \
        layout.root / "scratch/2/dangling"

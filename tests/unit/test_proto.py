"""The checked-in generated protobuf code is what `make proto` would produce.

The generator runs exactly as the Makefile's ``proto`` target runs it
(grpc_tools.protoc with the python, grpc_python, mypy and mypy_grpc outputs,
from the repository root), but into a temporary directory; every generated
file must equal its checked-in copy byte for byte, and no generated file may be
missing or left over.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "stages" / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> Path:
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is missing; install the test extras (make install)")
        path = Path(found)
    return path


def _generated(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "stages" / "proto").iterdir()
            if p.name.endswith(GENERATED_SUFFIXES)}


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    assert protos, f"no .proto files under {PROTO_DIR}"
    (tmp_path / "stages" / "proto").mkdir(parents=True)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".",
           f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
           f"--mypy_out={tmp_path}", f"--mypy_grpc_out={tmp_path}",
           f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
           f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
           *[str(p.relative_to(REPO)) for p in protos]]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"protoc failed: {result.stderr}"

    fresh = _generated(tmp_path)
    checked_in = _generated(REPO)
    expected_names = {p.stem + s for p in protos for s in GENERATED_SUFFIXES}
    assert set(fresh) == expected_names, "protoc produced an unexpected set of files"
    assert sorted(set(fresh) - set(checked_in)) == [], "generated files missing; run make proto"
    assert sorted(set(checked_in) - set(fresh)) == [], \
        "generated files without a .proto; remove them and run make proto"
    stale = sorted(name for name in fresh if fresh[name] != checked_in[name])
    assert stale == [], f"stale generated code: {stale}; run make proto and commit"


def test_proto_package_and_fields_are_the_protocol() -> None:
    # A few spot checks of the wire contract, read from the descriptors
    # rather than the generated Python classes.
    from stages.proto import build_pb2, castore_pb2

    fields = {f.name: (f.number, f.type) for f in castore_pb2.FileNode.DESCRIPTOR.fields}
    from google.protobuf.descriptor import FieldDescriptor as F
    assert fields == {"name": (1, F.TYPE_BYTES), "digest": (2, F.TYPE_BYTES),
                      "size": (3, F.TYPE_UINT64), "executable": (4, F.TYPE_BOOL)}
    assert castore_pb2.DESCRIPTOR.package == "tvix.castore.v1"
    assert build_pb2.DESCRIPTOR.package == "tvix.build.v1"
    node = castore_pb2.Node.DESCRIPTOR
    assert [(f.name, f.number) for f in node.oneofs_by_name["node"].fields] == [
        ("directory", 1), ("file", 2), ("symlink", 3)]
    request = {f.name: f.number for f in build_pb2.BuildRequest.DESCRIPTOR.fields}
    assert request == {"inputs": 1, "command_args": 2, "working_dir": 3, "scratch_paths": 4,
                       "inputs_dir": 5, "outputs": 6, "environment_vars": 7,
                       "constraints": 8, "additional_files": 9, "refscan_needles": 10}

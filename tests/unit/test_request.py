"""BuildRequest/Build domain types: the protobuf boundary and request files."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format, text_format
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import builds, valid_requests

from stages.errors import RequestError, RequestFileError
from stages.proto import build_pb2, castore_pb2
from stages.request import (
    BuildConstraints,
    BuildRequest,
    build_from_proto,
    build_to_json,
    build_to_proto,
    read_request_file,
    request_from_proto,
    request_to_proto,
    write_request_file,
)

requests_any_env = valid_requests(utf8_env=False)


@given(requests_any_env)
def test_request_round_trips_through_proto(req: BuildRequest) -> None:
    assert request_from_proto(request_to_proto(req)) == req


@given(requests_any_env)
def test_request_round_trips_through_wire_bytes(req: BuildRequest) -> None:
    wire = request_to_proto(req).SerializeToString(deterministic=True)
    msg = build_pb2.BuildRequest()
    msg.ParseFromString(wire)
    assert request_from_proto(msg) == req
    # and the message side: proto -> domain -> proto is the same message
    assert request_to_proto(request_from_proto(msg)) == msg


@given(builds())
def test_build_round_trips(build) -> None:
    assert build_from_proto(build_to_proto(build)) == build
    parsed = build_pb2.Build()
    json_format.Parse(build_to_json(build), parsed)
    assert build_from_proto(parsed) == build


def test_absent_and_empty_constraints_stay_distinct() -> None:
    absent = BuildRequest(command_args=["x"])
    empty = BuildRequest(command_args=["x"], constraints=BuildConstraints())
    assert not request_to_proto(absent).HasField("constraints")
    assert request_to_proto(empty).HasField("constraints")
    assert request_from_proto(request_to_proto(empty)).constraints == BuildConstraints()
    assert request_from_proto(request_to_proto(absent)).constraints is None


def test_bad_input_node_is_refused_naming_the_input() -> None:
    msg = build_pb2.BuildRequest(inputs=[
        castore_pb2.Node(file=castore_pb2.FileNode(name=b"ok", digest=b"\0" * 32)),
        castore_pb2.Node(file=castore_pb2.FileNode(name=b"short", digest=b"\0" * 5)),
    ])
    with pytest.raises(RequestError) as info:
        request_from_proto(msg)
    assert info.value.field == "inputs[1]"
    assert info.value.rule == "digest-length"


@pytest.mark.parametrize("ext", [".json", ".pb", ".binpb", ".txtpb", ".textproto"])
@settings(max_examples=20)
@given(req=requests_any_env)
def test_request_files_round_trip(tmp_path_factory, ext: str, req: BuildRequest) -> None:
    path = tmp_path_factory.mktemp("req") / f"r{ext}"
    write_request_file(path, req)
    assert read_request_file(path) == req


def test_json_file_written_by_hand(tmp_path) -> None:
    path = tmp_path / "hello.json"
    path.write_text(json.dumps({
        "commandArgs": ["/bin/sh", "-c", "echo hi"],
        "workingDir": "build",
        "scratchPaths": ["build"],
        "environmentVars": [{"key": "A", "value": "Yg=="}],
        "constraints": {"system": "x86_64-linux", "provideBinSh": True},
    }))
    req = read_request_file(path)
    assert req.command_args == ("/bin/sh", "-c", "echo hi")
    assert req.environment_vars[0].value == b"b"
    assert req.provide_bin_sh


def test_text_file_written_by_hand(tmp_path) -> None:
    path = tmp_path / "hello.textproto"
    path.write_text('command_args: "/bin/true"\nworking_dir: "build"\n')
    assert read_request_file(path).command_args == ("/bin/true",)


@pytest.mark.parametrize("name,content,rule,words", [
    ("r.yaml", b"x", "file-extension", ".yaml"),
    ("noext", b"x", "file-extension", "(none)"),
    ("r.json", b"{not json", "file-json", "json"),
    ("r.json", b'{"commandArgz": []}', "file-json", "commandArgz"),
    ("r.json", b"\xff\xfe", "file-encoding", "UTF-8"),
    ("r.txtpb", b"command_args: 5 5", "file-text", "text"),
    ("r.pb", b"\xff\xff\xff", "file-binary", "binary"),
    ("r.json", json.dumps({"inputs": [{"file": {"name": "YQ==", "digest": "AA=="}}]}).encode(),
     "digest-length", "inputs[0]"),
], ids=["ext-unknown", "ext-none", "json-syntax", "json-unknown-field", "json-not-utf8",
        "text-syntax", "binary-garbage", "bad-node"])
def test_bad_request_files_name_file_and_problem(tmp_path, name, content, rule, words) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RequestFileError) as info:
        read_request_file(path)
    assert info.value.rule == rule
    assert str(path) in str(info.value)
    assert words in str(info.value)


def test_missing_request_file(tmp_path) -> None:
    with pytest.raises(RequestFileError) as info:
        read_request_file(tmp_path / "gone.json")
    assert info.value.rule == "file-unreadable"
    assert "gone.json" in str(info.value)


def test_text_format_matches_protobuf_text_format() -> None:
    # the text writer is protobuf's own: parse it with protobuf directly
    req = BuildRequest(command_args=["a", "b"], working_dir="build")
    msg = text_format.Parse(text_format.MessageToString(request_to_proto(req)),
                            build_pb2.BuildRequest())
    assert request_from_proto(msg) == req


@given(st.binary(max_size=64))
def test_arbitrary_binary_never_crashes_reader(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "r.pb"
    path.write_bytes(data)
    try:
        read_request_file(path)
    except RequestFileError:
        pass

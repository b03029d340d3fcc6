"""The build request and its result as domain values, and their wire forms.

Frozen attrs values for ``tvix.build.v1`` (PROTOCOL.md). The generated
protobuf classes (``stages.proto.build_pb2``) are converted to and from these
types only here (``*_to_proto`` / ``*_from_proto``), and request files are
read here too (:func:`read_request_file`).

Caveats:

- Construction checks types and node validity only. The protocol's rules
  (sorted lists, clean paths, ...) are checked by
  :func:`stages.validate.validate_request`, so that a bad request can be
  held, printed and refused with an error naming the field.
- ``constraints`` is ``None`` when the message field is absent; an empty
  but present BuildConstraints stays distinct (the protocol then requires a
  system).
- Input nodes whose wire form breaks a castore rule are refused at the
  boundary with a RequestError naming ``inputs[i]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import attrs
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

from stages.castore.errors import ValidationError
from stages.castore.nodes import Node, node_from_proto, node_to_proto
from stages.errors import RequestError, RequestFileError
from stages.proto import build_pb2

__all__ = [
    "AdditionalFile",
    "Build",
    "BuildConstraints",
    "BuildRequest",
    "EnvVar",
    "OutputNeedles",
    "REQUEST_FILE_FORMATS",
    "build_from_proto",
    "build_to_json",
    "build_to_proto",
    "read_request_file",
    "request_from_proto",
    "request_to_json",
    "request_to_proto",
    "write_request_file",
]


def _tuple_of(kind: type | tuple[type, ...]) -> Callable[[object, attrs.Attribute, tuple], None]:
    def check(_inst: object, attribute: attrs.Attribute, value: tuple) -> None:
        for i, item in enumerate(value):
            if not isinstance(item, kind):
                raise TypeError(f"{attribute.name}[{i}] must be {kind}, got {type(item).__name__}")
    return check


# Typed converters (attrs' mypy plugin cannot solve converter=tuple's type variable).
def _strs(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(items)


def _ints(items: Iterable[int]) -> tuple[int, ...]:
    return tuple(items)


def _nodes(items: Iterable[Node]) -> tuple[Node, ...]:
    return tuple(items)


def _env_vars(items: Iterable[EnvVar]) -> tuple[EnvVar, ...]:
    return tuple(items)


def _additional_files(items: Iterable[AdditionalFile]) -> tuple[AdditionalFile, ...]:
    return tuple(items)


def _output_needles(items: Iterable[OutputNeedles]) -> tuple[OutputNeedles, ...]:
    return tuple(items)


@attrs.frozen(kw_only=True)
class EnvVar:
    """One environment variable; the value is raw bytes as on the wire."""

    key: str = attrs.field(validator=attrs.validators.instance_of(str))
    value: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))


@attrs.frozen(kw_only=True)
class BuildConstraints:
    """What the machine and sandbox must provide."""

    system: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    min_memory: int = attrs.field(default=0, validator=attrs.validators.instance_of(int))
    available_ro_paths: tuple[str, ...] = attrs.field(default=(), converter=_strs,
                                                      validator=_tuple_of(str))
    network_access: bool = False
    provide_bin_sh: bool = False


@attrs.frozen(kw_only=True)
class AdditionalFile:
    """A file placed into the build root before the build starts."""

    path: str = attrs.field(validator=attrs.validators.instance_of(str))
    contents: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))


_NODE_TYPES: tuple[type, ...] = Node.__args__


@attrs.frozen(kw_only=True)
class BuildRequest:
    """Everything a builder needs for one hermetic build (tvix.build.v1)."""

    inputs: tuple[Node, ...] = attrs.field(default=(), converter=_nodes,
                                           validator=_tuple_of(_NODE_TYPES))
    command_args: tuple[str, ...] = attrs.field(default=(), converter=_strs,
                                                validator=_tuple_of(str))
    working_dir: str = ""
    scratch_paths: tuple[str, ...] = attrs.field(default=(), converter=_strs,
                                                 validator=_tuple_of(str))
    inputs_dir: str = ""
    outputs: tuple[str, ...] = attrs.field(default=(), converter=_strs, validator=_tuple_of(str))
    environment_vars: tuple[EnvVar, ...] = attrs.field(default=(), converter=_env_vars,
                                                       validator=_tuple_of(EnvVar))
    constraints: BuildConstraints | None = None
    additional_files: tuple[AdditionalFile, ...] = attrs.field(
        default=(), converter=_additional_files, validator=_tuple_of(AdditionalFile))
    refscan_needles: tuple[str, ...] = attrs.field(default=(), converter=_strs,
                                                   validator=_tuple_of(str))

    @property
    def network_access(self) -> bool:
        return self.constraints is not None and self.constraints.network_access

    @property
    def provide_bin_sh(self) -> bool:
        return self.constraints is not None and self.constraints.provide_bin_sh

    @property
    def available_ro_paths(self) -> tuple[str, ...]:
        return self.constraints.available_ro_paths if self.constraints is not None else ()


@attrs.frozen(kw_only=True)
class OutputNeedles:
    """Indexes into the request's refscan_needles found in one output."""

    needles: tuple[int, ...] = attrs.field(default=(), converter=_ints, validator=_tuple_of(int))


@attrs.frozen(kw_only=True)
class Build:
    """A finished build: the request, one anonymous node per output, needles."""

    build_request: BuildRequest
    outputs: tuple[Node, ...] = attrs.field(default=(), converter=_nodes,
                                            validator=_tuple_of(_NODE_TYPES))
    outputs_needles: tuple[OutputNeedles, ...] = attrs.field(
        default=(), converter=_output_needles, validator=_tuple_of(OutputNeedles))


# --- the protobuf boundary -------------------------------------------------

_Msg = build_pb2.BuildRequest


def request_to_proto(req: BuildRequest) -> build_pb2.BuildRequest:
    msg = _Msg(
        inputs=[node_to_proto(n) for n in req.inputs],
        command_args=list(req.command_args),
        working_dir=req.working_dir,
        scratch_paths=list(req.scratch_paths),
        inputs_dir=req.inputs_dir,
        outputs=list(req.outputs),
        environment_vars=[_Msg.EnvVar(key=e.key, value=e.value) for e in req.environment_vars],
        additional_files=[_Msg.AdditionalFile(path=f.path, contents=f.contents)
                          for f in req.additional_files],
        refscan_needles=list(req.refscan_needles),
    )
    if req.constraints is not None:
        c = req.constraints
        msg.constraints.CopyFrom(_Msg.BuildConstraints(
            system=c.system, min_memory=c.min_memory,
            available_ro_paths=list(c.available_ro_paths),
            network_access=c.network_access, provide_bin_sh=c.provide_bin_sh))
    return msg


def _nodes_from_proto(msgs: Iterable, field: str) -> tuple[Node, ...]:
    nodes = []
    for i, m in enumerate(msgs):
        try:
            nodes.append(node_from_proto(m))
        except ValidationError as exc:
            raise RequestError(f"{field}[{i}]", exc.rule, str(exc)) from exc
    return tuple(nodes)


def request_from_proto(msg: build_pb2.BuildRequest) -> BuildRequest:
    """Convert a BuildRequest message; bad input nodes raise RequestError."""
    constraints = None
    if msg.HasField("constraints"):
        c = msg.constraints
        constraints = BuildConstraints(
            system=c.system, min_memory=c.min_memory,
            available_ro_paths=tuple(c.available_ro_paths),
            network_access=c.network_access, provide_bin_sh=c.provide_bin_sh)
    return BuildRequest(
        inputs=_nodes_from_proto(msg.inputs, "inputs"),
        command_args=tuple(msg.command_args),
        working_dir=msg.working_dir,
        scratch_paths=tuple(msg.scratch_paths),
        inputs_dir=msg.inputs_dir,
        outputs=tuple(msg.outputs),
        environment_vars=tuple(EnvVar(key=e.key, value=e.value) for e in msg.environment_vars),
        constraints=constraints,
        additional_files=tuple(AdditionalFile(path=f.path, contents=f.contents)
                               for f in msg.additional_files),
        refscan_needles=tuple(msg.refscan_needles),
    )


def build_to_proto(build: Build) -> build_pb2.Build:
    return build_pb2.Build(
        build_request=request_to_proto(build.build_request),
        outputs=[node_to_proto(n) for n in build.outputs],
        outputs_needles=[build_pb2.Build.OutputNeedles(needles=list(n.needles))
                         for n in build.outputs_needles],
    )


def build_from_proto(msg: build_pb2.Build) -> Build:
    return Build(
        build_request=request_from_proto(msg.build_request),
        outputs=_nodes_from_proto(msg.outputs, "outputs"),
        outputs_needles=tuple(OutputNeedles(needles=tuple(n.needles))
                              for n in msg.outputs_needles),
    )


def request_to_json(req: BuildRequest) -> str:
    """One line of proto-JSON (google.protobuf.json_format)."""
    return json_format.MessageToJson(request_to_proto(req), indent=None)


def build_to_json(build: Build) -> str:
    """One line of proto-JSON for a Build, as ``ocibuild build --json`` prints."""
    return json_format.MessageToJson(build_to_proto(build), indent=None)


# --- request files ---------------------------------------------------------

#: Request file formats by file name extension.
REQUEST_FILE_FORMATS = {
    ".json": "json",
    ".pb": "binary",
    ".binpb": "binary",
    ".txtpb": "text",
    ".textproto": "text",
}


def _format_of(path: Path) -> str:
    fmt = REQUEST_FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(REQUEST_FILE_FORMATS))
        raise RequestFileError(path, "file-extension",
                               f"unknown request file extension {path.suffix or '(none)'!r}; "
                               f"use one of {known}")
    return fmt


def read_request_file(path: Path | str) -> BuildRequest:
    """Read a BuildRequest from proto JSON, binary or text format, by extension.

    Errors name the file and what is wrong with it (RequestFileError).
    """
    path = Path(path)
    fmt = _format_of(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RequestFileError(path, "file-unreadable",
                               f"cannot read the request file: {exc.strerror}") from exc
    msg = build_pb2.BuildRequest()
    try:
        if fmt == "binary":
            msg.ParseFromString(data)
        else:
            text = data.decode("utf-8")
            if fmt == "json":
                json_format.Parse(text, msg)
            else:
                text_format.Parse(text, msg)
    except UnicodeDecodeError as exc:
        raise RequestFileError(path, "file-encoding",
                               f"a {fmt} request file must be UTF-8: {exc}") from exc
    except (json_format.ParseError, text_format.ParseError, DecodeError) as exc:
        raise RequestFileError(path, f"file-{fmt}",
                               f"not a {fmt} tvix.build.v1.BuildRequest: {exc}") from exc
    try:
        return request_from_proto(msg)
    except RequestError as exc:
        raise RequestFileError(path, exc.rule, f"{exc.field}: {exc.detail}") from exc


def write_request_file(path: Path | str, req: BuildRequest) -> None:
    """Write a BuildRequest in the format its extension names."""
    path = Path(path)
    fmt = _format_of(path)
    msg = request_to_proto(req)
    if fmt == "binary":
        path.write_bytes(msg.SerializeToString(deterministic=True))
    elif fmt == "json":
        path.write_text(json_format.MessageToJson(msg) + "\n")
    else:
        path.write_text(text_format.MessageToString(msg))

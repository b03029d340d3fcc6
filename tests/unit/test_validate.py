"""validate_request: one case per rule, each naming the field and the rule."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from strategies import valid_requests

from stages.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from stages.errors import RequestError
from stages.request import AdditionalFile, BuildConstraints, BuildRequest, EnvVar
from stages.validate import RULES, longest_scratch_prefix, validate_request

D = b"\x01" * 32


def base(**changes) -> BuildRequest:
    """A Nix-shaped request that is valid."""
    req = BuildRequest(
        inputs=[DirectoryNode(name=b"aaa-dep", digest=D, size=0),
                FileNode(name=b"bbb-src.sh", digest=D, size=3)],
        command_args=["/nix/store/aaa-dep/bin/sh", "-e", "builder.sh"],
        working_dir="build",
        scratch_paths=["build", "nix/store"],
        inputs_dir="nix/store",
        outputs=["nix/store/ccc-out", "nix/store/ddd-dev"],
        environment_vars=[EnvVar(key="HOME", value=b"/homeless-shelter"),
                          EnvVar(key="out", value=b"/nix/store/ccc-out")],
        constraints=BuildConstraints(system="x86_64-linux", available_ro_paths=["/opt/ro"],
                                     provide_bin_sh=True),
        additional_files=[AdditionalFile(path="build/.attrs.json", contents=b"{}")],
        refscan_needles=["ccc", "ddd"],
    )
    return attrs.evolve(req, **changes)


def c(**changes) -> BuildConstraints:
    return attrs.evolve(base().constraints, **changes)


def test_base_is_valid() -> None:
    assert validate_request(base()) == base()


@given(valid_requests())
def test_generated_requests_are_valid(req) -> None:
    validate_request(req)


CASES = [
    # (id, changes, field, rule)
    ("args-empty", dict(command_args=[]), "command_args", "args-empty"),
    ("arg-too-long", dict(command_args=["/bin/sh", "x" * (128 << 10)]), "command_args[1]",
     "exec-string-too-long"),
    ("env-too-long", dict(environment_vars=[EnvVar(key="A", value=b"v" * (3 << 20))]),
     "environment_vars[0].value", "exec-string-too-long"),
    ("exec-too-big", dict(command_args=["/bin/sh", *["y" * 100_000] * 21]), "command_args",
     "exec-too-big"),
    ("arg0-empty", dict(command_args=["", "x"]), "command_args[0]", "arg-empty"),
    ("arg-nul", dict(command_args=["/bin/sh", "a\0b"]), "command_args[1]", "nul"),
    ("workdir-empty", dict(working_dir=""), "working_dir", "path-empty"),
    ("workdir-absolute", dict(working_dir="/build"), "working_dir", "path-absolute"),
    ("workdir-dotdot", dict(working_dir="build/../.."), "working_dir", "path-clean"),
    ("workdir-dot", dict(working_dir="./build"), "working_dir", "path-clean"),
    ("workdir-trailing-slash", dict(working_dir="build/"), "working_dir", "path-clean"),
    ("workdir-double-slash", dict(working_dir="a//b"), "working_dir", "path-clean"),
    ("workdir-nul", dict(working_dir="bu\0ild"), "working_dir", "nul"),
    ("component-too-long", dict(working_dir="a" * 256), "working_dir", "path-too-long"),
    ("path-too-long", dict(working_dir="/".join(["a" * 200] * 21)), "working_dir",
     "path-too-long"),
    ("inputs-dir-empty", dict(inputs_dir=""), "inputs_dir", "path-empty"),
    ("inputs-dir-escape", dict(inputs_dir="../store"), "inputs_dir", "path-clean"),
    ("inputs-dir-absolute", dict(inputs_dir="/nix/store"), "inputs_dir", "path-absolute"),
    ("scratch-dotdot", dict(scratch_paths=["..", "build"]), "scratch_paths[0]", "path-clean"),
    ("scratch-absolute", dict(scratch_paths=["/build"]), "scratch_paths[0]", "path-absolute"),
    ("scratch-reserved-proc", dict(scratch_paths=["build", "nix/store", "proc"]),
     "scratch_paths[2]", "path-reserved"),
    ("scratch-reserved-etc", dict(scratch_paths=["build", "etc", "nix/store"]),
     "scratch_paths[1]", "path-reserved"),
    ("scratch-unsorted", dict(scratch_paths=["nix/store", "build"]), "scratch_paths[1]",
     "sorted"),
    ("scratch-duplicate", dict(scratch_paths=["build", "build", "nix/store"]),
     "scratch_paths[1]", "unique"),
    ("output-escape", dict(outputs=["nix/store/../../etc"]), "outputs[0]", "path-clean"),
    ("output-absolute", dict(outputs=["/nix/store/ccc-out"]), "outputs[0]", "path-absolute"),
    ("output-unsorted", dict(outputs=["nix/store/ddd", "nix/store/ccc"]), "outputs[1]",
     "sorted"),
    ("output-duplicate", dict(outputs=["nix/store/ccc", "nix/store/ccc"]), "outputs[1]",
     "unique"),
    ("output-outside-scratch", dict(outputs=["nix/store/ccc-out", "opt/x"]), "outputs[1]",
     "output-outside-scratch"),
    ("output-on-input", dict(outputs=["nix/store/aaa-dep"]), "outputs[0]", "collision"),
    ("output-in-input", dict(outputs=["nix/store/aaa-dep/x"]), "outputs[0]", "collision"),
    ("input-unnamed", dict(inputs=[DirectoryNode(name=b"", digest=D, size=0)]), "inputs[0]",
     "input-name"),
    ("input-not-utf8", dict(inputs=[DirectoryNode(name=b"\xff", digest=D, size=0)]),
     "inputs[0]", "input-name"),
    ("inputs-unsorted", dict(inputs=[SymlinkNode(name=b"b", target=b"x"),
                                     SymlinkNode(name=b"a", target=b"x")]),
     "inputs[1]", "sorted"),
    ("inputs-duplicate", dict(inputs=[SymlinkNode(name=b"a", target=b"x"),
                                      FileNode(name=b"a", digest=D, size=0)]),
     "inputs[1]", "unique"),
    ("env-key-empty", dict(environment_vars=[EnvVar(key="", value=b"")]),
     "environment_vars[0].key", "env-key"),
    ("env-key-equals", dict(environment_vars=[EnvVar(key="A=B", value=b"")]),
     "environment_vars[0].key", "env-key"),
    ("env-key-nul", dict(environment_vars=[EnvVar(key="A\0", value=b"")]),
     "environment_vars[0].key", "env-key"),
    ("env-value-nul", dict(environment_vars=[EnvVar(key="A", value=b"a\0")]),
     "environment_vars[0].value", "nul"),
    ("env-unsorted", dict(environment_vars=[EnvVar(key="b", value=b""),
                                            EnvVar(key="a", value=b"")]),
     "environment_vars[1]", "sorted"),
    ("env-duplicate", dict(environment_vars=[EnvVar(key="a", value=b"1"),
                                             EnvVar(key="a", value=b"2")]),
     "environment_vars[1]", "unique"),
    ("system-empty", dict(constraints=BuildConstraints()), "constraints.system",
     "system-empty"),
    ("ro-relative", dict(constraints=c(available_ro_paths=["opt/ro"])),
     "constraints.available_ro_paths[0]", "path-relative"),
    ("ro-root", dict(constraints=c(available_ro_paths=["/"])),
     "constraints.available_ro_paths[0]", "path-reserved"),
    ("ro-dotdot", dict(constraints=c(available_ro_paths=["/opt/../etc"])),
     "constraints.available_ro_paths[0]", "path-clean"),
    ("ro-trailing-slash", dict(constraints=c(available_ro_paths=["/opt/"])),
     "constraints.available_ro_paths[0]", "path-clean"),
    ("ro-reserved", dict(constraints=c(available_ro_paths=["/dev/kvm"])),
     "constraints.available_ro_paths[0]", "path-reserved"),
    ("ro-unsorted", dict(constraints=c(available_ro_paths=["/b", "/a"])),
     "constraints.available_ro_paths[1]", "sorted"),
    ("ro-duplicate", dict(constraints=c(available_ro_paths=["/a", "/a"])),
     "constraints.available_ro_paths[1]", "unique"),
    ("ro-hides-scratch", dict(constraints=c(available_ro_paths=["/nix"])),
     "constraints.available_ro_paths[0]", "collision"),
    ("ro-in-input", dict(constraints=c(available_ro_paths=["/nix/store/aaa-dep/lib"])),
     "constraints.available_ro_paths[0]", "collision"),
    ("needle-empty", dict(refscan_needles=["ccc", ""]), "refscan_needles[1]", "needle-empty"),
    ("file-escape", dict(additional_files=[AdditionalFile(path="../x", contents=b"")]),
     "additional_files[0].path", "path-clean"),
    ("file-absolute", dict(additional_files=[AdditionalFile(path="/etc/x", contents=b"")]),
     "additional_files[0].path", "path-absolute"),
    ("file-on-passwd", dict(additional_files=[AdditionalFile(path="etc/passwd",
                                                             contents=b"")]),
     "additional_files[0].path", "path-reserved"),
    ("file-on-bin-sh", dict(additional_files=[AdditionalFile(path="bin", contents=b"")]),
     "additional_files[0].path", "path-reserved"),
    ("file-in-input", dict(additional_files=[AdditionalFile(path="nix/store/aaa-dep/x",
                                                            contents=b"")]),
     "additional_files[0].path", "collision"),
    ("file-on-input", dict(additional_files=[AdditionalFile(path="nix/store/bbb-src.sh",
                                                            contents=b"")]),
     "additional_files[0].path", "collision"),
    ("file-in-ro-path", dict(additional_files=[AdditionalFile(path="opt/ro/x",
                                                              contents=b"")]),
     "additional_files[0].path", "collision"),
    ("file-on-scratch", dict(additional_files=[AdditionalFile(path="build", contents=b"")]),
     "additional_files[0].path", "collision"),
    ("file-above-inputs-dir", dict(scratch_paths=["build"], outputs=["build/out"],
                                   additional_files=[AdditionalFile(path="nix",
                                                                    contents=b"")]),
     "additional_files[0].path", "collision"),
    ("file-on-workdir", dict(working_dir="work", additional_files=[
        AdditionalFile(path="work", contents=b"")]),
     "additional_files[0].path", "collision"),
    ("file-duplicate", dict(additional_files=[AdditionalFile(path="build/a", contents=b""),
                                              AdditionalFile(path="build/a", contents=b"")]),
     "additional_files[0].path", "unique"),
    ("file-above-file", dict(additional_files=[AdditionalFile(path="build/a", contents=b""),
                                               AdditionalFile(path="build/a/b",
                                                              contents=b"")]),
     "additional_files[0].path", "collision"),
    ("scratch-in-input", dict(scratch_paths=["build", "nix/store", "nix/store/aaa-dep/w"]),
     "scratch_paths[2]", "collision"),
]


@pytest.mark.parametrize("changes,field,rule", [c_[1:] for c_ in CASES],
                         ids=[c_[0] for c_ in CASES])
def test_rule(changes, field, rule) -> None:
    req = base(**changes)
    with pytest.raises(RequestError) as info:
        validate_request(req)
    assert (info.value.field, info.value.rule) == (field, rule), str(info.value)
    assert field in str(info.value) and rule in str(info.value)


def test_every_rule_has_a_case() -> None:
    assert {case[3] for case in CASES} == set(RULES)


def test_longest_prefix_wins() -> None:
    assert longest_scratch_prefix("nix/store/x", ["nix", "nix/store"]) == "nix/store"
    assert longest_scratch_prefix("nix/x", ["nix", "nix/store"]) == "nix"
    assert longest_scratch_prefix("nixx/y", ["nix"]) is None
    assert longest_scratch_prefix("nix", ["nix"]) == "nix"


def test_validation_touches_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RequestError):
        validate_request(base(outputs=["x/y"], working_dir="x"))
    assert list(tmp_path.iterdir()) == []


def test_no_inputs_allows_empty_inputs_dir() -> None:
    validate_request(base(inputs=[], inputs_dir=""))

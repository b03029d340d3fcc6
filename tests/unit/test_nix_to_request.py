"""Derivation -> BuildRequest, rule by rule (PROTOCOL.md; Nix 2.8's initEnv).

Expected values are written out here. The two passAsFile file names are the
ones Nix 2.8 itself wrote for ``big`` and ``other`` in
tests/integration/test_nix_env.py; that test also compares the whole
sandbox with a real nix-build.
"""

from __future__ import annotations

import os

import pytest

from stages.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from stages.nix import (
    Derivation,
    DerivationOutput,
    MissingInputError,
    NixError,
    UnsupportedDerivation,
    derivation_to_request,
    parse_derivation,
)
from stages.nix.structured import hash_placeholder
from stages.nix.to_request import attr_file_name
from stages.request import AdditionalFile, BuildConstraints, EnvVar
from stages.validate import validate_request

H_OUT = "1" * 32
H_DEV = "2" * 32
H_BB = "3" * 32
H_SRC = "4" * 32
H_DEP = "5" * 32
H_DEPDRV = "6" * 32
H_DEPLIB = "7" * 32
H_EXTRA = "8" * 32

OUT = f"/nix/store/{H_OUT}-hello"
DEV = f"/nix/store/{H_DEV}-hello-dev"
BB = f"/nix/store/{H_BB}-busybox"
SRC = f"/nix/store/{H_SRC}-src.txt"
DEP_DRV = f"/nix/store/{H_DEPDRV}-dep.drv"
DEP_OUT = f"/nix/store/{H_DEP}-dep"
DEP_LIB = f"/nix/store/{H_DEPLIB}-dep-lib"
EXTRA = f"/nix/store/{H_EXTRA}-in-closure"

DIGEST = bytes(range(32))
NODES = {
    BB: DirectoryNode(name=b"whatever", digest=DIGEST, size=3),
    SRC: FileNode(name=b"src", digest=DIGEST, size=5),
    DEP_OUT: SymlinkNode(name=b"", target=b"elsewhere"),
    DEP_LIB: FileNode(name=b"x", digest=DIGEST, size=1, executable=True),
    EXTRA: FileNode(name=b"y", digest=DIGEST, size=2),
}
DEP = Derivation(outputs={"out": DerivationOutput(path=DEP_OUT),
                          "lib": DerivationOutput(path=DEP_LIB)},
                 system="x86_64-linux", builder="/b", env={})


def read_drv(path: str) -> Derivation:
    if path == DEP_DRV:
        return DEP
    raise NixError(f"no such test derivation {path}")


def make_drv(env: dict[str, str] | None = None, **kw: object) -> Derivation:
    fields: dict[str, object] = dict(
        outputs={"out": DerivationOutput(path=OUT), "dev": DerivationOutput(path=DEV)},
        input_drvs={DEP_DRV: ("out",)},
        input_srcs=(BB, SRC),
        system="x86_64-linux",
        builder=f"{BB}/busybox",
        args=("sh", "-c", "echo hi > $out"),
        env={"name": "hello", "out": OUT, "dev": DEV, **(env or {})},
    )
    fields.update(kw)
    return Derivation(**fields)  # type: ignore[arg-type]


def env_of(req) -> dict[str, str]:
    return {e.key: e.value.decode() for e in req.environment_vars}


def convert(drv: Derivation, inputs=None, **kw):
    return derivation_to_request(drv, NODES if inputs is None else inputs, read_drv=read_drv,
                                 **kw)


def test_the_request_follows_the_protocol() -> None:
    dreq = convert(make_drv(), {p: NODES[p] for p in (BB, SRC, DEP_OUT)}, cores=3)
    req = dreq.request
    assert validate_request(req) == req
    assert req.command_args == (f"{BB}/busybox", "sh", "-c", "echo hi > $out")
    assert req.working_dir == "build" and req.inputs_dir == "nix/store"
    assert req.scratch_paths == ("build", "nix/store")
    assert req.outputs == (f"nix/store/{H_OUT}-hello", f"nix/store/{H_DEV}-hello-dev")
    assert dreq.output_names == ("out", "dev")
    assert [n.name for n in req.inputs] == [f"{H_BB}-busybox".encode(),
                                            f"{H_SRC}-src.txt".encode(),
                                            f"{H_DEP}-dep".encode()]
    assert req.inputs[0] == DirectoryNode(name=f"{H_BB}-busybox".encode(), digest=DIGEST, size=3)
    assert req.inputs[2] == SymlinkNode(name=f"{H_DEP}-dep".encode(), target=b"elsewhere")
    assert req.constraints == BuildConstraints(system="x86_64-linux", network_access=False,
                                               provide_bin_sh=False)
    assert req.additional_files == ()
    assert env_of(req) == {
        "HOME": "/homeless-shelter", "NIX_BUILD_CORES": "3", "NIX_BUILD_TOP": "/build",
        "NIX_LOG_FD": "2", "NIX_STORE": "/nix/store", "PATH": "/path-not-set", "PWD": "/build",
        "TEMP": "/build", "TEMPDIR": "/build", "TERM": "xterm-256color", "TMP": "/build",
        "TMPDIR": "/build", "dev": DEV, "name": "hello", "out": OUT,
    }
    assert [e.key for e in req.environment_vars] == sorted(env_of(req))
    # Needles: outputs in request order, then inputs in request order.
    assert dreq.needle_paths == (OUT, DEV, BB, SRC, DEP_OUT)
    assert req.refscan_needles == (H_OUT, H_DEV, H_BB, H_SRC, H_DEP)


def test_closure_entries_become_inputs_and_needles() -> None:
    dreq = convert(make_drv())
    names = [n.name.decode() for n in dreq.request.inputs]
    assert names == sorted(names) and f"{H_EXTRA}-in-closure" in names
    assert f"{H_DEPLIB}-dep-lib" in names  # given, though not a used output
    assert dreq.needle_paths[:2] == (OUT, DEV)
    assert sorted(dreq.needle_paths[2:]) == sorted(NODES)
    assert [f"/nix/store/{n}" for n in names] == list(dreq.needle_paths[2:])


def test_cores_zero_means_every_core() -> None:
    assert env_of(convert(make_drv()).request)["NIX_BUILD_CORES"] == str(os.cpu_count())
    with pytest.raises(ValueError, match="cores"):
        convert(make_drv(), cores=-1)


def test_overrides_follow_nix_initenv() -> None:
    env = {"HOME": "/h", "PATH": "/p", "NIX_STORE": "/s", "NIX_BUILD_CORES": "9",
           "TMPDIR": "/t", "TMP": "/t", "TEMP": "/t", "TEMPDIR": "/t", "NIX_BUILD_TOP": "/t",
           "PWD": "/t", "NIX_LOG_FD": "7", "TERM": "dumb", "NIX_OUTPUT_CHECKED": "0"}
    got = env_of(convert(make_drv(env)).request)
    # The derivation wins over the first four ...
    assert (got["HOME"], got["PATH"], got["NIX_STORE"], got["NIX_BUILD_CORES"]) == \
        ("/h", "/p", "/s", "9")
    # ... and loses to those Nix sets after the derivation's env.
    for key in ("TMPDIR", "TMP", "TEMP", "TEMPDIR", "NIX_BUILD_TOP", "PWD"):
        assert got[key] == "/build"
    assert (got["NIX_LOG_FD"], got["TERM"]) == ("2", "xterm-256color")
    # not a fixed-output derivation: its own value stays
    assert got["NIX_OUTPUT_CHECKED"] == "0"


def test_pass_as_file() -> None:
    env = {"passAsFile": " big\tother\nabsent ", "big": "line one\nü", "other": "",
           "bigPath": "explicit, sorted after big: wins", "kept": "k"}
    req = convert(make_drv(env)).request
    big = ".attr-1lak0mvllw8rv9i9ygkglvhqsq19qi9ynl4bi7gbf69ab5nzw89a"   # from Nix 2.8
    other = ".attr-1yng5xdkybsglm9mszm44zpkq3qvcjn5vn2bvhvmhwxhs488lafr"  # from Nix 2.8
    assert attr_file_name("big") == big and attr_file_name("other") == other
    assert req.additional_files == tuple(sorted([
        AdditionalFile(path=f"build/{big}", contents="line one\nü".encode()),
        AdditionalFile(path=f"build/{other}", contents=b""),
    ], key=lambda f: f.path))
    got = env_of(req)
    assert "big" not in got and "other" not in got and "absent" not in got
    assert got["otherPath"] == f"/build/{other}"
    assert got["bigPath"] == "explicit, sorted after big: wins"
    assert got["passAsFile"] == " big\tother\nabsent " and got["kept"] == "k"
    assert validate_request(req) == req


def test_fixed_output_derivations_get_network_and_impure_vars() -> None:
    fod = make_drv({"impureEnvVars": "http_proxy  NO_SUCH", "http_proxy": "from-drv"},
                   outputs={"out": DerivationOutput(path=OUT, hash_algo="sha256",
                                                    hash="ab" * 32)},
                   input_drvs={})
    dreq = convert(fod, impure_env={"http_proxy": "http://proxy:3128"})
    assert dreq.request.constraints.network_access
    got = env_of(dreq.request)
    assert got["NIX_OUTPUT_CHECKED"] == "1"
    assert got["http_proxy"] == "http://proxy:3128" and got["NO_SUCH"] == ""
    # not fixed-output: impureEnvVars mean nothing, no network
    plain = convert(make_drv({"impureEnvVars": "http_proxy"}),
                    impure_env={"http_proxy": "x"}).request
    assert not plain.constraints.network_access and "http_proxy" not in env_of(plain)
    assert "NIX_OUTPUT_CHECKED" not in env_of(plain)


def test_special_characters_pass_unchanged() -> None:
    text = 'quote" back\\ nl\n tab\t cr\r ü 🙂 $HOME'
    raw = b"\xff\xfe bytes".decode("utf-8", "surrogateescape")
    req = convert(make_drv({"special": text, "raw": raw},
                           args=("sh", "-c", text, "", raw))).request
    values = {e.key: e.value for e in req.environment_vars}
    assert values["special"] == text.encode() and values["raw"] == b"\xff\xfe bytes"
    assert req.command_args[3:5] == (text, "")


@pytest.mark.parametrize("missing,words", [
    (BB, ["input source", BB]),
    (SRC, ["input source", SRC]),
    (DEP_OUT, ["output 'out' of input derivation", DEP_DRV, DEP_OUT]),
], ids=["builder-src", "file-src", "drv-output"])
def test_a_missing_input_is_named(missing: str, words: list[str]) -> None:
    inputs = {p: n for p, n in NODES.items() if p != missing}
    with pytest.raises(MissingInputError) as info:
        convert(make_drv(), inputs)
    assert info.value.path == missing
    for word in words:
        assert word in str(info.value)
    assert isinstance(info.value, LookupError) and isinstance(info.value, NixError)


def test_input_derivation_problems_are_named() -> None:
    with pytest.raises(NixError, match="has no output 'bin'"):
        convert(make_drv(input_drvs={DEP_DRV: ("bin",)}))
    other = "/nix/store/" + "9" * 32 + "-gone.drv"
    with pytest.raises(MissingInputError, match="cannot read its input derivation"):
        convert(make_drv(input_drvs={other: ("out",)}))


@pytest.mark.parametrize("drv,feature", [
    (make_drv({"__json": '{"exportReferencesGraph": {"g": []}}'}),
     "structured-exportReferencesGraph"),
    (make_drv({"__noChroot": "1"}), "__noChroot"),
    (make_drv(outputs={"out": DerivationOutput(path="", hash_algo="r:sha256")}), "floating-ca"),
    (make_drv({"a=b": "x"}), "env-key"),
], ids=["structured", "nochroot", "floating", "env-key"])
def test_unsupported_derivations_are_refused(drv: Derivation, feature: str) -> None:
    with pytest.raises(UnsupportedDerivation) as info:
        convert(drv)
    assert info.value.feature == feature and "hello" in str(info.value)


def test_ignored_attributes_change_nothing_but_env() -> None:
    ignored = {"__impureHostDeps": "/usr/lib", "__sandboxProfile": "x",
               "allowedReferences": "", "requiredSystemFeatures": "kvm"}
    req = convert(make_drv(ignored)).request
    base = convert(make_drv()).request
    assert req.constraints == base.constraints and req.inputs == base.inputs
    assert {k: v for k, v in env_of(req).items() if k not in ignored} == env_of(base)


def test_an_output_given_as_input_is_refused() -> None:
    with pytest.raises(NixError, match="both an output and an input"):
        convert(make_drv(), {**NODES, OUT: NODES[SRC]})


def test_a_real_drv_text() -> None:
    # As nix-instantiate wrote one (tests/integration/test_nix_env.py builds such ones).
    text = ('Derive([("out","/nix/store/zmxm4rw67lf4cy7l0kb77hkgpp5gcjn9-t-14","","")],[],'
            '["/nix/store/8hzbz17vcmw97w1wpqpadxhfkj7crcps-busybox"],"x86_64-linux",'
            '"/nix/store/8hzbz17vcmw97w1wpqpadxhfkj7crcps-busybox/busybox",'
            '["sh","-c","echo 14 > $out"],[("builder","/nix/store/8hzbz17vcmw97w1wpqpadxhfkj7'
            'crcps-busybox/busybox"),("name","t-14"),("out","/nix/store/zmxm4rw67lf4cy7l0kb77'
            'hkgpp5gcjn9-t-14"),("system","x86_64-linux")])')
    bb = "/nix/store/8hzbz17vcmw97w1wpqpadxhfkj7crcps-busybox"
    dreq = derivation_to_request(parse_derivation(text), {bb: NODES[BB]}, cores=2)
    assert dreq.request.refscan_needles == ("zmxm4rw67lf4cy7l0kb77hkgpp5gcjn9",
                                            "8hzbz17vcmw97w1wpqpadxhfkj7crcps")
    assert dreq.request.outputs == ("nix/store/zmxm4rw67lf4cy7l0kb77hkgpp5gcjn9-t-14",)
    assert EnvVar(key="name", value=b"t-14") in dreq.request.environment_vars


def _files(req) -> dict[str, bytes]:
    return {f.path: f.contents for f in req.additional_files}


def test_structured_attributes_replace_the_environment() -> None:
    # The derivation's own variables (``out`` among them) are not passed.
    req = convert(make_drv({"__json": '{"b":[1,"x"],"a":"it\'s","ph":"'
                            + f"{hash_placeholder('out')}" + '"}', "extra": "not passed"},
                           args=("-c", f"echo > {hash_placeholder('dev')}"))).request
    env = env_of(req)
    assert "extra" not in env and "out" not in env and "__json" not in env
    assert env["NIX_ATTRS_JSON_FILE"] == "/tmp/nix-build-hello.drv-0/.attrs.json"
    assert req.command_args[-1] == f"echo > {DEV}"
    files = _files(req)
    outputs = f'"outputs":{{"dev":"{DEV}","out":"{OUT}"}}'
    assert files["build/.attrs.json"] == (
        '{"a":"it\'s","b":[1,"x"],' + outputs + f',"ph":"{OUT}"' + "}").encode()
    assert files["build/.attrs.sh"] == (
        "declare a='it'\\''s'\ndeclare -a b=(1 'x' )\n"
        f"declare -A outputs=(['dev']='{DEV}' ['out']='{OUT}' )\ndeclare ph='{OUT}'\n").encode()


@pytest.mark.parametrize("text,words", [
    ("[1]", "not an object"), ("{", "cannot process __json"), ('{"a": NaN}', "NaN"),
    ('{"a": "\\ud800"}', "lone surrogate"),
])
def test_bad_structured_attributes_are_named(text: str, words: str) -> None:
    with pytest.raises(NixError, match=words) as info:
        convert(make_drv({"__json": text}))
    assert "hello" in str(info.value)


def test_placeholders_become_output_paths() -> None:
    ph = hash_placeholder("out")
    req = convert(make_drv({"x": f"at {ph}/bin", "text": ph, "passAsFile": "text"},
                           args=("-c", ph))).request
    assert env_of(req)["x"] == f"at {OUT}/bin" and req.command_args[-1] == OUT
    assert _files(req)[f"build/{attr_file_name('text')}"] == OUT.encode()


def test_export_references_graph() -> None:
    refs = {BB: [], SRC: [BB], DEP_OUT: [SRC, DEP_OUT]}
    req = convert(make_drv({"exportReferencesGraph": f"g {DEP_OUT}/bin s {SRC}"}),
                  references=refs).request
    files = _files(req)
    assert files["build/s"] == f"{BB}\n\n0\n{SRC}\n\n1\n{BB}\n".encode()
    assert files["build/g"].startswith(f"{BB}\n\n0\n{SRC}\n\n1\n{BB}\n{DEP_OUT}\n\n2\n"
                                       .encode())


@pytest.mark.parametrize("value,words", [
    (f"g {SRC} odd", "odd number of tokens"),
    (f"../g {SRC}", "invalid file name"),
    ("g /etc/passwd", "non-store path"),
    (f"g {EXTRA}", "not in the input closure"),
])
def test_bad_export_references_graph_is_named(value: str, words: str) -> None:
    with pytest.raises(NixError, match=words):
        convert(make_drv({"exportReferencesGraph": value}), references={SRC: []})

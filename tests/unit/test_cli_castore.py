"""`ocibuild castore import|nar|mount`, run as the real console script.

Expected digests and NAR bytes are computed here independently (blake3 of the
file bytes; NAR bytes from the grammar writer in test_nar.py). Every error form
is checked to be one line on stderr, no traceback, non-zero exit, naming what
is wrong. The mount command's happy path needs FUSE and lives in
tests/integration/test_cli_castore_mount.py; its input checks run here (they
fail before anything is mounted).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import blake3
import pytest
from nar_oracle import expected_nar

from stages.castore import nixbase32

OCIBUILD = Path(sys.executable).parent / "ocibuild"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR")}
    e["OCIBUILD_STORE"] = str(tmp_path / "store")
    return e


def run(args: list[str], env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([str(OCIBUILD), *args], input=stdin, env=env, capture_output=True,
                          timeout=60)


def ok(args: list[str], env: dict[str, str], stdin: bytes = b"") -> bytes:
    result = run(args, env, stdin)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def fails(args: list[str], env: dict[str, str], stdin: bytes = b"", *, names: list[str]) -> str:
    """Run, expect a clean one-line error mentioning each of ``names``."""
    result = run(args, env, stdin)
    err = result.stderr.decode()
    assert result.returncode != 0, f"expected failure, got {result.stdout!r}"
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("ocibuild: error: "), err
    for name in names:
        assert name in err, (name, err)
    return err


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "empty").write_bytes(b"")
    (root / "hello").write_bytes(b"hello\n")
    (root / "run").write_bytes(b"#!/bin/sh\n")
    (root / "run").chmod(0o755)
    (root / "link").symlink_to("hello")
    return root


TREE_SPEC = {b"sub": {b"empty": b""}, b"hello": b"hello\n", b"run": ("x", b"#!/bin/sh\n"),
             b"link": ("l", b"hello")}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- import ------------------------------------------------------------------

def test_import_json_one_line_per_path(tree: Path, env: dict[str, str]) -> None:
    out = ok(["castore", "import", "--json", str(tree), str(tree / "hello"),
              str(tree / "run"), str(tree / "link")], env)
    lines = out.decode().splitlines()
    assert len(lines) == 4
    docs = [json.loads(line) for line in lines]
    assert list(docs[0]) == ["directory"]
    assert docs[0]["directory"]["name"] == b64(b"tree")
    assert docs[0]["directory"]["size"] == "5"  # 2 files + 1 symlink + (1 + sub's 1 file)
    assert docs[1] == {"file": {"name": b64(b"hello"), "digest": b64(blake3.blake3(b"hello\n").digest()),
                                "size": "6"}}
    assert docs[2]["file"]["executable"] is True
    assert docs[3] == {"symlink": {"name": b64(b"link"), "target": b64(b"hello")}}


def test_import_then_nar_is_the_nar_of_the_tree(tree: Path, env: dict[str, str]) -> None:
    line = ok(["castore", "import", "--json", str(tree)], env)
    assert ok(["castore", "nar"], env, line) == expected_nar(TREE_SPEC)
    file_line = ok(["castore", "import", "--json", str(tree / "run")], env)
    assert ok(["castore", "nar"], env, file_line) == expected_nar(TREE_SPEC[b"run"])


def test_import_human_output(tree: Path, env: dict[str, str]) -> None:
    out = ok(["castore", "import", str(tree / "hello"), str(tree)], env).decode().splitlines()
    nar_hash = "sha256:" + nixbase32.encode(hashlib.sha256(expected_nar(b"hello\n")).digest())
    assert out[0].split() == [str(tree / "hello"), "file",
                              blake3.blake3(b"hello\n").digest().hex(), "size=6",
                              f"nar={nar_hash}"]
    tree_hash = "sha256:" + nixbase32.encode(hashlib.sha256(expected_nar(TREE_SPEC)).digest())
    assert out[1].split()[:2] == [str(tree), "directory"]
    assert out[1].split()[-1] == f"nar={tree_hash}"


def test_import_persists_in_the_embedded_store(tree: Path, env: dict[str, str],
                                               tmp_path: Path) -> None:
    line = ok(["castore", "import", "--json", str(tree)], env)
    assert (tmp_path / "store").is_dir()
    # A second process finds it there.
    assert ok(["castore", "nar"], env, line) == expected_nar(TREE_SPEC)
    other = dict(env, OCIBUILD_STORE=str(tmp_path / "other-store"))
    fails(["castore", "nar"], other, line, names=["not found"])


@pytest.mark.parametrize("where", ["group", "command", "env"])
def test_store_addresses(tree: Path, env: dict[str, str], tmp_path: Path, where: str) -> None:
    addr = f"local://{tmp_path / 'explicit'}"
    opts = ["--blob-service-addr", addr, "--directory-service-addr", addr]
    if where == "group":
        line = ok(["castore", *opts, "import", "--json", str(tree)], env)
        nar = ok(["castore", *opts, "nar"], env, line)
    elif where == "command":
        line = ok(["castore", "import", *opts, "--json", str(tree)], env)
        nar = ok(["castore", "nar", *opts], env, line)
    else:
        env = dict(env, BLOB_SERVICE_ADDR=addr, DIRECTORY_SERVICE_ADDR=addr)
        line = ok(["castore", "import", "--json", str(tree)], env)
        nar = ok(["castore", "nar"], env, line)
    assert nar == expected_nar(TREE_SPEC)
    assert (tmp_path / "explicit").is_dir()
    assert not (tmp_path / "store").exists()


def test_command_option_wins_over_group_option(tree: Path, env: dict[str, str],
                                               tmp_path: Path) -> None:
    addr = f"local://{tmp_path / 'good'}"
    ok(["castore", "--blob-service-addr", "bogus://", "--directory-service-addr", "bogus://",
        "import", "--blob-service-addr", addr, "--directory-service-addr", addr, str(tree)], env)


# --- errors ------------------------------------------------------------------

def test_import_missing_path(tree: Path, env: dict[str, str]) -> None:
    missing = str(tree / "no-such-thing")
    fails(["castore", "import", str(tree), missing], env, names=[missing, "no such file"])


def test_import_refuses_a_fifo(tmp_path: Path, env: dict[str, str]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fails(["castore", "import", str(fifo)], env, names=[str(fifo)])


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_nar_unknown_digest(env: dict[str, str], kind: str) -> None:
    digest = blake3.blake3(b"never stored").digest()
    line = json.dumps({kind: {"name": b64(b"x"), "digest": b64(digest), "size": "3"}})
    fails(["castore", "nar"], env, line.encode(), names=[digest.hex(), "not found"])


@pytest.mark.parametrize("stdin, names", [
    pytest.param(b"", ["expected exactly one", "got 0"], id="empty"),
    pytest.param(b"{not json\n", ["line 1", "node-json"], id="not-json"),
    pytest.param(b'{"file": {"name": "eA==", "digest": "AAAA", "size": "1"}}\n',
                 ["line 1", "digest-length"], id="short-digest"),
    pytest.param(b'{"symlink": {"name": "Lw==", "target": "eA=="}}\n',
                 ["line 1", "name-slash", "b'/'"], id="bad-name"),
    pytest.param(b"{}\n", ["node-empty"], id="no-kind"),
    pytest.param(b'{"symlink": {"name": "eA==", "target": "eA=="}}\n' * 2,
                 ["expected exactly one", "got 2"], id="two-nodes"),
    pytest.param(b"\xff\xfe\n", ["not UTF-8"], id="binary"),
])
def test_nar_malformed_node(env: dict[str, str], stdin: bytes, names: list[str]) -> None:
    fails(["castore", "nar"], env, stdin, names=names)


def test_nar_of_a_symlink_needs_no_store(env: dict[str, str]) -> None:
    line = json.dumps({"symlink": {"name": b64(b"l"), "target": b64(b"/x")}}).encode()
    assert ok(["castore", "nar"], env, line) == expected_nar(("l", b"/x"))


@pytest.mark.parametrize("args, names", [
    pytest.param(["--blob-service-addr", "bogus://x"], ["bogus://x", "unknown store scheme"],
                 id="unknown-scheme"),
    pytest.param(["--directory-service-addr", "no-scheme"], ["no-scheme", "not a URL"],
                 id="not-a-url"),
    pytest.param(["--blob-service-addr", "local://relative/dir"], ["local://relative/dir"],
                 id="relative-local"),
])
def test_unusable_store_address(tree: Path, env: dict[str, str], args: list[str],
                                names: list[str]) -> None:
    fails(["castore", *args, "import", str(tree)], env, names=names)


def test_unusable_store_directory(tree: Path, env: dict[str, str], tmp_path: Path) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_bytes(b"")
    fails(["castore", "import", str(tree)], dict(env, OCIBUILD_STORE=str(not_a_dir)),
          names=[str(not_a_dir)])


def _named(name: bytes) -> bytes:
    return json.dumps({"symlink": {"name": b64(name), "target": b64(b"t")}}).encode() + b"\n"


@pytest.mark.parametrize("stdin, names", [
    pytest.param(_named(b"a") + _named(b"a"), ["node 2", "b'a'", "unique"], id="duplicate"),
    pytest.param(b'{"symlink": {"target": "dA=="}}\n', ["node 1", "needs a name"], id="unnamed"),
    pytest.param(_named(b"a") + b"garbage\n", ["line 2", "malformed"], id="malformed"),
    pytest.param(b"\n", ["no nodes to mount"], id="nothing"),
    pytest.param(_named(b".."), ["name-dot", "b'..'"], id="bad-name"),
])
def test_mount_bad_input(tmp_path: Path, env: dict[str, str], stdin: bytes,
                         names: list[str]) -> None:
    fails(["castore", "mount", str(tmp_path)], env, stdin, names=names)


def test_mount_unknown_digest(tmp_path: Path, env: dict[str, str]) -> None:
    digest = blake3.blake3(b"absent").digest()
    line = json.dumps({"directory": {"name": b64(b"d"), "digest": b64(digest), "size": "1"}})
    fails(["castore", "mount", str(tmp_path)], env, line.encode(), names=[digest.hex()])


def test_mount_missing_mountpoint(tmp_path: Path, env: dict[str, str]) -> None:
    fails(["castore", "mount", str(tmp_path / "nope")], env, _named(b"a"),
          names=[str(tmp_path / "nope"), "not an existing directory"])

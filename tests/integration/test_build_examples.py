"""The build examples in dag_examples/ run as written and print true facts.

Each example runs in a subprocess on a fresh store and state directory (real
runc, real FUSE). Expected values are computed here from the example's
inputs (BLAKE3 with the blake3 library, NAR by hand, sorting in Python),
never taken from ocibuild. Afterwards nothing may be left behind: no FUSE
mount, no service instance, no bundle.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "dag_examples"

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.fuse]


def _fuse_mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f
                if line.split()[4].startswith(prefix) and " - fuse" in line]


@pytest.fixture
def home() -> Iterator[Path]:
    """A state and store directory, o+x from / down as runc needs; removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="ocibuild-examples-"))
    root.chmod(0o711)
    try:
        yield root
        assert _fuse_mounts_under(root) == []
        instances = root / "state" / "instances"
        assert not instances.exists() or list(instances.iterdir()) == []
        bundles = root / "state" / "bundles"
        assert not bundles.exists() or list(bundles.iterdir()) == []
    finally:
        for mnt in _fuse_mounts_under(root):
            subprocess.run(["umount", "-l", mnt], check=False)
        shutil.rmtree(root, ignore_errors=True)


def run_example(name: str, home: Path) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "BUILD_SERVICE_ADDR")}
    env["OCIBUILD_STATE"] = str(home / "state")
    env["OCIBUILD_STORE"] = str(home / "store")
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (home / "store").is_dir(), "the example did not use the store it was given"
    return result.stdout


def field(out: str, key: str) -> str:
    m = re.search(rf"^\s*{re.escape(key)}:\s+(.*)$", out, re.M)
    assert m, f"no {key!r} line in:\n{out}"
    return m.group(1).strip()


def nar_of_file(data: bytes, executable: bool = False) -> bytes:
    """The NAR of one regular file, written out from the format's definition."""
    def s(b: bytes) -> bytes:
        return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)
    parts = [b"nix-archive-1", b"(", b"type", b"regular"]
    if executable:
        parts += [b"executable", b""]
    parts += [b"contents"]
    return b"".join(map(s, parts)) + s(data) + s(b")")


def nix_base32(digest: bytes) -> str:
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    n = len(digest) * 8
    out = []
    for i in range((n + 4) // 5 - 1, -1, -1):
        b = i * 5
        v = int.from_bytes(digest, "little") >> b
        out.append(alphabet[v & 0x1F])
    return "".join(out)


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_hello(home: Path) -> None:
    import hashlib

    out = run_example("build_hello.py", home)
    greeting = load_module("build_hello").GREETING.encode()
    expected = greeting.upper()
    assert field(out, "contents") == repr(expected.decode())
    assert field(out, "log") == "built"  # the builder's stdout, streamed
    kind, digest = field(out, "output").split(" -> ")[1].split()[:2]
    assert (kind, digest) == ("file", blake3.blake3(expected).hexdigest())
    nar = nar_of_file(expected)
    nar_hash = field(out, "NAR hash")
    assert nar_hash == f"sha256:{nix_base32(hashlib.sha256(nar).digest())} ({len(nar)} bytes of NAR)"
    # The service kept a run record, finished in every stage.
    (run,) = (home / "state" / "runs").iterdir()
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "finished"


def test_build_chain(home: Path) -> None:
    out = run_example("build_chain.py", home)
    words = load_module("build_chain").WORDS
    words_bytes = "".join(w + "\n" for w in words).encode()
    sorted_bytes = "".join(w + "\n" for w in sorted(set(words))).encode()

    chain = {line.split()[0]: line.split()[1:] for line in
             out.split("the chain:\n")[1].split("\n\n")[0].splitlines()}
    assert chain["words"] == ["finished", "FileNode", blake3.blake3(words_bytes).hexdigest()]
    assert chain["sorted"] == ["finished", "FileNode", blake3.blake3(sorted_bytes).hexdigest()]
    assert chain["report"][:2] == ["finished", "DirectoryNode"]
    # The drawing shows the DAG's edges and the shared service.
    assert re.search(r"^\+ report\s+<- tools, words, sorted\s+\[builder\]", out, re.M)
    assert re.search(r"^\+ sorted\s+<- tools, words\s+\[builder\]", out, re.M)
    assert "run finished: finished 4" in out
    # The last build read both earlier outputs.
    assert field(out, "count") == str(len(set(words)))
    assert field(out, "first") == min(words)
    assert field(out, "total") == str(len(words))
    # Three builds, one run directory each.
    assert len(list((home / "state" / "runs").iterdir())) == 3


def test_build_stop_resume(home: Path) -> None:
    out = run_example("build_stop_resume.py", home)
    before, after = out.split("resumed:")
    stopped = dict(re.findall(r"^  (\w+)\s+(\w+)\s*$", before.split("bundle:")[0], re.M))
    assert stopped == {"validate": "finished", "spec": "finished", "bundle": "finished",
                       "mount": "pending", "run": "pending", "ingest": "pending",
                       "teardown": "pending"}
    assert "(stopped)" in before
    # What the bundle showed: the sandbox as Nix's.
    assert field(before, "user") == "uid 1000 gid 100, cwd /build, hostname localhost"
    assert "'network'" in field(before, "namespaces")
    assert re.search(r"^\s+/nix/store/tools\s+bind\s+bind,ro,nosuid,nodev$", before, re.M)
    assert re.search(r"^\s+/build\s+bind\s+bind,rw,nosuid,nodev$", before, re.M)
    assert "nixbld:x:1000:100:Nix build user:/build:/noshell" in before
    assert "127.0.0.1 localhost" in before
    # After resume: the first three reused, the rest ran.
    resumed = dict(re.findall(r"^  (\w+)\s+(\w+)", after.split("output:")[0], re.M))
    assert resumed == {"validate": "reused", "spec": "reused", "bundle": "reused",
                       "mount": "finished", "run": "finished", "ingest": "finished",
                       "teardown": "finished"}
    contents = b"built by 1000:100 on localhost\n"
    assert field(after, "contents") == repr(contents.decode())
    assert field(after, "output") == f"build/out -> {blake3.blake3(contents).hexdigest()}"
    assert field(after, "bundle gone") == "True"

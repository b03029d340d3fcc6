"""`ocibuild castore import/nar/mount` against a remote store over grpc+unix.

A castore server process (``python -m stages.grpc.castore_server``) serves a
local store in a temp dir. The CLI imports a tree into it; its NAR must equal
the NAR of the same tree imported into a separate local store (independent
path); the mount must show the tree. A bad or dead address is a one-line
error. Everything started is stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
OCIBUILD = Path(sys.executable).parent / "ocibuild"


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="gcc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(workdir: Path):
    sock = workdir / "c.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.grpc.castore_server", "--listen", f"unix://{sock}",
         "--blob-service-addr", f"local://{workdir}/remote",
         "--directory-service-addr", f"local://{workdir}/remote"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline(), "server did not start"
        yield f"grpc+unix://{sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def tree(workdir: Path) -> Path:
    root = workdir / "tree"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "bin" / "tool", 0o755)
    (root / "data").write_bytes(bytes(range(256)) * 5000)
    (root / "empty").write_bytes(b"")
    os.symlink("bin/tool", root / "link")
    return root


def ocibuild(*args: str, address: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(OCIBUILD), "castore", "--blob-service-addr", address,
                           "--directory-service-addr", address, *args],
                          input=stdin, capture_output=True, timeout=60)


def test_import_and_nar_against_a_remote_store(server: str, tree: Path, workdir: Path) -> None:
    imported = ocibuild("import", "--json", str(tree), address=server)
    assert imported.returncode == 0, imported.stderr
    node_line = imported.stdout
    remote_nar = ocibuild("nar", address=server, stdin=node_line)
    assert remote_nar.returncode == 0, remote_nar.stderr
    # The same tree through a plain local store, never touching gRPC.
    local = f"local://{workdir}/local"
    again = ocibuild("import", "--json", str(tree), address=local)
    assert again.stdout == node_line
    local_nar = ocibuild("nar", address=local, stdin=again.stdout)
    assert remote_nar.stdout == local_nar.stdout and len(local_nar.stdout) > 1_280_000


def test_bad_and_dead_addresses_are_one_line_errors(workdir: Path, tree: Path) -> None:
    for address, fragment in (("grpc+unix://relative/sock", b"absolute"),
                              ("grpc+http://127.0.0.1", b"missing port"),
                              (f"grpc+unix://{workdir}/nobody.sock", b"does not exist")):
        start = time.monotonic()
        result = ocibuild("import", str(tree), address=address)
        assert time.monotonic() - start < 30
        assert result.returncode == 1
        assert fragment in result.stderr and b"Traceback" not in result.stderr
        assert result.stderr.count(b"\n") == 1


@pytest.mark.fuse
def test_mount_a_remote_store(server: str, tree: Path, workdir: Path) -> None:
    imported = ocibuild("import", "--json", str(tree), address=server)
    assert imported.returncode == 0, imported.stderr
    mnt = workdir / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([str(OCIBUILD), "castore", "--blob-service-addr", server,
                             "--directory-service-addr", server, "mount", str(mnt)],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(imported.stdout)
        proc.stdin.close()
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.05)
        top = mnt / "tree"
        assert (top / "data").read_bytes() == (tree / "data").read_bytes()
        assert (top / "bin" / "tool").read_bytes() == (tree / "bin" / "tool").read_bytes()
        assert os.access(top / "bin" / "tool", os.X_OK)
        assert (top / "empty").read_bytes() == b""
        assert os.readlink(top / "link") == "bin/tool"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not os.path.ismount(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)

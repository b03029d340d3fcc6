"""The local store under real processes: SIGKILL mid-write, concurrent writers.

Each test runs writers as child processes (the real thing: separate
interpreters, separate flocks, a real SIGKILL) and checks from the parent
that the store holds only whole, verified blobs, still opens, and still
accepts writes.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import blake3
import pytest

from stages.castore.local import LocalStore

REPO = Path(__file__).resolve().parents[2]

CHILD_BIG_WRITE = textwrap.dedent("""
    import sys
    from stages.castore.local import LocalStore
    store = LocalStore(sys.argv[1])
    print(store.put_blob(b"committed before the crash").hex(), flush=True)
    writer = store.open_writer()
    chunk = bytes(range(256)) * 4096
    for i in range(2048):          # 2 GiB, far more than the parent waits for
        writer.write(chunk + i.to_bytes(8, "big"))
    writer.close()
    print("finished", flush=True)
""")

CHILD_BULK = textwrap.dedent("""
    import sys
    from stages.castore.local import LocalStore, importer
    importer.BATCH_BYTES = int(sys.argv[4])  # small batches: many commits to land a kill between
    store = LocalStore(sys.argv[1])
    tree = sys.argv[2]
    import os
    paths = sorted(os.path.join(tree, n) for n in os.listdir(tree))
    for _ in range(int(sys.argv[3])):
        store.put_files(paths, threads=2)
    print("done", flush=True)
""")


def spawn(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


def index_rows(root: Path) -> tuple[list[bytes], dict[int, int]]:
    conn = sqlite3.connect(root / "index.sqlite")
    try:
        blobs = [r[0] for r in conn.execute("SELECT digest FROM blobs")]
        packs = dict(conn.execute("SELECT id, end FROM packs"))
    finally:
        conn.close()
    return blobs, packs


def pack_total(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "packs").glob("*.pack"))


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_sigkill_mid_blob_write(tmp_path: Path) -> None:
    root = tmp_path / "store"
    proc = spawn(CHILD_BIG_WRITE, str(root))
    try:
        committed = bytes.fromhex(proc.stdout.readline().decode().strip())
        # Kill once a good part of the big blob is in the pack but long before the end.
        wait_for(lambda: pack_total(root) > 64 << 20 or proc.poll() is not None, 60,
                 "the child to stream into its pack")
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        reap(proc)
    assert proc.returncode == -signal.SIGKILL
    blobs, packs = index_rows(root)
    assert blobs == [committed]           # no trace of the partial blob
    assert pack_total(root) > sum(packs.values())  # its bytes are dead tail garbage
    store = LocalStore(root)
    try:
        store.verify_blob(committed)
        assert store.read_blob_at(committed, 0, 100) == b"committed before the crash"
        data = os.urandom(3 << 20)
        digest = store.put_blob(data)
        assert digest == blake3.blake3(data).digest()
        store.verify_blob(digest)
        # the writer reclaimed the dead tail before appending
        _, packs = index_rows(root)
        assert pack_total(root) == sum(packs.values())
    finally:
        store.close()


@pytest.mark.slow
def test_sigkill_mid_bulk_import(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    contents = {}
    for i in range(1500):
        data = os.urandom(20_000 + i)
        (tree / f"f{i:04d}").write_bytes(data)
        contents[blake3.blake3(data).digest()] = data
    (tree / "big").write_bytes(os.urandom(6 << 20))
    contents[blake3.blake3((tree / "big").read_bytes()).digest()] = (tree / "big").read_bytes()
    root = tmp_path / "store"
    proc = spawn(CHILD_BULK, str(root), str(tree), "1", str(1 << 20))

    def some_committed() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return len(index_rows(root)[0]) > 0
        except sqlite3.Error:
            return False

    try:
        wait_for(some_committed, 60, "a first committed batch")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        reap(proc)
    assert proc.returncode == -signal.SIGKILL
    blobs, _ = index_rows(root)
    assert 0 < len(blobs) < len(contents)    # killed part way
    store = LocalStore(root)
    try:
        for digest in blobs:                 # everything visible is whole and right
            assert digest in contents
            store.verify_blob(digest)
        results = store.put_files(sorted(tree.iterdir()))
        for r in results:
            store.verify_blob(r.digest)
        assert set(index_rows(root)[0]) == set(contents)
    finally:
        store.close()


def test_concurrent_processes_write_one_store(tmp_path: Path) -> None:
    trees = []
    for t in range(2):
        tree = tmp_path / f"tree{t}"
        tree.mkdir()
        for i in range(300):
            (tree / f"f{i}").write_bytes(os.urandom(5000))
        (tree / "shared").write_bytes(b"the same in both trees")
        (tree / "big").write_bytes(os.urandom(2 << 20))
        trees.append(tree)
    root = tmp_path / "store"
    LocalStore(root).close()  # created up front, as a long-lived store would be
    procs = [spawn(CHILD_BULK, str(root), str(tree), "2", str(32 << 20)) for tree in trees]
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()
            assert out.decode().strip() == "done"
    finally:
        for proc in procs:
            reap(proc)
    blobs, packs = index_rows(root)
    expected = {blake3.blake3(p.read_bytes()).digest()
                for tree in trees for p in tree.iterdir()}
    assert set(blobs) == expected
    assert len(packs) >= 2  # each process appended to a pack of its own
    store = LocalStore(root)
    try:
        for digest in blobs:
            store.verify_blob(digest)
    finally:
        store.close()


def test_processes_create_a_fresh_store_at_once(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import os, sys
        from stages.castore.local import LocalStore
        store = LocalStore(sys.argv[1])
        digest = store.put_blob(sys.argv[2].encode() * 1000)
        store.verify_blob(digest)
        print(digest.hex())
    """)
    root = tmp_path / "fresh"
    procs = [spawn(code, str(root), f"writer {i}") for i in range(5)]
    digests = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()
            digests.append(bytes.fromhex(out.decode().strip()))
    finally:
        for proc in procs:
            reap(proc)
    assert digests == [blake3.blake3(f"writer {i}".encode() * 1000).digest() for i in range(5)]
    assert set(index_rows(root)[0]) == set(digests)

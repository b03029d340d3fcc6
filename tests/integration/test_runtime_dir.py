"""The service's runtime directory (ephemeral bundles on a tmpfs): used only when safe.

Its base (``/dev/shm`` by default) is world-writable, so whatever already
sits there under the name ``ocibuild`` must be ours and writable by nobody
else, or the service keeps its bundles on disk.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from stages.service.recovery import RUNTIME_ENV, _runtime_home

pytestmark = pytest.mark.root


@pytest.fixture
def base(monkeypatch) -> Path:
    # Under /tmp, not pytest's tmp_path: the runtime directory's parents must
    # be searchable by others, and pytest's are private.
    d = Path(tempfile.mkdtemp(prefix="ocibuild-rt-test-"))
    os.chmod(d, 0o1777)
    monkeypatch.setenv(RUNTIME_ENV, str(d))
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_unsearchable_parents_are_not_used(tmp_path: Path, monkeypatch) -> None:
    os.chmod(tmp_path, 0o700)
    monkeypatch.setenv(RUNTIME_ENV, str(tmp_path))
    assert _runtime_home() is None


def test_made_private_and_traversable(base: Path) -> None:
    home = _runtime_home()
    assert home == base / "ocibuild"
    st = home.lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o711
    assert st.st_uid == os.geteuid()
    assert _runtime_home() == home  # and found again


def test_a_symlink_is_not_trusted(base: Path) -> None:
    (base / "elsewhere").mkdir(mode=0o711)
    (base / "ocibuild").symlink_to(base / "elsewhere")
    assert _runtime_home() is None


@pytest.mark.parametrize("mode", [0o771, 0o717, 0o700], ids=["group-writable", "world-writable",
                                                              "not-traversable"])
def test_a_loose_mode_is_not_trusted(base: Path, mode: int) -> None:
    (base / "ocibuild").mkdir()
    os.chmod(base / "ocibuild", mode)
    assert _runtime_home() is None


def test_someone_elses_is_not_trusted(base: Path) -> None:
    (base / "ocibuild").mkdir(mode=0o711)
    os.chown(base / "ocibuild", 12345, 12345)
    assert _runtime_home() is None


def test_empty_setting_keeps_bundles_on_disk(monkeypatch) -> None:
    monkeypatch.setenv(RUNTIME_ENV, "")
    assert _runtime_home() is None


def test_missing_base_keeps_bundles_on_disk(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(RUNTIME_ENV, str(tmp_path / "nope"))
    assert _runtime_home() is None


def test_a_dead_instance_names_only_its_own_runtime_directory(tmp_path: Path) -> None:
    from stages.service.recovery import _linked_runtime

    inst = tmp_path / "123-abcd"
    inst.mkdir()
    assert _linked_runtime(inst) is None
    (inst / "runtime").symlink_to("/dev/shm/ocibuild/123-abcd")
    assert _linked_runtime(inst) == Path("/dev/shm/ocibuild/123-abcd")
    for elsewhere in ("/", "/dev/shm/ocibuild", "/dev/shm/other/123-abcd", "ocibuild/123-abcd"):
        (inst / "runtime").unlink()
        (inst / "runtime").symlink_to(elsewhere)
        assert _linked_runtime(inst) is None, elsewhere


def test_a_small_file_system_is_not_used(monkeypatch) -> None:
    # Docker's default /dev/shm is 64 MiB: concurrent bundles could fill it.
    d = Path(tempfile.mkdtemp(prefix="ocibuild-rt-small-"))
    os.chmod(d, 0o711)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(d)], check=True)
        try:
            monkeypatch.setenv(RUNTIME_ENV, str(d))
            assert _runtime_home() is None
            subprocess.run(["mount", "-o", "remount,size=512m", str(d)], check=True)
            assert _runtime_home() == d / "ocibuild"
        finally:
            subprocess.run(["umount", str(d)], check=True)
    finally:
        shutil.rmtree(d)


def test_runtime_directories_whose_state_directory_is_gone_are_swept(base: Path) -> None:
    """A dead instance whose state directory was removed leaves its runtime
    directory on the tmpfs with nobody to clean it: a starting service sweeps
    it, and only it (a live owner's, a young one and strangers stay)."""
    import asyncio

    from stages.service.recovery import cleanup_dead_instances

    home = _runtime_home()
    assert home is not None
    gone = subprocess.Popen(["true"])
    gone.wait()
    old = time.time() - 3600

    def runtime(name: str, age: float | None = old) -> Path:
        d = home / name
        (d / "bundles" / "k" / "rootfs").mkdir(parents=True)
        if age is not None:
            os.utime(d, (age, age))
        return d

    orphan = runtime(f"{gone.pid}-0badcafe")
    live = runtime(f"{os.getpid()}-1badcafe")
    # Alive in another pid namespace: its pid means nothing here, its lock does.
    elsewhere = runtime(f"{gone.pid}-4badcafe")
    held = os.open(elsewhere, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    os.utime(elsewhere, (old, old))
    young = runtime(f"{gone.pid}-2badcafe", age=None)
    stranger = runtime("not-an-instance")
    mounted = runtime(f"{gone.pid}-3badcafe")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mounted / "bundles")], check=True)
    os.utime(mounted, (old, old))
    try:
        state = base / "state"
        state.mkdir()
        removed = asyncio.run(cleanup_dead_instances(state))
    finally:
        subprocess.run(["umount", str(mounted / "bundles")], check=True)
        os.close(held)
    assert not orphan.exists()
    assert f"runtime {orphan} (its state directory is gone)" in removed
    for kept in (live, young, stranger, mounted, elsewhere):
        assert kept.is_dir(), kept


def test_a_live_instance_holds_its_runtime_directory(base: Path) -> None:
    """What the sweep tests for liveness: an instance locks its runtime
    directory for its whole life, and lets it go when it closes."""
    from stages.service.recovery import Instance, _try_lock_dir

    state = base / "state"
    state.mkdir()
    inst = Instance.create(state)
    assert inst.runtime is not None
    assert _try_lock_dir(inst.runtime) is None  # held
    inst.close()
    assert not inst.runtime.exists()

"""The bwrap rendering of a config.json: what must always be there, and what it refuses.

(The sandbox itself is tested by attack with real builds under both
runtimes: tests/integration/test_hardening.py and the others.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.errors import BundleError
from stages.oci.bwrap import BwrapSandbox, bwrap_argv

CONFIG = {
    "process": {"user": {"uid": 1000, "gid": 100}, "args": ["/bin/sh", "-c", "--help"],
                "env": ["PATH=/bin", "X=--unshare-all"], "cwd": "/build"},
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "localhost",
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
               {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                "options": ["mode=755", "size=65536k"]},
               {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                "options": ["mode=1777", "size=1048576"]},
               {"destination": "/in", "type": "bind", "source": "/srv/in",
                "options": ["rbind", "rro", "rnosuid", "rnodev"]},
               {"destination": "/build", "type": "bind", "source": "/srv/build",
                "options": ["bind", "rw"]}],
    "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user",
                                                   "network")],
              "resources": {"pids": {"limit": 10}}},
}


@pytest.mark.parametrize("attached", [False, True])
def test_the_sandbox_never_keeps_the_callers_terminal(attached: bool) -> None:
    # Not even for an interactive shell: with the operator's terminal as its
    # controlling one, the sandbox could push input into the operator's shell.
    argv = bwrap_argv(CONFIG, Path("/b"), attached=attached)
    assert "--new-session" in argv and "--die-with-parent" in argv


def test_request_strings_stay_option_values() -> None:
    argv = bwrap_argv(CONFIG, Path("/b"))
    sep = argv.index("--")
    assert argv[sep + 1:] == ["/bin/sh", "-c", "--help"]  # after --, never options
    i = argv.index("X")
    assert argv[i - 1] == "--setenv" and argv[i + 1] == "--unshare-all"
    assert argv[argv.index("/in") - 2] == "--ro-bind"  # rro: read-only
    assert argv[argv.index("/build") - 2] == "--bind"
    assert ["--remount-ro", "/"] == argv[argv.index("--clearenv") - 2:argv.index("--clearenv")]


def test_limits_without_a_cgroup_are_refused(tmp_path: Path) -> None:
    import json

    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(BundleError, match="applies the limits through a cgroup"):
        BwrapSandbox(tmp_path, "t", uid=1, gid=1).argv(attached=False)


def test_an_unknown_mount_type_is_refused() -> None:
    config = {**CONFIG, "mounts": [{"destination": "/x", "type": "nfs", "source": "h:/x"}]}
    with pytest.raises(BundleError, match="not supported by the bwrap runtime"):
        bwrap_argv(config, Path("/b"))


def test_sources_resolve_as_realpath_does(tmp_path: Path) -> None:
    """The renderer resolves bind sources (to find the mounts below them) with
    cached parents; every kind of link must resolve as os.path.realpath."""
    import os

    from stages.oci.bwrap import _realpath

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "far" / "away" / "q").mkdir(parents=True)
    links = {"a/b/up": "../a", "abs": str(tmp_path / "a" / "b" / "up"), "loop1": "loop2",
             "loop2": "loop1", "a/self": ".", "a/lnk": str(tmp_path / "far" / "away"),
             "a/dotdot": "lnk/../q", "chain": "a/self/lnk/q", "a/b/back": "../../a"}
    for name, target in links.items():
        os.symlink(target, tmp_path / name)
    paths = [tmp_path / p for p in (*links, "a/b/up/lnk/q", "loop1/x", "missing/x",
                                   "a/self/self/b/back/b", "chain/../q")]
    for p in [*map(str, paths), "/", "/proc/self", "//tmp", "relative/x", "/x" * 60]:
        assert _realpath(p) == os.path.realpath(p), p
    # A parent that now leads elsewhere (swapped for a link) is seen at once.
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "other" / "y").mkdir(parents=True)
    assert _realpath(str(tmp_path / "x" / "y")) == str(tmp_path / "x" / "y")
    (tmp_path / "x").rename(tmp_path / "x.old")
    os.symlink(tmp_path / "other", tmp_path / "x")
    assert _realpath(str(tmp_path / "x" / "y")) == str(tmp_path / "other" / "y")
    # The same directory, reached through a link that now names its new place.
    (tmp_path / "moved").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "moved")
    (tmp_path / "moved" / "d").mkdir()
    assert _realpath(str(tmp_path / "via" / "d" / "e")) == str(tmp_path / "moved" / "d" / "e")
    (tmp_path / "moved").rename(tmp_path / "moved2")
    (tmp_path / "via").unlink()
    (tmp_path / "via").symlink_to(tmp_path / "moved2")
    assert _realpath(str(tmp_path / "via" / "d" / "e")) == str(tmp_path / "moved2" / "d" / "e")


def test_a_bwrap_sandbox_without_its_cgroup_is_refused(tmp_path: Path) -> None:
    """bwrap applies no limits itself: a host that makes cgroups never runs a
    bwrap sandbox outside one (a lost cgroup must not mean unlimited)."""
    from types import SimpleNamespace

    from stages.errors import RuncError
    from stages.oci.cgroups import BuildCgroup
    from stages.oci.idmap import load_idmap
    from stages.run import sandbox

    host = SimpleNamespace(runtime="bwrap", cgroup_root="ocibuild", idmap=load_idmap())
    build = SimpleNamespace(key="k")
    with pytest.raises(RuncError, match="no cgroup to hold its limits"):
        sandbox(build, host, None, bundle_dir=tmp_path)  # type: ignore[arg-type]
    made = sandbox(build, host, BuildCgroup("ocibuild/k"), bundle_dir=tmp_path)  # type: ignore[arg-type]
    assert isinstance(made, BwrapSandbox) and made.cgroup_procs
    host.cgroup_root = None  # a host without cgroups: limits in config.json are refused later
    assert isinstance(sandbox(build, host, None, bundle_dir=tmp_path), BwrapSandbox)  # type: ignore[arg-type]

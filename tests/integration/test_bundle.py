"""write_bundle: layout, ownership, additional files, all-or-nothing.

Writing a bundle chowns the scratch directories to subordinate ids, so these
tests need root (marker ``root``); they touch only their own temp dirs.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from strategies import valid_requests

from stages import bundle as bundle_mod
from stages import spec as spec_mod
from stages.bundle import write_bundle
from stages.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from stages.errors import BundleError, RequestError
from stages.oci import layout as layout_mod
from stages.oci.idmap import IdMap
from stages.oci.layout import check_traversable, remove_bundle
from stages.oci.schema import validate_config
from stages.request import AdditionalFile, BuildConstraints, BuildRequest, EnvVar
from stages.spec import mount_points

pytestmark = pytest.mark.root

D = b"\x03" * 32
IDMAP = IdMap.single(500000, 600000)


@pytest.fixture
def base_dir():
    d = Path(tempfile.mkdtemp(prefix="ocibuild-bundle-test-"))
    os.chmod(d, 0o711)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)


def request(**changes) -> BuildRequest:
    req = BuildRequest(
        inputs=[DirectoryNode(name=b"aaa-dep", digest=D, size=0),
                FileNode(name=b"bbb-src.sh", digest=D, size=1),
                SymlinkNode(name=b"ccc-link", target=b"aaa-dep/bin")],
        command_args=["/bin/sh", "-c", "true"],
        working_dir="build",
        scratch_paths=["build", "nix/store"],
        inputs_dir="nix/store",
        outputs=["nix/store/zzz-out"],
        environment_vars=[EnvVar(key="A", value=b"1")],
        constraints=BuildConstraints(system="x86_64-linux", provide_bin_sh=True,
                                     available_ro_paths=["/usr/share"]),
        additional_files=[AdditionalFile(path="build/.attrs.json", contents=b'{"a":1}'),
                          AdditionalFile(path="opt/conf/x.cfg", contents=b"cfg\n")],
    )
    return attrs.evolve(req, **changes)


def inputs_for(req: BuildRequest) -> dict:
    return {n.name: f"/nonexistent/{n.name.decode()}" for n in req.inputs}


def test_layout(base_dir: Path) -> None:
    req = request()
    lay = write_bundle(base_dir / "b", req, idmap=IDMAP, input_paths=inputs_for(req))
    config = json.loads(lay.config.read_text())
    validate_config(config)
    assert config["root"]["path"] == str(lay.rootfs)
    rootfs = lay.rootfs
    # /etc: the build user as Nix's sandbox names it
    passwd = (rootfs / "etc/passwd").read_text().splitlines()
    assert "nixbld:x:1000:100:Nix build user:/build:/noshell" in passwd
    assert (rootfs / "etc/group").read_text().splitlines()[1].split(":")[2] == "100"
    assert "127.0.0.1 localhost" in (rootfs / "etc/hosts").read_text()
    # scratch dirs: writable by the mapped build user
    for s in req.scratch_paths:
        d = lay.scratch_dir(req.scratch_paths, s)
        st_ = d.stat()
        assert (st_.st_uid, st_.st_gid) == (500000 + 1000, 600000 + 100)
        assert any(m["source"] == str(d) and m["destination"] == "/" + s
                   for m in config["mounts"])
    store = lay.scratch_dir(req.scratch_paths, "nix/store")
    # mount points: a directory for a directory input, a file for a file input
    assert (store / "aaa-dep").is_dir()
    assert stat.S_ISREG((store / "bbb-src.sh").lstat().st_mode)
    # symlink inputs are created, not mounted
    assert os.readlink(store / "ccc-link") == "aaa-dep/bin"
    assert (rootfs / "bin/sh").is_file() and (rootfs / "usr/share").is_dir()
    for rel in ("proc", "dev", "tmp", "build", "nix/store"):
        assert (rootfs / rel).is_dir(), rel
    assert not (rootfs / "sys").exists()  # no /sys without network access, as in Nix
    assert stat.S_IMODE((rootfs / "tmp").stat().st_mode) == 0o1777  # runc copies it to the tmpfs
    # additional files: into the scratch dir or the (read-only) rootfs, the builder's
    attrs_json = lay.scratch_dir(req.scratch_paths, "build") / ".attrs.json"
    assert attrs_json.read_bytes() == b'{"a":1}'
    assert attrs_json.stat().st_uid == 501000
    assert (rootfs / "opt/conf/x.cfg").read_bytes() == b"cfg\n"
    assert (rootfs / "opt/conf/x.cfg").stat().st_uid == 501000
    # host_path: where an output is read back
    assert lay.host_path(req.scratch_paths, "nix/store/zzz-out") == store / "zzz-out"
    assert lay.host_path(req.scratch_paths, "opt/conf") == rootfs / "opt/conf"
    assert not [p for p in base_dir.iterdir() if p.name != "b"]


BUILDER = (500000 + 1000, 600000 + 100)  # IDMAP's host ids of container 1000:100


def _tree(top: Path) -> list[Path]:
    found = [top]
    for dirpath, dirnames, filenames in os.walk(top):
        found += [Path(dirpath, n) for n in dirnames + filenames]
    return found


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000], ids=["022", "077", "000"])
def test_modes_and_owners_are_nix_28s(base_dir: Path, umask: int) -> None:
    # Nix 2.8 (build-users-group empty) shows, from inside its sandbox:
    # / 0750, /build 0700, /nix/store 1775, /tmp 1777, everything owned by
    # nixbld:nixbld (1000:100), since it maps the host's root to the builder.
    req = request()
    old = os.umask(umask)
    try:
        lay = write_bundle(base_dir / "b", req, idmap=IDMAP, input_paths=inputs_for(req))
    finally:
        os.umask(old)
    rootfs = lay.rootfs
    assert _mode(rootfs) == 0o750
    assert _mode(lay.scratch_dir(req.scratch_paths, "build")) == 0o700
    assert _mode(lay.scratch_dir(req.scratch_paths, "nix/store")) == 0o1775
    assert _mode(rootfs / "tmp") == 0o1777
    for rel in ("etc", "proc", "dev", "nix", "opt/conf", "bin"):
        assert _mode(rootfs / rel) == 0o755, rel
    for rel in ("etc/passwd", "etc/group", "etc/hosts", "opt/conf/x.cfg", "bin/sh"):
        assert _mode(rootfs / rel) == 0o644, rel
    everything = _tree(rootfs) + [p for s in req.scratch_paths
                                  for p in _tree(lay.scratch_dir(req.scratch_paths, s))]
    assert len(everything) > 15
    for p in everything:
        st_ = p.lstat()
        assert (st_.st_uid, st_.st_gid) == BUILDER, p


def test_working_dir_outside_scratch_paths_is_the_builders(base_dir: Path) -> None:
    # A working directory in the read-only root: 0700 and the builder's, so
    # the builder can still enter it.
    req = request(working_dir="work/here", additional_files=[])
    lay = write_bundle(base_dir / "b", req, idmap=IDMAP, input_paths=inputs_for(req))
    work = lay.rootfs / "work/here"
    assert _mode(work) == 0o700 and (work.stat().st_uid, work.stat().st_gid) == BUILDER
    assert _mode(lay.rootfs / "work") == 0o755
    assert _mode(lay.scratch_dir(req.scratch_paths, "build")) == 0o755  # a scratch path like any other


def test_inputs_dir_1775_only_as_a_scratch_path(base_dir: Path) -> None:
    # inputs_dir inside a scratch path, not one itself: an ordinary directory.
    req = request(scratch_paths=["build", "nix"], outputs=["nix/out"])
    lay = write_bundle(base_dir / "b", req, idmap=IDMAP, input_paths=inputs_for(req))
    store = lay.scratch_dir(req.scratch_paths, "nix") / "store"
    assert _mode(store) == 0o755 and (store.stat().st_uid, store.stat().st_gid) == BUILDER
    assert _mode(lay.scratch_dir(req.scratch_paths, "nix")) == 0o755
    # inputs_dir that is also the working directory: the working directory's 0700.
    req = request(working_dir="nix/store", additional_files=[])
    lay = write_bundle(base_dir / "c", req, idmap=IDMAP, input_paths=inputs_for(req))
    assert _mode(lay.scratch_dir(req.scratch_paths, "nix/store")) == 0o700
    assert _mode(lay.scratch_dir(req.scratch_paths, "build")) == 0o755


def test_bundle_dir_mode_lets_mapped_root_through(base_dir: Path) -> None:
    lay = write_bundle(base_dir / "b", request(), idmap=IDMAP, input_paths=inputs_for(request()))
    assert lay.root.stat().st_mode & 0o001


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=valid_requests(ro_paths=False))
def test_every_mount_point_exists(base_dir: Path, req: BuildRequest) -> None:
    target = Path(tempfile.mkdtemp(dir=base_dir)) / "b"
    os.chmod(target.parent, 0o711)
    lay = write_bundle(target, req, idmap=IDMAP, input_paths=inputs_for(req))
    validate_config(json.loads(lay.config.read_text()))
    for rel, kind in mount_points(req):
        # the mount point lives where the enclosing mount's host side is
        host = _mount_point_host(lay, req, rel)
        assert host.is_dir() if kind == "dir" else host.is_file(), rel
    for f in req.additional_files:
        assert lay.host_path(req.scratch_paths, f.path).read_bytes() == f.contents


def _mount_point_host(lay, req, rel):
    enclosing = [s for s in req.scratch_paths if s != rel and rel.startswith(s + "/")]
    if not enclosing:
        return lay.rootfs / rel
    s = max(enclosing, key=len)
    return lay.scratch_dir(req.scratch_paths, s) / rel[len(s) + 1:]


def test_existing_bundle_dir_is_refused(base_dir: Path) -> None:
    (base_dir / "b").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(base_dir / "b", request(), idmap=IDMAP, input_paths=inputs_for(request()))


def test_invalid_request_creates_nothing(base_dir: Path) -> None:
    with pytest.raises(RequestError):
        write_bundle(base_dir / "b", request(working_dir="../x"), idmap=IDMAP)
    assert list(base_dir.iterdir()) == []


def test_missing_ro_path_fails_and_leaves_nothing(base_dir: Path) -> None:
    req = request(constraints=BuildConstraints(system="x", available_ro_paths=["/no/such/dir"]))
    with pytest.raises(BundleError, match="/no/such/dir"):
        write_bundle(base_dir / "b", req, idmap=IDMAP, input_paths=inputs_for(req))
    assert list(base_dir.iterdir()) == []


def test_failure_at_the_last_step_leaves_nothing(base_dir: Path, monkeypatch) -> None:
    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bundle_mod, "make_spec", boom)
    with pytest.raises(BundleError, match="No space left"):
        write_bundle(base_dir / "b", request(), idmap=IDMAP, input_paths=inputs_for(request()))
    assert list(base_dir.iterdir()) == []


def test_unreachable_parent_is_refused(base_dir: Path) -> None:
    private = base_dir / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    with pytest.raises(BundleError, match="not searchable"):
        check_traversable(private)
    with pytest.raises(BundleError, match="not searchable"):
        write_bundle(private / "b", request(), idmap=IDMAP, input_paths=inputs_for(request()))
    assert list(private.iterdir()) == []


def test_remove_bundle_refuses_while_mounted(base_dir: Path) -> None:
    lay = write_bundle(base_dir / "b", request(), idmap=IDMAP, input_paths=inputs_for(request()))
    inside = lay.scratch_dir(request().scratch_paths, "build")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inside)], check=True)
    try:
        with pytest.raises(BundleError, match="still mounted"):
            remove_bundle(lay.root)
        assert lay.root.exists()
    finally:
        subprocess.run(["umount", str(inside)], check=True)
    remove_bundle(lay.root)
    assert not lay.root.exists()


# --- scratch directories kept apart (bundle on a tmpfs, scratch on disk) -------------------


def test_scratch_root_apart(base_dir: Path) -> None:
    req = request()
    (base_dir / "rt").mkdir(mode=0o711)
    (base_dir / "disk").mkdir(mode=0o711)
    lay = write_bundle(base_dir / "rt" / "b", req, idmap=IDMAP, input_paths=inputs_for(req),
                       scratch_root=base_dir / "disk" / "b")
    config = json.loads(lay.config.read_text())
    validate_config(config)
    assert lay.scratch_root == base_dir / "disk" / "b"
    # config.json binds the real directories, not through the symlink
    for s in req.scratch_paths:
        d = lay.scratch_dir(req.scratch_paths, s)
        assert d.parent == base_dir / "disk" / "b" and d.is_dir() and not d.is_symlink()
        assert any(m["source"] == str(d) and m["destination"] == "/" + s
                   for m in config["mounts"])
        assert (d.stat().st_uid, d.stat().st_gid) == BUILDER
    # what lands in a scratch path is on the disk side: additional files, symlink inputs
    assert (base_dir / "disk/b/0/.attrs.json").read_bytes() == b'{"a":1}'
    assert os.readlink(base_dir / "disk/b/1/ccc-link") == "aaa-dep/bin"
    # people looking at the bundle find the scratch directories through a symlink
    assert os.readlink(lay.root / "scratch") == str(base_dir / "disk" / "b")
    assert layout_mod.linked_scratch(lay.root) == base_dir / "disk" / "b"
    assert sorted(p.name for p in (base_dir / "rt").iterdir()) == ["b"]

    remove_bundle(lay.root)
    assert list((base_dir / "rt").iterdir()) == [] and list((base_dir / "disk").iterdir()) == []


def test_scratch_root_apart_failure_leaves_nothing(base_dir: Path, monkeypatch) -> None:
    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bundle_mod, "make_spec", boom)
    (base_dir / "rt").mkdir(mode=0o711)
    (base_dir / "disk").mkdir(mode=0o711)
    with pytest.raises(BundleError, match="No space left"):
        write_bundle(base_dir / "rt" / "b", request(), idmap=IDMAP,
                     input_paths=inputs_for(request()), scratch_root=base_dir / "disk" / "b")
    assert list((base_dir / "rt").iterdir()) == [] and list((base_dir / "disk").iterdir()) == []


def test_existing_scratch_root_is_refused(base_dir: Path) -> None:
    (base_dir / "s").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(base_dir / "b", request(), idmap=IDMAP, input_paths=inputs_for(request()),
                     scratch_root=base_dir / "s")
    assert sorted(p.name for p in base_dir.iterdir()) == ["s"]


def test_trash_bundle_moves_both_parts_each_to_its_trash(base_dir: Path) -> None:
    req = request()
    lay = write_bundle(base_dir / "b", req, idmap=IDMAP, input_paths=inputs_for(req),
                       scratch_root=base_dir / "s")
    moved = layout_mod.trash_bundle(lay.root, base_dir / "trash",
                                    scratch_trash_dir=base_dir / "strash")
    assert [p.parent.name for p in moved] == ["trash", "strash"]
    assert not lay.root.exists() and not (base_dir / "s").exists()
    assert (moved[1] / "0" / ".attrs.json").exists()
    assert layout_mod.trash_bundle(lay.root, base_dir / "trash") == []


def test_trash_bundle_refuses_while_its_scratch_is_mounted(base_dir: Path) -> None:
    req = request()
    lay = write_bundle(base_dir / "b", req, idmap=IDMAP, input_paths=inputs_for(req),
                       scratch_root=base_dir / "s")
    inside = lay.scratch_dir(req.scratch_paths, "build")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inside)], check=True)
    try:
        with pytest.raises(BundleError, match="still mounted"):
            layout_mod.trash_bundle(lay.root, base_dir / "trash")
        assert lay.root.exists() and inside.exists()
    finally:
        subprocess.run(["umount", str(inside)], check=True)


def test_remove_if_small_leaves_a_large_tree(base_dir: Path) -> None:
    small = base_dir / "small"
    (small / "a" / "b").mkdir(parents=True)
    (small / "a" / "f").write_text("x")
    (small / "link").symlink_to("/etc")  # removed, not followed
    assert layout_mod.remove_if_small(small, limit=4)
    assert not small.exists() and Path("/etc/passwd").exists()
    large = base_dir / "large"
    large.mkdir()
    for i in range(5):
        (large / str(i)).write_text("x")
    assert not layout_mod.remove_if_small(large, limit=4)
    assert len(list(large.iterdir())) == 5


# --- shared root file systems ------------------------------------------------------------


def _snapshot(top: Path) -> dict[str, tuple]:
    """Everything a container could tell about a tree: kinds, modes, owners, bytes."""
    out = {}
    for p in _tree(top):
        st_ = p.lstat()
        kind = stat.S_IFMT(st_.st_mode)
        what = (p.read_bytes() if stat.S_ISREG(st_.st_mode)
                else os.readlink(p) if stat.S_ISLNK(st_.st_mode) else None)
        out[str(p.relative_to(top))] = (kind, _mode(p), st_.st_uid, st_.st_gid, what)
    return out


def _shareable(req: BuildRequest) -> BuildRequest:
    """The request, less what makes a root unshareable."""
    in_scratch = [f for f in req.additional_files
                  if any(f.path.startswith(s + "/") for s in req.scratch_paths)]
    constraints = attrs.evolve(req.constraints or BuildConstraints(system="x86_64-linux"),
                               available_ro_paths=[])
    return attrs.evolve(req, additional_files=in_scratch, constraints=constraints)


def _write_three(base: Path, req: BuildRequest):
    """The same request as a bundle with its own root, then twice with a shared one."""
    own = write_bundle(base / "own", req, idmap=IDMAP, input_paths=inputs_for(req))
    shared = base / "roots" / spec_mod.shared_rootfs_key(req, IDMAP)
    (base / "roots").mkdir(mode=0o711, exist_ok=True)
    first = write_bundle(base / "first", req, idmap=IDMAP, input_paths=inputs_for(req),
                         shared_rootfs=shared)
    second = write_bundle(base / "second", req, idmap=IDMAP, input_paths=inputs_for(req),
                          shared_rootfs=shared)
    return own, first, second, shared


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=valid_requests(ro_paths=False))
def test_a_shared_root_is_the_root_the_bundle_would_have_had(base_dir: Path,
                                                           req: BuildRequest) -> None:
    req = _shareable(req)
    base = Path(tempfile.mkdtemp(dir=base_dir))
    os.chmod(base, 0o711)
    own, first, second, shared = _write_three(base, req)
    assert _snapshot(shared) == _snapshot(own.rootfs)
    for lay in (first, second):
        assert lay.rootfs == shared and not (lay.root / "rootfs").exists()
        config = json.loads(lay.config.read_text())
        validate_config(config)
        assert config["root"]["path"] == str(shared)
        assert _snapshot(lay.root / "scratch") == _snapshot(own.root / "scratch")
    # Published whole, nothing partial beside it.
    assert os.listdir(shared.parent) == [shared.name]


def _mutations(req: BuildRequest) -> dict[str, tuple[BuildRequest, bool]]:
    """Changed requests, each with whether its root may differ from ``req``'s."""
    c = req.constraints
    out = {
        "env": (attrs.evolve(req, environment_vars=[EnvVar(key="ZZZ", value=b"2")]), False),
        "args": (attrs.evolve(req, command_args=["/bin/sh", "-c", "exit 3"]), False),
        "outputs": (attrs.evolve(req, outputs=[]), False),
        "needles": (attrs.evolve(req, refscan_needles=["abc"]), False),
        "input digests": (attrs.evolve(req, inputs=[
            attrs.evolve(n, digest=b"\x09" * 32) if not isinstance(n, SymlinkNode) else n
            for n in req.inputs]), False),
        "scratch files": (attrs.evolve(req, additional_files=[
            attrs.evolve(f, contents=f.contents + b"!") for f in req.additional_files]), False),
        "bin sh": (attrs.evolve(req, constraints=attrs.evolve(
            c, provide_bin_sh=not c.provide_bin_sh)), True),
        "network": (attrs.evolve(req, constraints=attrs.evolve(
            c, network_access=not c.network_access)), True),
        "working dir": (attrs.evolve(req, working_dir="w-elsewhere"), True),
        "input names": (attrs.evolve(req, inputs=[
            attrs.evolve(n, name=b"z" + n.name) for n in req.inputs]), True),
        "symlink targets": (attrs.evolve(req, inputs=[
            attrs.evolve(n, target=n.target + b"x") if isinstance(n, SymlinkNode) else n
            for n in req.inputs]), True),
    }
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=valid_requests(ro_paths=False))
def test_requests_share_a_root_exactly_when_their_roots_are_the_same(
        base_dir: Path, req: BuildRequest) -> None:
    req = _shareable(req)
    base = Path(tempfile.mkdtemp(dir=base_dir))
    os.chmod(base, 0o711)
    key = spec_mod.shared_rootfs_key(req, IDMAP)
    ref = _snapshot(write_bundle(base / "ref", req, idmap=IDMAP,
                                 input_paths=inputs_for(req)).rootfs)
    for what, (other, may_differ) in _mutations(req).items():
        try:
            lay = write_bundle(base / what.replace(" ", "-"), other, idmap=IDMAP,
                               input_paths=inputs_for(other))
        except RequestError:
            continue  # the change made the request invalid (a path clash)
        same_key = spec_mod.shared_rootfs_key(other, IDMAP) == key
        same_root = _snapshot(lay.rootfs) == ref
        # Equal keys must mean equal roots; a change that leaves the root
        # alone must leave the key alone (or nothing would be shared).
        assert same_root or not same_key, what
        if not may_differ:
            assert same_key, what
        elif not same_root:
            assert not same_key, what


def test_a_root_that_cannot_be_shared_is_refused_and_nothing_is_written(base_dir: Path) -> None:
    req = request()  # available_ro_paths, and a file in /opt/conf (the root)
    assert spec_mod.shared_rootfs_key(req, IDMAP) is None
    no_ro = attrs.evolve(req, constraints=attrs.evolve(req.constraints, available_ro_paths=[]))
    assert spec_mod.shared_rootfs_key(no_ro, IDMAP) is None  # the file in the root
    assert spec_mod.shared_rootfs_key(_shareable(req), IDMAP) is not None
    with pytest.raises(BundleError, match="cannot be shared"):
        write_bundle(base_dir / "b", req, idmap=IDMAP, input_paths=inputs_for(req),
                     shared_rootfs=base_dir / "root")
    assert list(base_dir.iterdir()) == []


def test_a_failed_bundle_publishes_no_root(base_dir: Path, monkeypatch) -> None:
    req = _shareable(request())
    shared = base_dir / "root"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bundle_mod, "make_spec", boom)
    with pytest.raises(BundleError, match="No space left"):
        write_bundle(base_dir / "b", req, idmap=IDMAP, input_paths=inputs_for(req),
                     shared_rootfs=shared)
    assert list(base_dir.iterdir()) == []
    monkeypatch.undo()
    lay = write_bundle(base_dir / "b", req, idmap=IDMAP, input_paths=inputs_for(req),
                       shared_rootfs=shared)
    assert lay.rootfs == shared and (shared / "etc" / "passwd").is_file()

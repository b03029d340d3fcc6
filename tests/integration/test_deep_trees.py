"""A builder's 10,000-deep tree, end to end: real runc, FUSE, the local store, Nix.

One :class:`~stages.service.OciBuildService` (a local store, busybox inputs)
builds an output that is a chain of 10,000 directories with a file at the
bottom: 20,000 bytes of path, ten times Python's recursion limit. The build
ingests it (and scans it for a needle), its NAR is Nix's, a second build
reads the bottom through the FUSE mount server, and nothing of either build
is left behind. Then a service starting on a state directory whose trash,
dead instance and bundle hold such chains removes them.

About Nix: ``nix-store --dump`` (2.8) names every file by its full path, so
it fails past PATH_MAX (4096 bytes), at about 2,040 levels. The NAR is held
against Nix at the deepest chain it can dump (2,000 levels, also past the
recursion limit), byte for byte; at 10,000 levels against the NAR Nix's own
dumps of 0, 1 and 2 levels spell out (each level adds the same bytes before
and after, which the 2,000-level dump confirms), and against the prefix Nix
writes before it gives up.

The builder makes the chain 1,000 levels per ``mkdir -p`` and ``cd -P``:
busybox ash's logical ``cd`` chdirs to the whole $PWD (ENAMETOOLONG past
4096 bytes), and its physical ``cd`` calls getcwd after every step, which
the kernel answers in time proportional to the depth (10,000 single ``cd -P``
steps take minutes of system time).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_asyncio

from stages.castore.ingest import ingest_path
from stages.castore.nar import nar_bytes
from stages.castore.nodes import DirectoryNode, SymlinkNode, node_to_json
from stages.request import BuildConstraints, BuildRequest, EnvVar
from stages.service import OciBuildService

pytestmark = [pytest.mark.runc, pytest.mark.fuse, pytest.mark.nix,
              pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

DEPTH = 10_000
STEP = 1_000  # levels per mkdir -p / cd -P
NIX_DEPTH = 2_000  # as deep as nix-store --dump goes below a short path
BOTTOM = b"bottom of the chain\n"
H_BB = "0bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
H_DEEP = "7ddddddddddddddddddddddddddddddd"
BB_NAME = f"{H_BB}-busybox"
DEEP_NAME = f"{H_DEEP}-deep"
BB = f"/nix/store/{BB_NAME}"
APPLETS = ("sh", "cat", "mkdir")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

assert DEPTH > 5 * sys.getrecursionlimit() and NIX_DEPTH > sys.getrecursionlimit()

# The chain, $STEP levels at a time: s is d/d/.../d ($STEP of them).
CHAIN = f"""
s=d; i=1; while [ $i -lt {STEP} ]; do s=$s/d; i=$((i+1)); done
"""
MAKE = CHAIN + f"""
mkdir /nix/store/out && cd /nix/store/out || exit 1
j=0; while [ $j -lt {DEPTH // STEP} ]; do mkdir -p $s && cd -P $s || exit 2; j=$((j+1)); done
echo '{BOTTOM.decode().strip()}' > f
"""
READ = CHAIN + f"""
cd -P /nix/store/{DEEP_NAME} || exit 1
j=0; while [ $j -lt {DEPTH // STEP} ]; do cd -P $s || exit 2; j=$((j+1)); done
cat f > /nix/store/out
"""


def make_chain(root: Path, depth: int, data: bytes = BOTTOM) -> None:
    """``root``/d/.../d/f, written level by level through directory fds."""
    os.mkdir(root)
    fd = os.open(root, DIR_FLAGS)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        f = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        try:
            os.write(f, data)
        finally:
            os.close(f)
    finally:
        os.close(fd)


def nix_dump(path: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["nix-store", "--dump", str(path)], capture_output=True, check=check)


class Env:
    def __init__(self, base: Path, svc: OciBuildService, busybox) -> None:
        self.base = base
        self.svc = svc
        self.busybox = busybox

    @property
    def host(self):
        assert self.svc.host is not None
        return self.svc.host

    def request(self, script: str, inputs=(), needles=()) -> BuildRequest:
        nodes = sorted([self.busybox, *inputs], key=lambda n: n.name)
        env = {"HOME": "/homeless-shelter", "PATH": BB}
        return BuildRequest(
            inputs=nodes, command_args=[f"{BB}/sh", "-c", script],
            working_dir="build", scratch_paths=["build", "nix/store"], inputs_dir="nix/store",
            outputs=["nix/store/out"],
            environment_vars=[EnvVar(key=k, value=v.encode()) for k, v in sorted(env.items())],
            constraints=BuildConstraints(system="x86_64-linux"),
            refscan_needles=list(needles))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env():
    base = Path(tempfile.mkdtemp(prefix="ocibuild-deep-"))
    os.chmod(base, 0o711)
    store = f"local://{base}/store"
    bb = base / "inputs" / BB_NAME
    bb.mkdir(parents=True)
    shutil.copy2("/bin/busybox", bb / "busybox")
    for applet in APPLETS:
        (bb / applet).symlink_to("busybox")
    try:
        async with OciBuildService(base / "state", blob_address=store, directory_address=store,
                                   jobs=2) as svc:
            busybox = await ingest_path(svc.host.castore, bb)
            yield Env(base, svc, busybox)
    finally:
        from stages.oci.layout import rmtree

        rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def nix_levels(env: Env) -> tuple[bytes, bytes, bytes, bytes]:
    """(magic, one level's head, the bottom, one level's tail), from Nix's own dumps.

    A chain of n levels dumps as magic + head*n + bottom + tail*n: Nix says
    so for 0, 1 and 2 levels here, and for NIX_DEPTH in the test below.
    """
    dumps = []
    for n in range(3):
        make_chain(env.base / f"nix{n}", n)
        dumps.append(nix_dump(env.base / f"nix{n}").stdout)
    magic = dumps[0][:24]
    assert magic == b"\x0d" + b"\0" * 7 + b"nix-archive-1\0\0\0"
    bottom = dumps[0][24:]
    at = dumps[1].index(bottom, 24)
    head, tail = dumps[1][24:at], dumps[1][at + len(bottom):]
    assert dumps[2] == magic + head * 2 + bottom + tail * 2
    return magic, head, bottom, tail


def chain_nar(levels: tuple[bytes, bytes, bytes, bytes], depth: int) -> bytes:
    magic, head, bottom, tail = levels
    return magic + head * depth + bottom + tail * depth


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deep_build(env: Env):
    """The build whose output is the chain (scanned for a needle at the bottom)."""
    build = await env.svc.do_build(env.request(MAKE, needles=["bottom of the chain", "absent"]))
    await env.host.drain()
    return build


def _left_behind(env: Env) -> list[str]:
    """Bundles, scratch and trash of this module's service that are still there."""
    host = env.host
    places = [host.bundles_dir, host.trash_dir]
    if host.runtime_dir is not None:
        places += [host.runtime_dir / "bundles", host.runtime_dir / "trash"]
    if host.scratch_dir is not None:
        places.append(host.scratch_dir)
    return [f"{p}/{n}" for p in places if p is not None and p.is_dir() for n in os.listdir(p)]


async def test_a_10000_deep_output_builds_and_ingests(env: Env, deep_build) -> None:
    (node,) = deep_build.outputs
    assert isinstance(node, DirectoryNode)
    assert node.size == DEPTH + 1  # every d, and f
    assert [list(o.needles) for o in deep_build.outputs_needles] == [[0]]
    # The same tree written here by Python imports to the same directory.
    host = env.base / "host"
    if not host.exists():  # another test of the module may have written it first
        make_chain(host, DEPTH)
    assert (await ingest_path(env.host.castore, host)).digest == node.digest
    assert _left_behind(env) == []


async def test_its_nar_is_nixs(env: Env, deep_build, nix_levels) -> None:
    (node,) = deep_build.outputs
    want = chain_nar(nix_levels, DEPTH)
    assert await nar_bytes(env.host.castore, node) == want
    # The command line, as a user runs it, in a process of its own.
    store = f"local://{env.base}/store"
    cli = subprocess.run(
        [sys.executable, "-m", "stages.cli", "castore", "--blob-service-addr", store,
         "--directory-service-addr", store, "nar"],
        input=node_to_json(node).encode() + b"\n", capture_output=True, timeout=300)
    assert cli.returncode == 0, cli.stderr.decode()[-2000:]
    assert cli.stdout == want
    # Nix 2.8 cannot dump the chain (it names files by full paths), but
    # what it writes before it stops is where our NAR starts.
    host = env.base / "host"
    if not host.exists():
        make_chain(host, DEPTH)
    failed = nix_dump(host, check=False)
    assert failed.returncode != 0 and b"File name too long" in failed.stderr
    assert len(failed.stdout) > 100_000 and want.startswith(failed.stdout)


async def test_a_chain_as_deep_as_nix_dumps_is_byte_identical(env: Env, nix_levels) -> None:
    path = env.base / "n"  # short: Nix needs the whole path under 4096 bytes
    make_chain(path, NIX_DEPTH)
    dumped = nix_dump(path).stdout
    assert dumped == chain_nar(nix_levels, NIX_DEPTH)
    node = await ingest_path(env.host.castore, path)
    assert await nar_bytes(env.host.castore, node) == dumped


async def test_a_second_build_reads_the_bottom_through_fuse(env: Env, deep_build) -> None:
    (node,) = deep_build.outputs
    deep_input = node.renamed(DEEP_NAME.encode())
    build = await env.svc.do_build(env.request(READ, inputs=[deep_input]))
    (out,) = build.outputs
    assert not isinstance(out, (DirectoryNode, SymlinkNode))
    assert await env.host.castore.blobs.get(out.digest) == BOTTOM
    await env.host.drain()
    assert _left_behind(env) == []


# --- a service starting on a state directory a crash left deep trees in ---------------

async def test_a_starting_service_removes_deep_scratch_and_trash(env: Env) -> None:
    state = env.base / "crashed"
    key = "deadbeef-0"
    dead = state / "instances" / "111-dead"
    for d in (dead / "mnt", dead / "runc", dead / "scratch" / key, state / "trash" / "x.1",
              state / "bundles" / key / "scratch"):
        d.mkdir(parents=True)
    (dead / "lock").write_text("")  # nobody holds it: the instance is dead
    (dead / "keys").write_text(key + "\n")
    make_chain(dead / "scratch" / key / "0", DEPTH)        # an ephemeral bundle's scratch
    make_chain(state / "bundles" / key / "scratch" / "0", DEPTH)  # a bundle on disk
    make_chain(state / "trash" / "x.1" / "0", DEPTH)        # a discarded bundle
    make_chain(state / "trash" / "y.2", DEPTH)              # a discarded scratch root
    os.chmod(state / "trash" / "y.2", 0o500)
    store = f"local://{env.base}/store"
    async with OciBuildService(state, blob_address=store, directory_address=store,
                               jobs=1) as svc:
        assert f"bundle {state / 'bundles' / key}" in svc.cleaned
        assert "instance 111-dead" in svc.cleaned
        assert not dead.exists()
        assert not (state / "bundles" / key).exists()
        assert os.listdir(state / "trash") == []
        # And it builds.
        build = await svc.do_build(env.request("echo ok > /nix/store/out"))
        assert await svc.host.castore.blobs.get(build.outputs[0].digest) == b"ok\n"
    assert list((state / "instances").iterdir()) == []


async def test_a_kept_deep_bundle_is_removed_by_remove_bundle(env: Env) -> None:
    from stages.oci.layout import remove_bundle

    svc = env.svc
    run, specs = await svc.run_builds([env.request(MAKE)], keep="always")
    bundle = env.host.bundle_dir(specs[0])
    assert (bundle / "scratch").exists()
    await asyncio.to_thread(remove_bundle, bundle)
    assert not os.path.lexists(bundle)
    assert _left_behind(env) == []

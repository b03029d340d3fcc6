"""Attacks from inside real builds, under the operator's policy (issue 13).

Each test runs a real runc container through the OCI service and tries what
a hostile request or builder would: host paths it was not granted, a
symlink out of a granted directory, a fork bomb, a memory hog, filling
/tmp, setuid bits, extended attributes and the syscalls the seccomp filter
refuses. The builder for the syscall probes is the host's own python3,
bound read-only from /usr as the policy of this module allows (it needs
/usr and the /lib64 loader link, nothing else).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import pytest_asyncio

from stages.castore import ingest_path
from stages.errors import BuildFailed
from stages.policy import Policy
from stages.request import BuildConstraints, BuildRequest, EnvVar
from stages.service import OciBuildService
from stages.service.oci import RUNTIMES

pytestmark = [pytest.mark.runc, pytest.mark.fuse, pytest.mark.root,
              pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

BB_NAME = "bb"
BB = f"/nix/store/{BB_NAME}"
# Debian's python3 (the Makefile installs it), not a pyenv shim outside /usr.
PYTHON = "/usr/bin/python3"
MAX_PIDS = 64
MAX_MEMORY = 256 << 20
TMP_SIZE = 8 << 20


class Env:
    def __init__(self, base: Path, svc: OciBuildService, busybox: object) -> None:
        self.base = base
        self.svc = svc
        self.busybox = busybox

    def request(self, command: list[str], *, ro_paths: tuple[str, ...] = (),
                outputs: tuple[str, ...] = ("nix/store/out",),
                inputs: tuple[object, ...] = ()) -> BuildRequest:
        return BuildRequest(
            inputs=sorted([self.busybox, *inputs], key=lambda n: n.name),  # type: ignore[attr-defined]  # nodes
            command_args=command,
            working_dir="build", scratch_paths=["build", "nix/store"], inputs_dir="nix/store",
            outputs=list(outputs),
            environment_vars=[EnvVar(key="PATH", value=BB.encode())],
            constraints=BuildConstraints(system="x86_64-linux",
                                         available_ro_paths=sorted(ro_paths)))

    def sh(self, script: str, **kw: object) -> BuildRequest:
        return self.request([f"{BB}/sh", "-c", script], **kw)  # type: ignore[arg-type]

    def python(self, code: str) -> BuildRequest:
        # /lib and /lib64 are links into /usr here (merged /usr): bound resolved.
        return self.request([PYTHON, "-c", code], ro_paths=("/lib", "/lib64", "/usr"))

    async def out(self, req: BuildRequest) -> bytes:
        build = await self.svc.do_build(req)
        assert self.svc.host is not None
        return await self.svc.host.castore.blobs.get(build.outputs[0].digest)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIMES)
async def env(request: pytest.FixtureRequest):
    """Every attack, against each runtime (runc, bwrap)."""
    # Not under /tmp: a request cannot name paths there (the sandbox owns /tmp).
    base = Path(tempfile.mkdtemp(prefix="ocibuild-hardening-", dir="/var/tmp"))
    os.chmod(base, 0o711)
    (base / "allowed").mkdir()
    (base / "allowed" / "file").write_text("granted\n")
    (base / "secret").write_text("not granted\n")
    (base / "allowed" / "escape").symlink_to(base / "secret")
    (base / "allowed" / "sub").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs",
                    str(base / "allowed" / "sub")], check=True)
    bb = base / "inputs" / BB_NAME
    bb.mkdir(parents=True)
    shutil.copy2("/bin/busybox", bb / "busybox")
    for applet in ("sh", "cat", "echo", "chmod", "dd", "sleep", "ls"):
        (bb / applet).symlink_to("busybox")
    store = f"local://{base}/store"
    policy = Policy(allowed_ro_paths=[str(base / "allowed"), "/lib", "/lib64", "/usr"],
                    max_pids=MAX_PIDS, max_memory=MAX_MEMORY, tmp_size=TMP_SIZE)
    try:
        async with OciBuildService(base / "state", blob_address=store, directory_address=store,
                                   jobs=2, policy=policy, runtime=request.param) as svc:
            assert svc.host is not None
            yield Env(base, svc, await ingest_path(svc.host.castore, bb))
    finally:
        subprocess.run(["umount", str(base / "allowed" / "sub")], check=False)
        shutil.rmtree(base, ignore_errors=True)


def _runs(env: Env) -> set[str]:
    return set(os.listdir(env.svc.runs_dir))


async def _refusal(env: Env, path: str) -> str:
    bundles = set(os.listdir(env.svc.bundles_dir))
    with pytest.raises(BuildFailed) as info:
        await env.svc.do_build(env.sh("cat /x/shadow > /nix/store/out", ro_paths=(path,)))
    assert set(os.listdir(env.svc.bundles_dir)) == bundles  # nothing was written
    return info.value.detail if hasattr(info.value, "detail") else str(info.value)


@pytest.mark.parametrize("path", ["/var/lib", "/root", "/no-such-dir-on-purpose"])
async def test_a_host_path_not_granted_is_refused_before_anything_runs(env: Env,
                                                                       path: str) -> None:
    message = await _refusal(env, path)
    assert "constraints.available_ro_paths[0]" in message and "ro-path-not-allowed" in message
    # The same words whether the path exists or not: nothing learnt about the host.
    other = await _refusal(env, "/no-such-dir-on-purpose")
    assert _words(message, path) == _words(other, "/no-such-dir-on-purpose")


def _words(message: str, path: str) -> str:
    after = message.split("constraints.available_ro_paths[0]", 1)[1]
    return after.replace(repr(path), "PATH")


async def test_a_symlink_out_of_a_granted_directory_is_refused(env: Env) -> None:
    escape = str(env.base / "allowed" / "escape")
    with pytest.raises(BuildFailed, match="ro-path-not-allowed"):
        await env.svc.do_build(env.sh("cat /x > /nix/store/out", ro_paths=(escape,)))


async def test_a_granted_path_is_readable_and_read_only(env: Env) -> None:
    # Read-only all the way down: also a world-writable tmpfs mounted below it.
    allowed = str(env.base / "allowed")
    script = (f"cat {allowed}/file > /nix/store/out; "
              f"if echo x > {allowed}/new 2>/dev/null; then echo WROTE >> /nix/store/out; fi; "
              f"if echo x > {allowed}/sub/new 2>/dev/null; then echo WROTE-SUB >> /nix/store/out; fi")
    assert await env.out(env.sh(script, ro_paths=(allowed,))) == b"granted\n"


FORK_BOMB = """
import os, time
n = 0
try:
    while n < 1000:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as exc:
    refused = exc.errno
open("/nix/store/out", "w").write(f"{n} {refused}")
"""


async def test_a_fork_bomb_stops_at_the_pids_limit(env: Env) -> None:
    started, refused = (await env.out(env.python(FORK_BOMB))).split()
    assert int(started) < MAX_PIDS, f"{started} processes under a limit of {MAX_PIDS}"
    assert int(refused) == errno.EAGAIN


def _touch_memory(size: int) -> str:
    return (f"b = bytearray({size})\n"
            "for i in range(0, len(b), 4096): b[i] = 1\n"
            "open('/nix/store/out', 'w').write('survived')\n")


async def test_a_memory_hog_is_stopped(env: Env) -> None:
    assert await env.out(env.python(_touch_memory(16 << 20))) == b"survived"  # the control
    with pytest.raises(BuildFailed) as info:
        await env.svc.do_build(env.python(_touch_memory(MAX_MEMORY * 2)))
    message = str(info.value)
    assert info.value.stage == "run" and "exit code 137" in message  # SIGKILL
    assert f"memory limit {MAX_MEMORY} bytes reached" in message


async def test_a_shell_fork_bomb_fails_naming_the_process_limit(env: Env) -> None:
    # busybox sh gives up when it cannot fork: the failure names the limit.
    script = "while true; do sleep 30 & done"
    with pytest.raises(BuildFailed) as info:
        await env.svc.do_build(env.sh(script))
    assert f"process limit {MAX_PIDS} (--max-pids)" in str(info.value)


async def test_the_limits_hold_in_a_graph_of_several_builds(env: Env) -> None:
    """Several requests are one graph whose stages are named KEY/STAGE (as
    every ``nix build`` is): the limits hold there too, and are named."""
    from stages.service import build_result

    bomb, hog = env.sh("while true; do sleep 30 & done"), env.python(_touch_memory(MAX_MEMORY * 2))
    run, specs = await env.svc.run_builds([bomb, hog, env.sh("echo ok > /nix/store/out")])
    errors = []
    for spec in specs[:2]:
        with pytest.raises(BuildFailed) as info:
            build_result(run, spec)
        errors.append(str(info.value))
    assert f"process limit {MAX_PIDS} (--max-pids)" in errors[0], errors[0]
    assert f"memory limit {MAX_MEMORY} bytes reached" in errors[1], errors[1]
    assert build_result(run, specs[2]).outputs  # the harmless one built beside them


async def test_a_tmpfs_filled_past_the_memory_limit_names_the_limit(env: Env) -> None:
    """tmpfs pages are memory the kernel cannot reclaim: the OOM killer may
    pick any process of the build's cgroup, bwrap itself included. Either
    way the failure names the memory limit."""
    small = 48 << 20
    policy = Policy(allowed_ro_paths=["/lib", "/lib64", "/usr"], max_pids=MAX_PIDS,
                    max_memory=small, tmp_size=4 * small)
    store = f"local://{env.base}/store"
    async with OciBuildService(env.base / "state-small", blob_address=store,
                               directory_address=store, jobs=1, policy=policy,
                               runtime=env.svc.runtime) as svc:
        script = (f"dd if=/dev/zero of=/tmp/fill bs=1M count={2 * (small >> 20)} || exit $?; "
                  "echo survived > /nix/store/out")
        with pytest.raises(BuildFailed) as info:
            await svc.do_build(env.sh(script))
    assert f"memory limit {small} bytes reached (--max-memory)" in str(info.value), info.value


async def test_no_cgroup_outlives_its_build(env: Env) -> None:
    await env.out(env.sh("echo ok > /nix/store/out"))
    for controller in ("memory", "pids", "cpu", "freezer"):
        top = Path("/sys/fs/cgroup") / controller / "ocibuild"
        left = [d for d in top.iterdir() if d.is_dir()] if top.is_dir() else []
        # Every build of this module is a run of one request: its key is the run id.
        assert not [d for d in left if d.name in _runs(env)], left


async def test_tmp_is_bounded(env: Env) -> None:
    script = (f"dd if=/dev/zero of=/tmp/fill bs=1M count={2 * (TMP_SIZE >> 20)} 2>/dev/null; "
              "ls -l /tmp/fill > /nix/store/out")
    listing = (await env.out(env.sh(script))).split()
    assert int(listing[4]) <= TMP_SIZE


async def test_no_setuid_or_setgid_bits(env: Env) -> None:
    script = ("echo x > /build/f; for m in 4755 2755 6755; do "
              "if chmod $m /build/f 2>/dev/null; then echo $m; fi; done > /nix/store/out; "
              "chmod 0755 /build/f && echo plain-ok >> /nix/store/out")
    assert await env.out(env.sh(script)) == b"plain-ok\n"


SYSCALL_PROBE = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
calls = {
    "io_uring_setup": (425, 8, 0),
    "perf_event_open": (298, 0, 0),
    "keyctl": (250, 0, 0),
    "bpf": (321, 0, 0),
    "unshare_user": (272, 0x10000000, 0),
    "mount": (165, 0, 0),
    "ptrace": (101, 16, 1),
    "userfaultfd": (323, 0, 0),
}
out = []
for name, (nr, a, b) in calls.items():
    res = libc.syscall(nr, a, b, 0, 0, 0)
    out.append(f"{name} {res} {errno.errorcode.get(ctypes.get_errno(), '?')}")
for name, family in (("vsock", 40), ("vsock_high_bits", 0x1_0000_0028), ("inet", 2)):
    res = libc.syscall(41, ctypes.c_long(family), 1, 0)
    out.append(f"socket_{name} {'ok' if res >= 0 else errno.errorcode[ctypes.get_errno()]}")
try:
    os.setxattr("/build", "user.x", b"1")
    out.append("setxattr ok")
except OSError as exc:
    out.append(f"setxattr {errno.errorcode[exc.errno]}")
out.append(f"getpid {os.getpid() > 0}")
open("/nix/store/out", "w").write("\\n".join(out) + "\\n")
"""


async def test_seccomp_refuses_what_a_build_never_needs(env: Env) -> None:
    lines = (await env.out(env.python(SYSCALL_PROBE))).decode().splitlines()
    results = dict(line.split(" ", 1) for line in lines)
    for name in ("io_uring_setup", "perf_event_open", "keyctl", "bpf", "unshare_user", "mount",
                 "ptrace", "userfaultfd"):
        assert results[name] == "-1 EPERM", (name, results[name])
    assert results["setxattr"] == "ENOTSUP" or results["setxattr"] == "EOPNOTSUPP"
    assert results["getpid"] == "True"  # the filter lets ordinary calls through
    # AF_VSOCK reaches the hypervisor whatever the network namespace; a
    # family with high bits set must not slip past the filter's comparison.
    assert results["socket_vsock"] == "ENOSYS"
    assert results["socket_vsock_high_bits"] == "ENOSYS"
    assert results["socket_inet"] == "ok"


async def test_many_inputs_build_or_are_refused_before_runc(env: Env) -> None:
    from stages.castore.nodes import FileNode

    assert env.svc.host is not None
    data_node = await ingest_path(env.svc.host.castore, env.base / "allowed" / "file")

    def many(n: int) -> BuildRequest:
        files = [FileNode(name=f"in{i:05d}".encode(), digest=data_node.digest,
                          size=data_node.size) for i in range(n)]
        return env.sh(f"cat /nix/store/in{n - 1:05d} > /nix/store/out", inputs=tuple(files))

    assert await env.out(many(200)) == b"granted\n"
    with pytest.raises(BuildFailed) as info:
        await env.svc.do_build(many(1500))
    assert info.value.stage == "spec" and "too-many-mounts" in str(info.value)


async def test_a_dead_mount_server_is_named_and_replaced(env: Env) -> None:
    import asyncio
    import signal

    from integration_helpers import processes_with

    assert env.svc.host is not None
    mounts = env.svc.host.mounts
    data = env.base / f"data-{os.getpid()}"
    data.write_bytes(os.urandom(1 << 16))  # new bytes: never in any page cache
    data_node = await ingest_path(env.svc.host.castore, data)
    marker = f"{7_000_000 + int.from_bytes(os.urandom(3), 'big')}"
    req = env.sh(f"sleep {marker} & wait; cat /nix/store/{data.name} > /nix/store/out",
                 inputs=(data_node,))
    task = asyncio.create_task(env.svc.do_build(req))
    for _ in range(400):
        if processes_with(f"sleep {marker}"):
            break
        await asyncio.sleep(0.05)
    assert processes_with(f"sleep {marker}"), "the build never started"
    assert mounts.pid is not None
    os.kill(mounts.pid, signal.SIGKILL)
    for pid in processes_with(f"sleep {marker}"):
        # The sleep only, not the shell (whose command line holds it too): the
        # builder goes on to read its input from the dead server.
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0]
        if os.path.basename(argv0) == b"sleep":
            os.kill(pid, signal.SIGKILL)
    with pytest.raises(BuildFailed) as info:
        await task
    assert "FUSE mount server serving the inputs died" in str(info.value)
    # The next build gets a new server, and says so in its log.
    assert await env.out(env.sh("echo after > /nix/store/out")) == b"after\n"
    assert mounts.exit_status is None


async def _input_dir(env: Env, files: dict[bytes, object]) -> object:
    """A directory input made of the given FileNodes (as stored, or lying)."""
    from stages.castore.nodes import Directory

    assert env.svc.host is not None
    directory = Directory.from_nodes(files.values())  # type: ignore[arg-type]  # FileNodes
    putter = env.svc.host.castore.directories.put_multiple_start()
    await putter.put(directory)
    await putter.close()
    return directory.as_node(b"victim-" + os.urandom(4).hex().encode())


def _reading(env: Env, node: object, path: str) -> BuildRequest:
    return env.sh(f"cat /nix/store/{node.name.decode()}/{path} > /nix/store/out",  # type: ignore[attr-defined]  # a node
                  inputs=(node,))


async def test_a_corrupt_blob_in_an_input_is_named(env: Env) -> None:
    from stages.castore.nodes import FileNode

    assert env.svc.host is not None
    store = env.svc.host.castore.blobs.store  # type: ignore[attr-defined]  # the local store
    data = os.urandom(5000)
    digest = store.put_blob(data)
    pack, offset, _ = store.locate(digest)
    with open(store.pack_path(pack), "r+b") as f:
        f.seek(offset + 100)
        f.write(bytes([data[100] ^ 0xFF]))
    node = await _input_dir(env, {b"bad": FileNode(name=b"bad", digest=digest, size=5000)})
    with pytest.raises(BuildFailed) as info:
        await env.svc.do_build(_reading(env, node, "bad"))
    message = str(info.value)
    assert "refused to serve it bad input data" in message
    assert digest.hex() in message and "'bad'" in message and "corrupt" in message


async def test_a_file_node_with_the_wrong_size_is_named(env: Env) -> None:
    from stages.castore.nodes import FileNode

    assert env.svc.host is not None
    store = env.svc.host.castore.blobs.store  # type: ignore[attr-defined]  # the local store
    digest = store.put_blob(os.urandom(3000))
    node = await _input_dir(env, {b"liar": FileNode(name=b"liar", digest=digest, size=99)})
    with pytest.raises(BuildFailed) as info:
        await env.svc.do_build(_reading(env, node, "liar"))
    message = str(info.value)
    assert digest.hex() in message and "has 3000 bytes in the store" in message

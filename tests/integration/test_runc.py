"""Real runc containers from validate + spec + bundle, driven by RuncContainer.

Inputs are bind-mounted from a plain host directory holding a static busybox
and applet symlinks (the FUSE mount is the mount stage's business). Every
test removes its containers, processes and directories, even when it fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from integration_helpers import processes_with

from stages.bundle import write_bundle
from stages.castore.nodes import DirectoryNode
from stages.errors import RuncError, RuncTimeoutError
from stages.oci.idmap import load_idmap
from stages.oci.runc import RuncContainer, cleanup_stale_containers, list_containers
from stages.oci.schema import validate_config
from stages.request import BuildConstraints, BuildRequest, EnvVar
from stages.validate import validate_request

pytestmark = [pytest.mark.runc, pytest.mark.timeout(60)]

APPLETS = ("sh", "env", "id", "hostname", "cat", "ls", "echo", "sleep", "ip", "wget", "touch",
           "pwd", "printf", "stat")
BB = "/nix/store/bb"


@pytest.fixture(scope="module")
def tools():
    """A host directory with busybox and its applets, shared by the module."""
    d = Path(tempfile.mkdtemp(prefix="ocibuild-runc-tools-"))
    try:
        os.chmod(d, 0o755)
        shutil.copy2("/bin/busybox", d / "busybox")
        for a in APPLETS:
            (d / a).symlink_to("busybox")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Sandbox:
    def __init__(self, base: Path, tools: Path) -> None:
        self.base = base
        self.tools = tools
        self.state = base / "state"
        self.n = 0

    def request(self, script: str | None = None, *, args=None, env=None, network=False,
                **kw) -> BuildRequest:
        env = env if env is not None else [("HOME", "/homeless-shelter"),
                                            ("PATH", BB)]
        return BuildRequest(
            inputs=[DirectoryNode(name=b"bb", digest=b"\0" * 32, size=len(APPLETS) + 1)],
            command_args=args if args is not None else [f"{BB}/sh", "-c", script],
            working_dir="build",
            scratch_paths=["build", "nix/store"],
            inputs_dir="nix/store",
            outputs=["nix/store/out"],
            environment_vars=[EnvVar(key=k, value=v.encode()) for k, v in env],
            constraints=BuildConstraints(system="x86_64-linux", network_access=network),
            **kw)

    def bundle(self, req: BuildRequest):
        validate_request(req)
        self.n += 1
        lay = write_bundle(self.base / f"b{self.n}", req, idmap=load_idmap(),
                           input_paths={b"bb": self.tools})
        validate_config(json.loads(lay.config.read_text()))
        return lay

    def container(self, lay) -> RuncContainer:
        return RuncContainer(lay.root, f"t-{uuid.uuid4().hex[:10]}", state_root=self.state)

    async def run(self, req: BuildRequest, **kw) -> tuple[int, list[tuple[str, bytes]], object]:
        lay = self.bundle(req)
        lines: list[tuple[str, bytes]] = []
        async with self.container(lay) as c:
            code = await c.run(on_line=lambda s, line: lines.append((s, line)), log_path=lay.log,
                               check=False, **kw)
        return code, lines, lay


@pytest.fixture
async def sb(tools):
    base = Path(tempfile.mkdtemp(prefix="ocibuild-runc-test-"))
    os.chmod(base, 0o711)
    box = Sandbox(base, tools)
    try:
        yield box
    finally:
        try:
            await cleanup_stale_containers(box.state)
        finally:
            subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def out(lines, stream="stdout") -> bytes:
    return b"".join(line for s, line in lines if s == stream)


async def test_hello(sb) -> None:
    code, lines, lay = await sb.run(sb.request("echo hello; echo oops >&2"))
    assert code == 0
    assert ("stdout", b"hello\n") in lines and ("stderr", b"oops\n") in lines
    assert b"hello\n" in lay.log.read_bytes() and b"oops\n" in lay.log.read_bytes()
    assert await list_containers(sb.state) == []


@pytest.mark.parametrize("status", [1, 3, 42, 255])
async def test_exit_codes(sb, status: int) -> None:
    code, _, _ = await sb.run(sb.request(f"exit {status}"))
    assert code == status


async def test_failure_raises_with_code_and_log_tail(sb) -> None:
    lay = sb.bundle(sb.request("for i in 1 2 3; do echo line$i; done; exit 7"))
    async with sb.container(lay) as c:
        with pytest.raises(RuncError) as info:
            await c.run()
    assert info.value.exit_code == 7
    assert info.value.log_tail.splitlines()[-3:] == ["line1", "line2", "line3"]
    assert "line3" in str(info.value)


async def test_killed_builder_is_128_plus_signal(sb) -> None:
    lay = sb.bundle(sb.request("echo started; sleep 30"))
    async with sb.container(lay) as c:
        async def kill_on_start(stream, line):
            if line == b"started\n":
                subprocess.run(["runc", "--root", str(sb.state), "kill", c.container_id,
                                "KILL"], check=True)
        code = await c.run(on_line=kill_on_start, check=False)
    assert code == 128 + 9


async def test_environment_exactly_as_requested(sb) -> None:
    env = [("A", "x y=z"), ("HOME", "/homeless-shelter"), ("PATH", "/path-not-set"),
           ("U", "ünïcødé"), ("empty", "")]
    code, lines, _ = await sb.run(sb.request(args=[f"{BB}/env"], env=env))
    assert code == 0
    assert out(lines) == b"".join(f"{k}={v}\n".encode() for k, v in env)


async def test_identity_hostname_cwd(sb) -> None:
    code, lines, _ = await sb.run(sb.request("id; hostname; pwd"))
    assert code == 0
    # Nix 2.8's sandbox: uid 1000 (nixbld), gid 100, hostname localhost, cwd /build
    assert out(lines) == b"uid=1000(nixbld) gid=100(nixbld)\nlocalhost\n/build\n"


@pytest.mark.parametrize("network", [False, True], ids=["sandboxed", "network"])
async def test_modes_owners_and_sys_as_nix_28_has_them(sb, network: bool) -> None:
    # Nix 2.8 (build-users-group empty): / 0750, /build 0700, /nix/store
    # 1775, /tmp and /dev/shm 1777, /dev 0755, all 1000:100; no /sys. With
    # network access the host's /sys is bound read-only, /sys/firmware masked
    # (an empty tmpfs).
    code, lines, _ = await sb.run(sb.request(
        "stat -c '%a %u %g %n' / /build /nix/store /tmp /etc /etc/passwd /dev /dev/shm; ls -a /; "
        "if [ -d /sys ]; then ls /sys/firmware | wc -l; "
        "touch /sys/x 2>/dev/null || echo sys-ro; fi", network=network))
    assert code == 0, lines
    text = out(lines).decode()
    assert text.startswith("750 1000 100 /\n700 1000 100 /build\n1775 1000 100 /nix/store\n"
                           "1777 1000 100 /tmp\n755 1000 100 /etc\n644 1000 100 /etc/passwd\n"
                           "755 1000 100 /dev\n1777 1000 100 /dev/shm\n")
    root = text.split("\n")[8:]
    if network:
        assert "sys" in root
        assert text.endswith("\n0\nsys-ro\n")
    else:
        assert ".." in root and "proc" in root and "build" in root
        assert "sys" not in root
        assert text.endswith("tmp\n")


async def test_etc_files_are_the_bundles(sb) -> None:
    req = sb.request("cat /etc/passwd; echo --; cat /etc/group; echo --; cat /etc/hosts")
    code, lines, lay = await sb.run(req)
    assert code == 0
    etc = lay.rootfs / "etc"
    expected = b"--\n".join((etc / f).read_bytes() for f in ("passwd", "group", "hosts"))
    assert out(lines) == expected


async def test_inputs_read_only_scratch_writable(sb) -> None:
    req = sb.request(f"touch {BB}/new 2>&1 && echo WROTE-INPUT; echo made > /nix/store/out; "
                     "touch /build/b /tmp/t && echo scratch-ok; touch /etc/x || echo root-ro")
    code, lines, lay = await sb.run(req)
    assert code == 0
    text = out(lines)
    assert b"Read-only file system" in text and b"WROTE-INPUT" not in text
    assert b"scratch-ok" in text and b"root-ro" in text
    assert not (sb.tools / "new").exists()
    assert lay.host_path(req.scratch_paths, "nix/store/out").read_bytes() == b"made\n"


async def _http_server():
    async def handle(reader, writer):
        await reader.read(1024)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nfrom-host\n")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_no_network_without_network_access(sb) -> None:
    server, port = await _http_server()
    async with server:
        code, lines, _ = await sb.run(sb.request(
            f"ip -o link | while read n name rest; do echo $name; done; "
            f"wget -q -O - http://127.0.0.1:{port}/; echo rc=$?"))
    assert code == 0
    # (busybox wget's -T crashes this static busybox: no -T, a refusal is immediate)
    assert out(lines) == b"lo:\nrc=1\n"
    assert b"Connection refused" in out(lines, "stderr")


async def test_network_access_reaches_host_loopback(sb) -> None:
    server, port = await _http_server()
    async with server:
        code, lines, _ = await sb.run(sb.request(
            f"wget -q -O - http://127.0.0.1:{port}/", network=True))
    assert code == 0, lines
    assert out(lines) == b"from-host\n"


async def test_timeout_kills_everything(sb) -> None:
    marker = str(1_000_000 + uuid.uuid4().int % 1_000_000)
    lay = sb.bundle(sb.request(f"sleep {marker} & sleep {marker} & echo started; wait"))
    async with sb.container(lay) as c:
        with pytest.raises(RuncTimeoutError) as info:
            await c.run(timeout=1.5)
    assert "started" in info.value.log_tail
    assert await list_containers(sb.state) == []
    assert processes_with(f"sleep {marker}") == []


async def test_cancellation_leaves_no_container_or_process(sb) -> None:
    marker = str(2_000_000 + uuid.uuid4().int % 1_000_000)
    lay = sb.bundle(sb.request(f"sleep {marker} & echo started; sleep {marker}"))
    started = asyncio.Event()

    async def build():
        async with sb.container(lay) as c:
            await c.run(on_line=lambda s, line: started.set())

    task = asyncio.create_task(build())
    await asyncio.wait_for(started.wait(), 20)
    # "started" comes out before the shell has forked the second sleep.
    for _ in range(200):
        if len(processes_with(f"sleep {marker}")) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(processes_with(f"sleep {marker}")) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await list_containers(sb.state) == []
    assert processes_with(f"sleep {marker}") == []


async def test_exception_in_callback_cleans_up(sb) -> None:
    marker = str(3_000_000 + uuid.uuid4().int % 1_000_000)
    lay = sb.bundle(sb.request(f"echo started; sleep {marker}"))

    def explode(stream, line):
        raise RuntimeError("subscriber failed")

    async with sb.container(lay) as c:
        with pytest.raises(RuntimeError, match="subscriber failed"):
            await c.run(on_line=explode)
    assert await list_containers(sb.state) == []
    assert processes_with(f"sleep {marker}") == []


async def test_cleanup_stale_containers_after_a_crash(sb) -> None:
    # a "dead service" left a detached container running
    marker = str(4_000_000 + uuid.uuid4().int % 1_000_000)
    lay = sb.bundle(sb.request(f"exec sleep {marker}"))
    subprocess.run(["runc", "--root", str(sb.state), "run", "--detach", "--bundle",
                    str(lay.root), "stale-1"], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20)
    assert [c["id"] for c in await list_containers(sb.state)] == ["stale-1"]
    assert processes_with(f"sleep {marker}")
    assert await cleanup_stale_containers(sb.state) == ["stale-1"]
    assert await list_containers(sb.state) == []
    for _ in range(50):
        if not processes_with(f"sleep {marker}"):
            break
        await asyncio.sleep(0.05)
    assert processes_with(f"sleep {marker}") == []


async def test_long_lines_and_partial_last_line(sb) -> None:
    code, lines, _ = await sb.run(sb.request(
        "i=0; s=x; while [ $i -lt 17 ]; do s=$s$s; i=$((i+1)); done; echo $s; printf tail"))
    assert code == 0
    data = out(lines)
    assert data == b"x" * (2 ** 17) + b"\ntail"
    assert all(len(line) <= 65536 for _, line in lines)
    assert lines[-1] == ("stdout", b"tail")


async def test_broken_bundle_reports_runc_error(sb) -> None:
    lay = sb.bundle(sb.request(args=["/nonexistent/builder"]))
    async with sb.container(lay) as c:
        with pytest.raises(RuncError) as info:
            await c.run()
    assert info.value.exit_code != 0
    assert "nonexistent" in info.value.log_tail
    assert await list_containers(sb.state) == []


async def test_no_capabilities_and_our_own_nofile_limit(sb) -> None:
    import resource

    code, lines, _ = await sb.run(sb.request(
        "while read k v; do case $k in Cap*) echo $k $v;; esac; done < /proc/self/status; "
        "ulimit -n; ulimit -Hn"))
    assert code == 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # runc, in Go, raises its soft one
    assert out(lines) == b"".join(f"{k}: 0000000000000000\n".encode()
                                  for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
                                  ) + f"{soft}\n{hard}\n".encode()


async def test_runc_supplies_home_when_the_request_has_none(sb) -> None:
    # A documented limitation of runc 1.1 (see stages/spec.py): HOME from /etc/passwd.
    code, lines, _ = await sb.run(sb.request(args=[f"{BB}/env"], env=[("A", "1")]))
    assert code == 0
    assert out(lines) == b"A=1\nHOME=/build\n"


async def test_concurrent_builds_share_the_mapping(sb) -> None:
    reqs = [sb.request(f"echo {i} > /nix/store/out; ls /build; touch /build/mine{i}")
            for i in range(3)]
    results = await asyncio.gather(*(sb.run(r) for r in reqs))
    for i, (code, lines, lay) in enumerate(results):
        assert code == 0
        assert out(lines) == b""  # each /build starts empty: no one sees another's files
        assert lay.host_path(reqs[i].scratch_paths, "nix/store/out").read_bytes() == f"{i}\n".encode()
    assert await list_containers(sb.state) == []


async def test_runc_killed_from_outside_is_not_the_builder_failing(sb) -> None:
    import signal

    marker = str(5_000_000 + uuid.uuid4().int % 1_000_000)
    lay = sb.bundle(sb.request(f"echo started; sleep {marker}"))
    started = asyncio.Event()
    async with sb.container(lay) as c:
        task = asyncio.create_task(c.run(on_line=lambda s, line: started.set()))
        await asyncio.wait_for(started.wait(), 20)
        assert c._proc is not None
        os.kill(c._proc.pid, signal.SIGKILL)  # runc itself, not the builder
        with pytest.raises(RuncError) as info:
            await task
    message = str(info.value)
    assert "runc itself was killed by SIGKILL" in message
    assert "the builder failed" not in message and info.value.exit_code is None
    assert await list_containers(sb.state) == []
    assert processes_with(f"sleep {marker}") == []

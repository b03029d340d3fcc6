"""Network access: a namespace of the build's own, never the host's (issue 13).

Real runc containers through the OCI service with ``allow_network``, and
slirp4netns. The host side of each check is real too: a TCP listener on
host loopback, an abstract unix socket of the host, and a "remote host": a
network namespace this test makes, joined to the host by a veth pair,
serving HTTP on its own address. The builder is the host's python3, bound
read-only from /usr (merged /usr: /lib and /lib64 are links into it).
"""

from __future__ import annotations

import http.server
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import pytest_asyncio

from stages.policy import Policy
from stages.request import BuildConstraints, BuildRequest, EnvVar
from stages.service import OciBuildService
from stages.service.oci import RUNTIMES

pytestmark = [pytest.mark.runc, pytest.mark.fuse, pytest.mark.root,
              pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

PYTHON = "/usr/bin/python3"  # Debian's (the Makefile installs it)
RO = ("/lib", "/lib64", "/usr")

PROBE = """
import socket, sys
results = []
for name, family, address in TARGETS:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(address)
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n") if family == socket.AF_INET else None
        got = b""
        while family == socket.AF_INET and (chunk := s.recv(4096)):
            got += chunk
        results.append(f"{name} reached {b'served' in got}")
    except OSError as exc:
        results.append(f"{name} unreachable")
    finally:
        s.close()
try:
    results.append("resolv " + open("/etc/resolv.conf").read().strip().replace(chr(10), ";"))
except OSError:
    results.append("resolv none")
open("/nix/store/out", "w").write(chr(10).join(results) + chr(10))
"""


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"served\n")

    def log_message(self, *args: object) -> None:
        pass


class RemoteHost:
    """A network namespace with a veth to the host and an HTTP server on it."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns = f"ocib-{tag}"
        self.host_if, self.peer_if = f"ocibh{tag}", f"ocibt{tag}"
        octet = 100 + secrets.randbelow(100)
        self.host_ip, self.ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
        self.port = 8000 + secrets.randbelow(1000)
        self.server: subprocess.Popen[bytes] | None = None

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def start(self) -> None:
        self._ip("netns", "add", self.ns)
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if,
                 "netns", self.ns)
        self._ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        for args in (("addr", "add", f"{self.ip}/24", "dev", self.peer_if),
                     ("link", "set", self.peer_if, "up"), ("link", "set", "lo", "up")):
            self._ip("netns", "exec", self.ns, "ip", *args)
        code = ("import http.server, sys\n"
                "class H(http.server.BaseHTTPRequestHandler):\n"
                "    def do_GET(self):\n"
                "        self.send_response(200); self.end_headers(); self.wfile.write(b'served')\n"
                "    def log_message(self, *a): pass\n"
                f"http.server.HTTPServer(('{self.ip}', {self.port}), H).serve_forever()\n")
        self.server = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-c",
                                        code])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.ip, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the remote host's server did not come up")

    def stop(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


class Env:
    def __init__(self, svc: OciBuildService, remote: RemoteHost, loopback_port: int,
                 abstract: bytes) -> None:
        self.svc = svc
        self.remote = remote
        self.loopback_port = loopback_port
        self.abstract = abstract

    def probe(self, *, network: bool) -> BuildRequest:
        targets = (f"import socket\nTARGETS = [('loopback', socket.AF_INET, ('127.0.0.1', {self.loopback_port})),"
                   f" ('slirp-host', socket.AF_INET, ('10.0.2.2', {self.loopback_port})),"
                   f" ('remote', socket.AF_INET, ('{self.remote.ip}', {self.remote.port})),"
                   f" ('abstract', socket.AF_UNIX, {self.abstract!r})]\n")
        return BuildRequest(
            command_args=[PYTHON, "-c", targets + PROBE],
            working_dir="build", scratch_paths=["build", "nix/store"], inputs_dir="nix/store",
            outputs=["nix/store/out"],
            environment_vars=[EnvVar(key="PATH", value=b"/usr/bin")],
            constraints=BuildConstraints(system="x86_64-linux", network_access=network,
                                         available_ro_paths=list(RO)))

    async def results(self, req: BuildRequest) -> dict[str, str]:
        build = await self.svc.do_build(req)
        assert self.svc.host is not None
        out = await self.svc.host.castore.blobs.get(build.outputs[0].digest)
        return dict(line.split(" ", 1) for line in out.decode().splitlines())


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIMES)
async def env(request: pytest.FixtureRequest):
    """Real network namespaces and slirp4netns, under each runtime (runc, bwrap)."""
    base = Path(tempfile.mkdtemp(prefix="ocibuild-network-", dir="/var/tmp"))
    os.chmod(base, 0o711)
    remote = RemoteHost()
    loopback = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0ocibuild-test-{secrets.token_hex(4)}".encode()
    abstract.bind(name)
    abstract.listen()
    import threading

    thread = threading.Thread(target=loopback.serve_forever, daemon=True)
    thread.start()
    store = f"local://{base}/store"
    try:
        remote.start()
        policy = Policy(allow_network=True, allowed_ro_paths=list(RO))
        async with OciBuildService(base / "state", blob_address=store, directory_address=store,
                                   jobs=2, policy=policy, runtime=request.param) as svc:
            yield Env(svc, remote, loopback.server_address[1], name)
    finally:
        loopback.shutdown()
        loopback.server_close()
        abstract.close()
        remote.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_the_host_side_is_really_there(env: Env) -> None:
    # The control: from the host itself every target answers.
    for address in (("127.0.0.1", env.loopback_port), (env.remote.ip, env.remote.port)):
        s = socket.create_connection(address, timeout=3)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        assert b"served" in got, address
        s.close()
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.connect(env.abstract)
    u.close()


async def test_granted_network_reaches_other_hosts_but_not_the_host_itself(env: Env) -> None:
    got = await env.results(env.probe(network=True))
    assert got["remote"] == "reached True"
    assert got["loopback"] == "unreachable"
    assert got["slirp-host"] == "unreachable"
    assert got["abstract"] == "unreachable"
    assert got["resolv"] == "nameserver 10.0.2.3"


async def test_without_network_nothing_is_reachable(env: Env) -> None:
    got = await env.results(env.probe(network=False))
    assert got.pop("resolv") == "none"
    assert set(got.values()) == {"unreachable"}, got


async def test_no_namespace_or_slirp_outlives_the_build(env: Env) -> None:
    await env.results(env.probe(network=True))
    inst = next(env.svc.state_dir.glob("instances/*"))
    assert not list((inst / "netns").glob("*"))
    with open("/proc/self/mountinfo") as f:
        assert str(inst / "netns") not in f.read()
    ps = subprocess.run(["pgrep", "-f", f"slirp4netns.*{inst}"], capture_output=True)
    assert ps.returncode == 1, ps.stdout

"""Builds on a real Ray cluster: two raylets on this machine, each a build node.

The module's cluster (:class:`stages.cluster.local.LocalCluster`): a head
node and a second node, each started by ``ocibuild ray-worker`` (so by
``ray start``) in a session of its own, with its own Ray temp dir, its own
``OCIBUILD_STATE`` and ``ocibuild`` = 2, GCS health checks shortened so
that a killed raylet is noticed in about two seconds; the castore every
node reaches is ``ocibuild serve`` on loopback.

- the Nix corpus built through ``ray://auto`` gives Nix's NAR hashes and
  references, and the same results as a local ``ocibuild nix build``; both
  nodes took builds; Ray Client (``ray://HOST:PORT``) builds too;
- SIGTERM to the client mid-DAG: within 5 s no container, mount or bundle
  of the run remains on either node;
- a node's raylet killed while it builds: the DAG still finishes (its
  builds run again on the other node), and when the node comes back, a
  new client's actor there cleans up what the dead one left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from integration_helpers import processes_with, remove_state_tree
from nix_corpus_helpers import (
    CASES,
    CORPUS,
    OCIBUILD,
    REPO,
    Corpus,
    instantiate,
    recursive_hash,
    sh,
    valid,
)

from stages.cluster.local import LocalCluster, free_port

pytestmark = [pytest.mark.nix, pytest.mark.runc, pytest.mark.fuse, pytest.mark.slow,
              pytest.mark.timeout(600)]


SLEEPERS = r"""
{ nonce, seconds }:
let
  bbd = builtins.path { path = ./bbdir; name = "busybox"; };
  mk = name: script: derivation {
    name = "${name}-${nonce}"; system = builtins.currentSystem; builder = "${bbd}/busybox";
    args = [ "sh" "-c" "B=${bbd}/busybox; ${script}" ];
  };
  sleepers = map (i: mk "sleep${toString i}"
    "$B sleep ${seconds}; echo ${toString i} > $out") [ 1 2 3 4 5 6 ];
in {
  top = mk "top" "$B cat ${builtins.concatStringsSep " " (map toString sleepers)} > $out";
}
"""


class RayCluster(LocalCluster):
    """Two build nodes (``ocibuild ray-worker``) and a shared castore (``ocibuild serve``)."""

    def __init__(self, base: Path) -> None:
        super().__init__(base, nodes=2, jobs=2)
        self.serve: subprocess.Popen[str] | None = None
        self.store = ""

    def start_store(self) -> None:
        port = free_port()
        store = f"local://{self.base}/shared"
        self.serve = subprocess.Popen(
            [*OCIBUILD, "serve", "--listen", f"127.0.0.1:{port}", "--state-dir",
             str(self.base / "serve-state"), "--blob-service-addr", store,
             "--directory-service-addr", store, "--no-prune"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.serve.stdout is not None
        line = self.serve.stdout.readline()
        assert "serving on" in line, line + self.serve.stderr.read() if self.serve.stderr else ""
        self.store = f"grpc+http://127.0.0.1:{port}"

    def client(self, *args: str, state: str = "client-state",
               address: str = "ray://auto") -> list[str]:
        return [*OCIBUILD, "nix", "build", "--build-service-addr", address,
                "--blob-service-addr", self.store, "--directory-service-addr", self.store,
                "--state-dir", str(self.base / state), *args]

    def containers(self, i: int) -> list[Path]:
        """The runc containers of node ``i``'s build services, now."""
        return list(self.state(i).glob("instances/*/runc/*/state.json"))

    def bundles(self, i: int) -> list[Path]:
        """Node ``i``'s bundles: in its state dir, and on the runtime tmpfs."""
        found = list(self.state(i).glob("bundles/*"))
        for runtime in self.state(i).glob("instances/*/runtime/bundles"):
            found += list(runtime.iterdir())
        return found

    def mounts(self) -> list[str]:
        text = Path("/proc/mounts").read_text()
        return [line for line in text.splitlines()
                if str(self.base) in line and "serve-state" not in line]

    def node_runs(self, i: int) -> list[Path]:
        return list(self.state(i).glob("runs/*/journal.jsonl"))

    def stop(self) -> None:
        if self.serve is not None:  # first: it unmounts its own FUSE mount as it ends
            self.serve.terminate()
            try:
                self.serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.serve.kill()
        super().stop()
        for pid in processes_with(str(self.base)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)  # the supervisors kill what the dead services ran
        remove_state_tree(self.base)


@pytest.fixture(scope="module")
def cluster():
    # Short: Ray's unix sockets live under the temp dirs (108-byte limit).
    base = Path(tempfile.mkdtemp(prefix="ocb-ray-", dir="/tmp"))
    base.chmod(0o711)
    c = RayCluster(base)
    try:
        c.start_store()
        c.start()
        yield c
    finally:
        c.stop()


def _instantiate_sleepers(base: Path, seconds: str) -> tuple[str, str]:
    """The sleepers' top .drv and the nonce; busybox beside the expression."""
    (base / "bbdir").mkdir(exist_ok=True)
    shutil.copy2("/bin/busybox", base / "bbdir" / "busybox")
    (base / "s.nix").write_text(SLEEPERS)
    nonce = uuid.uuid4().hex[:10]
    drv = sh("nix-instantiate", "--argstr", "nonce", nonce, "--argstr", "seconds", seconds,
             "-A", "top", str(base / "s.nix")).stdout.split()[0]
    return drv, nonce


def _delete_drv_closure(drv: str) -> None:
    """The .drv and the outputs of a test's DAG, from the Nix store (best effort)."""
    paths = sh("nix-store", "-qR", drv, check=False).stdout.split()
    outputs = [o for p in paths if p.endswith(".drv")
               for o in sh("nix-store", "-q", "--outputs", p, check=False).stdout.split()]
    live = [p for p in outputs if os.path.exists(p) and valid(p)]
    if live:
        sh("nix-store", "--delete", *live, check=False)
    sh("nix-store", "--delete", *[p for p in paths if p.endswith(".drv")], check=False)


def test_corpus_across_nodes_same_as_nix_and_local(cluster: RayCluster) -> None:
    corpus = Corpus(cluster.base / "corpus-base", uuid.uuid4().hex[:10])
    corpus.base.mkdir()
    corpus.base.chmod(0o711)
    try:
        shutil.copytree(CORPUS, corpus.dir, symlinks=True)
        (corpus.dir / "bbdir").mkdir()
        shutil.copy2("/bin/busybox", corpus.dir / "bbdir" / "busybox")
        rhash = recursive_hash(corpus.base, corpus.nonce)
        for case in CASES:
            instantiate(corpus, case, {"nonce": corpus.nonce,
                                        **({"rhash": rhash} if case == "fixed" else {})})
        drvs = sorted(set(corpus.drvs.values()))

        ray = sh(*cluster.client("--json", "--progress", "plain", *drvs), check=False,
                 cwd=REPO, env=cluster.env, timeout=400)
        assert ray.stdout, ray.stderr[-3000:]
        ours = json.loads(ray.stdout)
        local = sh(*OCIBUILD, "nix", "build", "--json", "--jobs", "2", *corpus.store_args(),
                   *drvs, check=False, cwd=REPO)
        theirs = json.loads(local.stdout)
        nix = sh("nix-build", "--no-out-link", "--keep-going", "--max-jobs", "2",
                 *sorted(set(drvs) - corpus.failing), check=False)

        assert set(ours) == set(drvs)
        for drv in drvs:
            assert ours[drv]["status"] == theirs[drv]["status"], (drv, ours[drv], theirs[drv])
            if drv in corpus.failing:
                assert ours[drv]["status"] == "failed", drv
                continue
            assert ours[drv]["status"] == "built", (drv, ours[drv], ray.stderr[-2000:])
            assert ours[drv]["outputs"] == theirs[drv]["outputs"], drv
            for name, out in ours[drv]["outputs"].items():
                assert valid(out["path"]), (drv, name, nix.stderr[-2000:])
                assert out["nar_hash"] == sh("nix-store", "-q", "--hash",
                                             out["path"]).stdout.strip(), (drv, name)
                refs = sh("nix-store", "-q", "--references", out["path"]).stdout.split()
                assert sorted(out["references"]) == sorted(refs), (drv, name)
        assert ray.returncode == 1  # the corpus's failing cases, as locally
        # Both nodes built ("building as NODE:KEY" in the client's progress),
        # keeping no run records of their own; the builder's output reached
        # the client's run.
        nodes = set(re.findall(r"building as ([0-9a-f]{12}):", ray.stderr))
        assert len(nodes) == 2, nodes
        assert not cluster.node_runs(0) and not cluster.node_runs(1)
        logs = list((cluster.base / "client-state").glob("runs/*/logs/*.log"))
        assert any(b"failing on purpose" in p.read_bytes() for p in logs)
        assert "failing on purpose" in ray.stderr
        # `nix log` of a derivation built on the cluster, from the client's run.
        fail_exit = corpus.drvs["failing.fail_exit"]
        log = sh(*OCIBUILD, "nix", "log", "--state-dir", str(cluster.base / "client-state"),
                 fail_exit, cwd=REPO)
        assert "failing on purpose" in log.stdout
    finally:
        for outs in corpus.drvs.values():
            _delete_drv_closure(outs)
        shutil.rmtree(corpus.base, ignore_errors=True)


def test_ray_client_address_builds(cluster: RayCluster) -> None:
    """ray://HOST:PORT goes through Ray Client (no streaming calls there)."""
    base = cluster.base / "client-mode"
    base.mkdir()
    drv, _ = _instantiate_sleepers(base, "0")
    try:
        out = sh(*cluster.client("--json", drv, state="client-mode-state",
                                 address=cluster.client_address),
                 check=False, cwd=REPO, env=cluster.env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout)[drv]
        nix_out = sh("nix-build", "--no-out-link", drv).stdout.strip()
        assert result["outputs"]["out"]["path"] == nix_out
        assert result["outputs"]["out"]["nar_hash"] == sh("nix-store", "-q", "--hash",
                                                          nix_out).stdout.strip()
    finally:
        _delete_drv_closure(drv)


def test_build_request_files_on_the_cluster(cluster: RayCluster) -> None:
    """ocibuild build REQUEST... with ray://auto: the same Build as a local build
    of the same request from a store holding the same inputs."""
    import asyncio

    from stages.castore.addresses import open_castore
    from stages.castore.ingest import ingest_path
    from stages.request import BuildConstraints, BuildRequest, EnvVar, write_request_file

    base = cluster.base / "requests"
    bb_name = "0bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox"
    bb = base / "inputs" / bb_name
    bb.mkdir(parents=True)
    shutil.copy2("/bin/busybox", bb / "busybox")
    (bb / "sh").symlink_to("busybox")
    local_store = f"local://{base}/local-store"

    async def ingest() -> list:
        nodes = []
        for address in (cluster.store, local_store):
            castore = open_castore(address, address)
            try:
                nodes.append(await ingest_path(castore, bb))
            finally:
                await castore.aclose()
        return nodes

    shared_node, local_node = asyncio.run(ingest())
    assert shared_node == local_node
    requests = []
    for i in range(4):  # independent: they spread over both nodes' slots
        req = BuildRequest(
            inputs=[shared_node], working_dir="build", scratch_paths=["build", "nix/store"],
            command_args=[f"/nix/store/{bb_name}/sh", "-c",
                          f"echo build {i} of {cluster.base.name} > /nix/store/out; "
                          f"echo /nix/store/{bb_name} >> /nix/store/out"],
            inputs_dir="nix/store", outputs=["nix/store/out"],
            environment_vars=[EnvVar(key="PATH", value=f"/nix/store/{bb_name}".encode())],
            constraints=BuildConstraints(system="x86_64-linux"), refscan_needles=[bb_name[:32]])
        requests.append(base / f"req{i}.json")
        write_request_file(requests[-1], req)
    env = {k: v for k, v in cluster.env.items()
           if k not in ("BUILD_SERVICE_ADDR", "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR")}
    remote = sh(*OCIBUILD, "build", "--json", "--build-service-addr", "ray://auto",
                "--blob-service-addr", cluster.store, "--directory-service-addr", cluster.store,
                *map(str, requests), check=False, cwd=REPO, env=env, timeout=300)
    assert remote.returncode == 0, remote.stderr[-3000:]
    local = sh(*OCIBUILD, "build", "--json", "--blob-service-addr", local_store,
               "--directory-service-addr", local_store, "--state-dir",
               str(base / "local-state"), *map(str, requests), check=False, cwd=REPO, env=env)
    assert local.returncode == 0, local.stderr[-3000:]
    ours = [json.loads(line) for line in remote.stdout.splitlines()]
    theirs = [json.loads(line) for line in local.stdout.splitlines()]
    assert len(ours) == 4
    assert [b["outputs"] for b in ours] == [b["outputs"] for b in theirs]
    assert all(b["outputsNeedles"] for b in ours)  # each output names busybox
    assert [b["outputsNeedles"] for b in ours] == [b["outputsNeedles"] for b in theirs]
    assert len({json.dumps(b["outputs"]) for b in ours}) == 4  # four different outputs


def test_placement_prefers_the_node_holding_the_inputs_and_caches_them(
        cluster: RayCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: a build whose input another build made goes to that node
    (soft affinity); one whose inputs no node holds goes to the idle one
    (spread); an input a node fetched once is not fetched again."""
    import asyncio

    from stages.castore.addresses import open_castore
    from stages.castore.ingest import ingest_path
    from stages.cluster.service import RayBuildService
    from stages.request import BuildConstraints, BuildRequest, EnvVar
    from stages.service.events import Started

    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    base = cluster.base / "placement"
    bb_name = "0bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox"
    (base / bb_name).mkdir(parents=True)
    shutil.copy2("/bin/busybox", base / bb_name / "busybox")
    (base / bb_name / "sh").symlink_to("busybox")
    (base / bb_name / "marker").write_text(uuid.uuid4().hex)  # new to every node's cache
    shutil.copytree(base / bb_name, base / "other", symlinks=True)
    (base / "other" / "marker").write_text(uuid.uuid4().hex)  # the same tools, another input

    def request(script: str, *inputs) -> BuildRequest:
        return BuildRequest(
            inputs=list(inputs), working_dir="build", scratch_paths=["build", "nix/store"],
            command_args=[f"/nix/store/{bb_name}/sh", "-c", script], inputs_dir="nix/store",
            outputs=["nix/store/out"],
            environment_vars=[EnvVar(key="PATH", value=f"/nix/store/{bb_name}".encode())],
            constraints=BuildConstraints(system="x86_64-linux"))

    async def go() -> tuple[list[str], dict]:
        castore = open_castore(cluster.store, cluster.store)
        bb = await ingest_path(castore, base / bb_name)
        other = (await ingest_path(castore, base / "other")).renamed(bb_name.encode())
        await castore.aclose()
        where: list[str] = []

        async def build(req: BuildRequest):
            seen: list[str] = []
            out = await service.stream_build(
                req, lambda e: seen.append(e.build_id) if isinstance(e, Started) else None)
            where.append(seen[0].split(":")[0])
            return out

        async with RayBuildService("ray://auto", blob_address=cluster.store,
                                   directory_address=cluster.store) as service:
            first = await build(request(f"echo {base.name} > /nix/store/out", bb))
            # Renamed into the next one's inputs, as Nix names an input by its path.
            made = first.outputs[0].renamed(b"1ddddddddddddddddddddddddddddddd-made")
            await build(request(f"cat /nix/store/{made.name.decode()} > /nix/store/out", bb,
                                made))
            await build(request(f"echo fresh {base.name} > /nix/store/out", other))
            await asyncio.gather(*(build(request(f"echo {i} {base.name} > /nix/store/out",
                                                 bb)) for i in range(4)))
            stats = await service.stats()
        return where, stats

    where, stats = asyncio.run(go())
    assert where[1] == where[0], where     # it held the input: affinity
    assert where[2] != where[0], where     # nothing held anywhere: the idle node
    assert len(set(where[3:])) == 2, where  # four at once fill both nodes' slots
    # The first node fetched bb once (for four builds), the other one bb and
    # `other` once each (two builds wanted bb at once there); what a node built
    # itself was never fetched.
    assert sorted(s["fetched"] for s in stats.values()) == [1, 2], stats
    assert sorted(s["built"] for s in stats.values()) == [3, 4], stats


def _wait(what: str, check, timeout: float, describe=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {describe()}")
        time.sleep(0.1)


def test_sigterm_mid_dag_leaves_nothing_on_any_node(cluster: RayCluster) -> None:
    base = cluster.base / "cancel"
    base.mkdir()
    drv, nonce = _instantiate_sleepers(base, "120")
    client = subprocess.Popen(cluster.client("--progress", "plain", drv, state="cancel-state"),
                              cwd=REPO, env=cluster.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        # Both nodes run builders (two each: the sleepers are independent).
        # (A container is listed a moment before its builder runs: wait for both.)
        _wait("builders on both nodes",
              lambda: len(cluster.containers(0)) == 2 and len(cluster.containers(1)) == 2
              and len(processes_with("sleep 120")) >= 4 or client.poll() is not None, 120)
        assert client.poll() is None, client.communicate()
        client.send_signal(signal.SIGTERM)
        sent = time.monotonic()

        def left() -> dict:
            return {"containers": cluster.containers(0) + cluster.containers(1),
                    "bundles": cluster.bundles(0) + cluster.bundles(1),
                    "builders": processes_with("sleep 120"), "mounts": cluster.mounts(),
                    "client": client.poll()}

        _wait("nothing left of the run", lambda: not any(list(left().values())[:-1]), 30,
              lambda: str(left()))
        took = time.monotonic() - sent
        _, err = client.communicate(timeout=60)
        assert client.returncode == 130, err[-3000:]
        assert "cancelled by SIGTERM" in err
        assert took <= 5.0, f"the run's containers, mounts and bundles took {took:.1f} s"
        # The nodes' services closed: no instance of them is left either.
        assert not list(cluster.state(0).glob("instances/*"))
        assert not list(cluster.state(1).glob("instances/*"))
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        _delete_drv_closure(drv)


def test_node_killed_mid_build_dag_still_finishes_and_is_cleaned_on_return(
        cluster: RayCluster) -> None:
    base = cluster.base / "lost"
    base.mkdir()
    drv, nonce = _instantiate_sleepers(base, "4")
    client = subprocess.Popen(cluster.client("--json", "--progress", "plain", drv,
                                             state="lost-state"),
                              cwd=REPO, env=cluster.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait("a builder on node 1", lambda: cluster.containers(1) or client.poll() is not None,
              120)
        assert client.poll() is None, client.communicate()
        cluster.kill_node(1)
        out, err = client.communicate(timeout=300)
        assert client.returncode == 0, err[-4000:]
        assert "was lost mid-build; building again on another node" in err
        result = json.loads(out)[drv]
        nix_out = sh("nix-build", "--no-out-link", drv).stdout.strip()
        assert result["outputs"]["out"]["path"] == nix_out
        assert result["outputs"]["out"]["nar_hash"] == sh("nix-store", "-q", "--hash",
                                                          nix_out).stdout.strip()

        # The dead node's service left its instance (lock free) and builders
        # killed by its janitor.
        _wait("the lost node's builders killed", lambda: not processes_with("sleep 4;"), 30)
        dead = list(cluster.state(1).glob("instances/*"))
        assert dead, "the killed node left nothing to clean up: the test proves nothing"
        # The node comes back (the plain `ray start` line, no ray-worker clean-up);
        # the next client's actor there cleans up after the dead one.
        cluster.start_node(1, plain_ray_start=True)
        again, _ = _instantiate_sleepers(base, "0")
        try:
            second = sh(*cluster.client("--json", again, state="lost-state-2"), check=False,
                        cwd=REPO, env=cluster.env, timeout=300)
            assert second.returncode == 0, second.stderr[-3000:]
        finally:
            _delete_drv_closure(again)
        assert not [p for p in dead if p.exists()], "the dead instance was not cleaned up"
        assert not cluster.bundles(1) and not cluster.mounts()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        _delete_drv_closure(drv)

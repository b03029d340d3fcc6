"""``ocibuild shell RUN``: a shell inside the sandbox of a kept build.

Like ``nix develop``/``nix-shell`` after a failed build, or Bazel's
``--sandbox_debug``: the shell runs with the build's own mounts (its
scratch directories as the build left them, its inputs through a fresh FUSE
mount, its available_ro_paths), environment, working directory, user
(1000:100), hostname and namespaces. Only the command differs: an
interactive shell (the static busybox at /bin/sh, added when the build did
not ask for one), or the command given.

The kept bundle is not modified but for the /bin/sh mount point; the shell
gets a sibling bundle (``<bundle>.shell``) holding only its config.json,
whose root is the kept bundle's rootfs. Everything the shell set up is
removed when it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from stages.castore.nodes import SymlinkNode
from stages.errors import ServiceError
from stages.oci.layout import rmtree
from stages.oci.network import SlirpNetwork
from stages.request import BuildRequest

__all__ = ["kept_limits", "open_shell", "shell_config"]


def shell_config(config: dict, *, command: list[str] | None, terminal: bool,
                 busybox: str) -> dict:
    """The build's config.json turned into the shell's: same sandbox, other process."""
    config = json.loads(json.dumps(config))
    process = config["process"]
    process["args"] = command or ["/bin/sh"]
    process["terminal"] = terminal
    if terminal:
        process["env"] = [*process["env"], "PS1=[ocibuild-shell \\w]$ "]
    if not any(m["destination"] == "/bin/sh" for m in config["mounts"]):
        config["mounts"].append({"destination": "/bin/sh", "type": "bind", "source": busybox,
                                 "options": ["bind", "ro", "nosuid", "nodev"]})
    return config


def kept_limits(config: dict, req: BuildRequest) -> dict[str, Any]:
    """The SpecOptions of a kept build's config.json that the operator's
    policy decided (host paths, limits): the shell gets what the build got."""
    from stages.spec import MAX_MEMORY_ANNOTATION, MAX_PIDS_ANNOTATION

    ro = set(req.available_ro_paths)
    annotations = config.get("annotations", {})
    tmp = next((o for m in config["mounts"] if m["destination"] == "/tmp"
                for o in m.get("options", []) if o.startswith("size=")), None)

    def limit(name: str) -> int | None:
        return int(annotations[name]) if name in annotations else None

    return {
        "ro_sources": {m["destination"]: m["source"] for m in config["mounts"]
                       if m["destination"] in ro},
        "max_pids": limit(MAX_PIDS_ANNOTATION),
        "max_memory": limit(MAX_MEMORY_ANNOTATION),
        "tmp_size": int(tmp.removeprefix("size=")) if tmp else None,
        "seccomp": "seccomp" in config.get("linux", {}),
    }


def open_shell(run_dir: Path, args: argparse.Namespace, *, command: list[str] | None) -> int:
    from stages.service import load_build_specs

    specs = load_build_specs(run_dir)
    key = getattr(args, "build", None)
    spec = next((s for s in specs if s.key == key), None) if key else specs[-1]
    if spec is None:
        raise ServiceError(str(run_dir), f"no build {key!r} in this run; builds: "
                                         f"{', '.join(s.key for s in specs)}")
    return asyncio.run(_shell(run_dir, args, spec, command))


async def _shell(run_dir: Path, args: argparse.Namespace, spec, command) -> int:
    from stages.cli.common import runtime, service
    from stages.oci.cgroups import BuildCgroup
    from stages.run import sandbox
    from stages.service.runs import run_runtime
    from stages.spec import SpecOptions, make_spec

    async with service(args, jobs=1, runtime=runtime(args, run_runtime(run_dir))) as svc:
        host = svc.host
        assert host is not None
        bundle = host.bundle_dir(spec)
        layout = host.layout(spec)
        if not layout.config.exists():
            raise ServiceError(str(bundle), f"the bundle of run {run_dir.name} was not kept; "
                                            f"build again with --keep-failed, --keep or "
                                            f"--stop-after bundle")
        from stages.teardown import KEPT_MARKER

        if (bundle / KEPT_MARKER).exists():
            # The run is in use: a prune spares it while this instance lives
            # (stages.service.prune), and recovery spares a kept bundle.
            svc.record_keys([spec.key])
        req = spec.request
        await host.mounts.ensure_running()
        shell_bundle = Path(f"{bundle}.shell")
        container_id = f"ocibuild-{spec.key}.shell"
        network: dict[str, Any] = {}
        netns = Path()
        if req.network_access and host.netns_dir is not None:
            netns = host.netns_dir / f"{spec.key}.shell"
            network = {"network_namespace": str(netns), "network_files": host.network_files()}
        try:
            opts = SpecOptions(
                idmap=host.idmap, rootfs=layout.rootfs,
                scratch_dirs=layout.scratch_dirs(req.scratch_paths),
                input_paths={n.name: host.mounts.content_path(n) for n in req.inputs
                             if not isinstance(n, SymlinkNode)},
                busybox=host.busybox, **kept_limits(json.loads(layout.config.read_text()), req),
                **network)
            terminal = sys.stdin.isatty()
            config = shell_config(make_spec(req, opts), command=command, terminal=terminal,
                                  busybox=str(host.busybox))
            sh = layout.rootfs / "bin" / "sh"
            if not sh.exists():
                sh.parent.mkdir(parents=True, exist_ok=True)
                sh.touch()
            rmtree(shell_bundle, ignore_errors=True)
            shell_bundle.mkdir()
            (shell_bundle / "config.json").write_text(json.dumps(config, indent=2))
            # The shell owns the terminal: runc runs on this process's stdio.
            async with contextlib.AsyncExitStack() as stack:
                if network:  # the build's kind of network: a namespace of its own
                    await stack.enter_async_context(SlirpNetwork(netns))
                cgroup = None
                if host.runtime == "bwrap" and host.cgroup_root is not None:
                    # runc applies the kept limits itself; bwrap needs a cgroup.
                    cgroup = BuildCgroup(f"{host.cgroup_root}/{spec.key}.shell")
                    limits = kept_limits(json.loads(layout.config.read_text()), req)
                    cgroup.create(max_memory=limits["max_memory"], max_pids=limits["max_pids"],
                                  leaf=True)
                    stack.callback(cgroup.remove)
                container = await stack.enter_async_context(
                    sandbox(spec, host, cgroup, bundle_dir=shell_bundle, name=container_id))
                return await container.run_attached()
        finally:
            rmtree(shell_bundle, ignore_errors=True)

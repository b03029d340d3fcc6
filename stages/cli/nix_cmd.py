"""``ocibuild nix build`` and ``ocibuild nix export``: Nix derivations on ocibuild.

``ocibuild nix build [--json] [--jobs N] DRV...`` builds .drv files (from
``nix-instantiate``) and their input derivations as one graph
(:mod:`stages.nix.build`), registering the outputs in the path-info database
of the store (:mod:`stages.nix.pathinfo`). With ``--json`` it prints one JSON
object, keyed by each DRV as given::

    {"/nix/store/...-x.drv": {"status": "built",
                              "outputs": {"out": {"path": "/nix/store/...-x",
                                                  "nar_hash": "sha256:...",
                                                  "references": ["/nix/store/..."]}}},
     "/nix/store/...-y.drv": {"status": "failed", "error": "..."}}

The exit status is 0 only if every DRV was built (or already was).

``ocibuild nix export STORE_PATH DIR`` writes a registered path's tree to
``DIR/<basename of STORE_PATH>``; it never overwrites.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from stages.cli import UserError
from stages.cli.common import (
    policy,
    policy_options,
    progress_option,
    run_cancellable,
    runtime,
    service,
    store_options,
    subscribers,
)

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("nix", help="build Nix derivations (.drv) with ocibuild",
                                  description="Build Nix derivations in OCI containers, with "
                                              "the same outputs as Nix.")
    sub = group.add_subparsers(dest="nix_command", metavar="SUBCOMMAND", required=True)

    build = sub.add_parser("build", help="build .drv files and their input derivations",
                           description="Build .drv files (and what they need) as one graph; "
                                       "report each output's NAR hash and references.")
    build.add_argument("drvs", nargs="+", metavar="DRV", help="a .drv store path")
    build.add_argument("--json", action="store_true",
                       help="print one JSON object with each DRV's status and outputs")
    build.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                       help="containers running at once (default 1; on Ray: the "
                            "cluster's slots)")
    build.add_argument("--keep-failed", action="store_true",
                       help="keep the sandbox of a derivation whose build fails, to enter "
                            "with 'ocibuild shell'")
    build.add_argument("--build-service-addr", metavar="ADDR",
                       help="bwrap:///abs/state/dir: build here with bubblewrap (oci:///... "
                            "with runc, the default); ray://auto or ray://HOST:PORT: on a Ray "
                            "cluster, with --blob-service-addr/--directory-service-addr every "
                            "node reaches (default: $BUILD_SERVICE_ADDR)")
    progress_option(build)
    store_options(build)
    policy_options(build, network=False)
    build.set_defaults(handler=_run_build)

    log = sub.add_parser("log", help="print the builder log of a derivation's last build",
                         description="Print what the builder wrote in the most recent build "
                                     "of DRV under the state directory (as 'nix log' does).")
    log.add_argument("drv", metavar="DRV", help="a .drv store path")
    log.add_argument("--state-dir", type=Path, metavar="DIR")
    log.set_defaults(handler=_run_log)

    export = sub.add_parser("export", help="write a registered store path out as files",
                            description="Write the tree of a built (registered) store path "
                                        "to DIR/<basename>; never overwrites.")
    export.add_argument("store_path", metavar="STORE_PATH")
    export.add_argument("dir", type=Path, metavar="DIR", help="an existing directory")
    store_options(export)
    export.set_defaults(handler=_run_export)


def _run_log(args: argparse.Namespace) -> int:
    from stages.cli.common import state_dir
    from stages.nix.build import last_log
    from stages.nix.errors import NixError

    try:
        path = last_log(state_dir(args), args.drv)
    except NixError as exc:
        raise UserError(str(exc)) from None
    if path is None:
        raise UserError(f"no build log of {args.drv} in {state_dir(args) / 'runs'} (was it "
                        f"built by 'ocibuild nix build' with this state directory?)")
    import shutil

    with open(path, "rb") as f:
        shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
    sys.stdout.buffer.flush()
    return 0


def _pathinfo(args: argparse.Namespace):
    from stages.nix.pathinfo import open_pathinfo

    return open_pathinfo(args.blob_service_addr)


def _run_build(args: argparse.Namespace) -> int:
    from stages.nix.errors import NixError

    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, not {args.jobs}")
    try:
        return run_cancellable(lambda: _build(args))
    except NixError as exc:
        raise UserError(str(exc)) from exc


def _nix_policy(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The service's policy for Nix builds, and the sandbox paths every build gets.

    As in Nix: fixed-output derivations (only they ask) get network access,
    and nix.conf's sandbox paths are bound into every build (each source an
    allowed read-only path, mapped at its target; optional ones whose source
    is missing are left out, as Nix leaves them out). A /bin/sh among them
    becomes the sandbox's own /bin/sh (a static busybox, provideBinSh).
    """
    import attrs

    from stages.nix.config import nix_conf_path, sandbox_paths

    base = policy(args, allow_network=True)
    aliases: dict[str, str] = {}
    for entry in sandbox_paths():
        if not os.path.exists(entry.source):
            if entry.optional:
                continue
            raise UserError(f"{nix_conf_path()}: sandbox path {entry.target}={entry.source}: "
                            f"{entry.source} does not exist (add '?' to make it optional)")
        aliases[entry.target] = entry.source
    return attrs.evolve(base, ro_aliases=aliases), sorted(aliases)


async def _build(args: argparse.Namespace) -> int:
    from stages.cli.remote_build import remote_address

    nix_policy, sandbox = _nix_policy(args)
    address = remote_address(args)
    if address is not None and (args.build_service_addr or address.startswith("ray:")):
        # (A gRPC BUILD_SERVICE_ADDR is for 'ocibuild build'; Nix builds stay here.)
        return await _build_remote(args, address, nix_policy, sandbox)
    # The service first: its FUSE mount server boots (~0.3 s) in another
    # process while this one imports the Nix side and reads the derivations.
    jobs = args.jobs if args.jobs is not None else 1
    async with service(args, jobs=jobs, policy=nix_policy) as svc:
        from stages.nix.build import build_derivations

        with _pathinfo(args) as pathinfo:
            results = await build_derivations(args.drvs, service=svc, pathinfo=pathinfo,
                                              jobs=jobs, subscribers=subscribers(args),
                                              sandbox_paths=sandbox,
                                              keep_failed=args.keep_failed)
    return _print_results(args, results)


async def _build_remote(args: argparse.Namespace, address: str, nix_policy: Any,
                        sandbox: list[str]) -> int:
    """``nix build`` on a remote build service: one call per derivation; the
    run's record and logs stay here, in the state directory."""
    from stages.castore.addresses import open_castore
    from stages.cli.common import ray_service
    from stages.nix.build import build_derivations
    from stages.service import default_state_dir

    if not address.startswith("ray:"):
        raise UserError(f"--build-service-addr {address}: 'nix build' builds remotely on a "
                        f"Ray cluster (ray://...); a gRPC server builds 'ocibuild build' "
                        f"requests")
    if args.keep_failed:
        raise UserError(f"--keep-failed keeps a sandbox on this machine; not with a remote "
                        f"build service ({address})")
    runs_dir = (args.state_dir or default_state_dir()) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    svc = ray_service(args, address, nix_policy)
    castore = open_castore(svc.blob_address, svc.directory_address)
    try:
        # What Ray's driver prints (a node lost...) is not our output: stderr.
        with contextlib.redirect_stdout(sys.stderr):
            async with svc:
                # Unless asked, as many builds at once as the nodes run containers.
                jobs = args.jobs if args.jobs is not None else svc.slots
                with _pathinfo(args) as pathinfo:
                    results = await build_derivations(
                        args.drvs, service=svc, pathinfo=pathinfo, jobs=jobs,
                        subscribers=subscribers(args), sandbox_paths=sandbox,
                        castore=castore, runs_dir=runs_dir)
    finally:
        await castore.aclose()
    return _print_results(args, results)


def resume_nix(args: argparse.Namespace, run_dir: Path) -> int:
    """``ocibuild resume RUN`` of an ``ocibuild nix build`` run."""
    from stages.nix.errors import NixError

    jobs = args.jobs if args.jobs is not None else 1
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, not {jobs}")

    async def main() -> int:
        from pipeline import RunStatus
        from stages.nix.build import plan_runtime, resume_derivations

        nix_policy, _sandbox = _nix_policy(args)
        async with service(args, jobs=jobs, policy=nix_policy,
                           runtime=runtime(args, plan_runtime(run_dir))) as svc:
            with _pathinfo(args) as pathinfo:
                results, run = await resume_derivations(
                    run_dir, service=svc, pathinfo=pathinfo, jobs=jobs,
                    from_stage=args.from_stage, stop_after=args.stop_after,
                    subscribers=subscribers(args))
        if run.status is RunStatus.STOPPED:
            print(f"ocibuild: run {run_dir.name} stopped as asked; continue with: "
                  f"ocibuild resume {run_dir.name}", file=sys.stderr)
            return 0
        return _print_results(args, results)

    try:
        return run_cancellable(main)
    except NixError as exc:
        raise UserError(str(exc)) from exc


def _print_results(args: argparse.Namespace, results: dict[str, Any]) -> int:
    kept = sorted({k for r in results.values() for k in r.kept})
    for drv, run_id, key in kept:
        print(f"ocibuild: kept the sandbox of failed {drv} (run {run_id}); enter it with: "
              f"ocibuild shell --build {key} {run_id}", file=sys.stderr)
    if args.json:
        print(json.dumps({d: r.to_json() for d, r in results.items()}, indent=2))
    else:
        for drv, r in results.items():
            if r.ok:
                print(f"{'cached' if r.cached else 'built'} {drv}")
                for name, out in r.outputs.items():
                    print(f"  {name}: {out.path}")
                    print(f"    nar hash:   {out.nar_hash}")
                    refs = ", ".join(out.references) or "(none)"
                    print(f"    references: {refs}")
            else:
                print(f"failed {drv}: {r.error}", file=sys.stderr)
    return 0 if all(r.ok for r in results.values()) else 1


def _run_export(args: argparse.Namespace) -> int:
    import asyncio

    from stages.castore.addresses import open_castore
    from stages.nix.errors import NixError
    from stages.nix.export import export_path

    async def main() -> Path:
        castore = open_castore(args.blob_service_addr, args.directory_service_addr)
        try:
            with _pathinfo(args) as pathinfo:
                return await export_path(castore, pathinfo, args.store_path, args.dir)
        finally:
            await castore.aclose()

    try:
        print(asyncio.run(main()))
    except NixError as exc:
        raise UserError(str(exc)) from exc
    return 0

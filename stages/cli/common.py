"""What the build commands share: store and state options, the service, signals.

``ocibuild build``, ``resume``, ``shell``, ``nix build`` and remote builds
all open the OCI service the same way (:func:`service`, from
:func:`store_options`), and all run under :func:`run_cancellable`, where
SIGINT or SIGTERM cancel the run once, cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

__all__ = ["check_timeout", "policy", "policy_options", "ray_service", "run_cancellable",
           "runtime", "service",
           "state_dir", "store_options", "subscribers"]


def store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blob-service-addr", metavar="ADDR",
                   help="blob store address (default: $BLOB_SERVICE_ADDR or the embedded store)")
    p.add_argument("--directory-service-addr", metavar="ADDR",
                   help="directory store address (default: $DIRECTORY_SERVICE_ADDR or the "
                        "embedded store)")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="where runs and bundles live (default: $OCIBUILD_STATE or "
                        "$XDG_STATE_HOME/ocibuild)")


def policy_options(p: argparse.ArgumentParser, *, network: bool = True) -> None:
    """The operator's options: what builds may have (stages.policy)."""
    from stages.policy import DEFAULT_MAX_MEMORY, DEFAULT_MAX_PIDS, DEFAULT_TMP_SIZE

    p.add_argument("--allow-ro-path", action="append", default=[], metavar="PATH",
                   help="let requests bind host paths under PATH read-only "
                        "(constraints.available_ro_paths); repeatable; default: none")
    if network:
        p.add_argument("--allow-network", action="store_true",
                       help="let requests ask for network access (default: refused)")
    p.add_argument("--max-pids", type=int, default=DEFAULT_MAX_PIDS, metavar="N",
                   help=f"processes per build (default {DEFAULT_MAX_PIDS})")
    p.add_argument("--max-memory", default=str(DEFAULT_MAX_MEMORY >> 30) + "G", metavar="SIZE",
                   help=f"memory per build, /tmp included (default "
                        f"{DEFAULT_MAX_MEMORY >> 30}G)")
    p.add_argument("--tmp-size", default=str(DEFAULT_TMP_SIZE >> 20) + "M", metavar="SIZE",
                   help=f"size of a build's /tmp (default {DEFAULT_TMP_SIZE >> 20}M)")


def policy(args: argparse.Namespace, *, allow_network: bool | None = None) -> Any:
    """The Policy of :func:`policy_options`' options (UserError when one is bad)."""
    from stages.cli import UserError
    from stages.policy import Policy, parse_size

    try:
        return Policy(allowed_ro_paths=args.allow_ro_path,
                      allow_network=(getattr(args, "allow_network", False)
                                     if allow_network is None else allow_network),
                      max_pids=args.max_pids, max_memory=parse_size(args.max_memory),
                      tmp_size=parse_size(args.tmp_size))
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def check_timeout(timeout: float | None) -> None:
    """--timeout must be a positive number of seconds."""
    from stages.cli import UserError

    if timeout is not None and not timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, not {timeout}")


def _local_address(args: argparse.Namespace) -> tuple[str, Path | None]:
    """The runtime and state directory of a local service address
    (``--build-service-addr``, else ``BUILD_SERVICE_ADDR``): ``oci:///dir``
    (runc), ``bwrap:///dir`` (bubblewrap); ("runc", None) without one.
    Any other address is refused here, clearly: the CLI drives the local
    service itself (runs, bundles, shells)."""
    import os

    from stages.service import OciBuildService, open_build_service

    address = getattr(args, "build_service_addr", None) or os.environ.get("BUILD_SERVICE_ADDR")
    if not address:
        return "runc", None
    svc = open_build_service(address)
    if not isinstance(svc, OciBuildService):
        from stages.errors import ServiceError

        what = ("is remote: only 'ocibuild build' and 'nix build' use it; runs, resume and "
                "shell need " if address.startswith(("grpc+", "ray:"))
                else "refuses every build; the ocibuild CLI needs ")
        raise ServiceError(address, what + "an oci:///abs/state/dir or bwrap:///abs/state/dir "
                                           "service (BUILD_SERVICE_ADDR) or --state-dir")
    return svc.runtime, svc.state_dir


def state_dir(args: argparse.Namespace) -> Path:
    """--state-dir, else the path of a local BUILD_SERVICE_ADDR, else the default."""
    from stages.service import default_state_dir

    if getattr(args, "state_dir", None) is not None:
        return args.state_dir
    return _local_address(args)[1] or default_state_dir()


def runtime(args: argparse.Namespace, recorded: str | None = None) -> str:
    """What runs the builds: the runtime of a local service address, else
    ``recorded`` (a run's own), else runc."""
    import os

    given = getattr(args, "build_service_addr", None) or os.environ.get("BUILD_SERVICE_ADDR")
    if given:
        return _local_address(args)[0]
    return recorded or "runc"


def service(args: argparse.Namespace, **kw: Any) -> Any:
    """The local service of the command's options (and its policy, if it has those)."""
    from stages.service import OciBuildService

    if "policy" not in kw and hasattr(args, "max_pids"):
        kw["policy"] = policy(args)
    kw.setdefault("runtime", runtime(args))
    return OciBuildService(state_dir(args), blob_address=args.blob_service_addr,
                           directory_address=args.directory_service_addr, **kw)


def ray_service(args: argparse.Namespace, address: str, policy: Any) -> Any:
    """The Ray build service of a ``ray://`` address, with the command's store
    options (which every node must reach) and the operator's policy."""
    import os

    from stages.cli import UserError
    from stages.cluster.service import RayBuildService
    from stages.errors import ServiceError

    try:
        return RayBuildService(
            address,
            blob_address=args.blob_service_addr or os.environ.get("BLOB_SERVICE_ADDR"),
            directory_address=(args.directory_service_addr
                               or os.environ.get("DIRECTORY_SERVICE_ADDR")),
            policy=policy, timeout=getattr(args, "timeout", None))
    except ServiceError as exc:
        raise UserError(str(exc)) from None


def run_cancellable(main: Callable[[], Awaitable[int]]) -> int:
    """asyncio.run(main()) where SIGINT/SIGTERM cancel it once, cleanly."""

    async def wrapper() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        seen: list[str] = []

        def on_signal(name: str) -> None:
            seen.append(name)
            if len(seen) == 1:
                print(f"ocibuild: {name}: cancelling; cleaning up", file=sys.stderr, flush=True)
                task.cancel()
            else:
                print(f"ocibuild: {name} again; still cleaning up", file=sys.stderr, flush=True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        try:
            return await main()
        except asyncio.CancelledError:
            if not seen:
                raise
            print(f"ocibuild: cancelled by {seen[0]}", file=sys.stderr)
            return 130
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    return asyncio.run(wrapper())


PROGRESS_MODES = ("auto", "tty", "plain", "json")


def progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                        help="how to show stages and builder output on stderr: tty (a live "
                             "display), plain (a line each), json (an object per event per "
                             "line); auto: tty on a terminal, else plain (nothing with --json)")


def build_fields(stage: str, run: str) -> dict[str, Any]:
    """A build graph's stage name as the build key and the bare stage
    (a run of one build names its stages bare; its key is the run id)."""
    key, sep, bare = stage.rpartition("/")
    return {"build": key if sep else run, "stage": bare}


def subscribers(args: argparse.Namespace) -> list[Any]:
    """The progress display ``--progress`` asks for (see :func:`progress_option`)."""
    mode = getattr(args, "progress", "auto")
    if mode == "auto":
        if sys.stderr.isatty():
            mode = "tty"
        elif getattr(args, "json", False):
            return []
        else:
            mode = "plain"
    from pipeline import JsonProgress, PlainProgress, RichProgress

    if mode == "tty":
        return [RichProgress()]
    if mode == "plain":
        return [PlainProgress()]
    return [JsonProgress(fields=build_fields)]

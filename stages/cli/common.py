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

__all__ = ["run_cancellable", "service", "state_dir", "store_options", "subscribers"]


def store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blob-service-addr", metavar="ADDR",
                   help="blob store address (default: $BLOB_SERVICE_ADDR or the embedded store)")
    p.add_argument("--directory-service-addr", metavar="ADDR",
                   help="directory store address (default: $DIRECTORY_SERVICE_ADDR or the "
                        "embedded store)")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="where runs and bundles live (default: $OCIBUILD_STATE or "
                        "$XDG_STATE_HOME/ocibuild)")


def state_dir(args: argparse.Namespace) -> Path:
    """--state-dir, else the path of an oci:// BUILD_SERVICE_ADDR, else the default.

    The CLI drives the OCI service itself (runs, bundles, shells), so any
    other BUILD_SERVICE_ADDR (dummy://) is refused here, clearly.
    """
    import os

    from stages.service import OciBuildService, default_state_dir, open_build_service

    if getattr(args, "state_dir", None) is not None:
        return args.state_dir
    address = os.environ.get("BUILD_SERVICE_ADDR")
    if not address:
        return default_state_dir()
    svc = open_build_service(address)
    if not isinstance(svc, OciBuildService):
        from stages.errors import ServiceError

        what = ("is remote: only 'ocibuild build' uses it; runs, resume and shell need "
                if address.startswith("grpc+") else "refuses every build; the ocibuild CLI needs ")
        raise ServiceError(address, what + "an oci:///abs/state/dir service "
                                           "(BUILD_SERVICE_ADDR) or --state-dir")
    return svc.state_dir


def service(args: argparse.Namespace, **kw: Any):
    from stages.service import OciBuildService

    return OciBuildService(state_dir(args), blob_address=args.blob_service_addr,
                           directory_address=args.directory_service_addr, **kw)


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


def subscribers(args: argparse.Namespace) -> list[Any]:
    if getattr(args, "json", False) or not sys.stderr.isatty():
        return []
    from pipeline import RichProgress

    return [RichProgress()]

"""``ocibuild build`` against a remote build service (``grpc+...`` address).

Chosen by ``--build-service-addr`` or a ``grpc+unix://``, ``grpc+http://`` or
``grpc+https://`` ``BUILD_SERVICE_ADDR``. The requests' inputs are nodes of
the client's store (``--blob-service-addr``/``--directory-service-addr``, or
the embedded store); what the server lacks is uploaded to the castore served
at the same address, the build runs there (DoBuildStream when a progress
display is on, its events shown as they come; DoBuild otherwise), and the
outputs are fetched back into the client's store (unless
``--no-fetch-outputs``). Output, ``--json``, ``--progress`` and exit status
are those of a local build.

Refused for remote builds, with one line: ``--stop-after``, ``--keep``,
``--keep-failed`` (the bundles live on the server). ``--timeout`` becomes
the DoBuild deadline (the server cancels a build whose deadline passed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from stages.cli import UserError

__all__ = ["remote_address", "run_remote"]

REMOTE_SCHEMES = ("grpc+unix:", "grpc+http:", "grpc+https:", "ray:")
LOCAL_SCHEMES = ("oci:", "bwrap:")


def remote_address(args: argparse.Namespace) -> str | None:
    """The remote build service's address, or None for a local build."""
    address = getattr(args, "build_service_addr", None)
    if address:
        if address.startswith(LOCAL_SCHEMES):
            return None  # this machine's service (stages.cli.common.service)
        if not address.startswith(REMOTE_SCHEMES):
            raise UserError(f"--build-service-addr {address!r}: expected oci:///abs/state/dir, "
                            f"bwrap:///abs/state/dir, grpc+unix:///abs/path, "
                            f"grpc+http://host:port, grpc+https://host:port, ray://auto or "
                            f"ray://HOST:PORT")
        return address
    env = os.environ.get("BUILD_SERVICE_ADDR", "")
    return env if env.startswith(REMOTE_SCHEMES) else None


def run_remote(args: argparse.Namespace, address: str, requests: list[Any],
               sources: list[str]) -> int:
    from stages.castore.addresses import open_castore
    from stages.cli.common import policy, ray_service, run_cancellable, subscribers
    from stages.grpc.build_service import GrpcBuildService
    from stages.grpc.remote import remote_builds

    for flag, value in (("--stop-after", args.stop_after), ("--keep", args.keep),
                        ("--keep-failed", args.keep_failed)):
        if value:
            raise UserError(f"{flag} is not supported for a remote build ({address}); the "
                            f"bundles live on the server")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, not {args.jobs}")
    if args.timeout is not None and args.timeout <= 0:
        raise UserError(f"--timeout must be positive, not {args.timeout}")

    displays = subscribers(args)
    on_event = _event_printer(displays, sources) if displays else None

    async def main() -> int:
        local = open_castore(args.blob_service_addr, args.directory_service_addr)
        service: Any = None
        remote_castore = local
        quiet = contextlib.ExitStack()
        try:
            if address.startswith("ray:"):
                # The nodes build from the store given here: nothing to copy.
                # What Ray's driver prints (a node lost...) is not our output.
                quiet.enter_context(contextlib.redirect_stdout(sys.stderr))
                service = ray_service(args, address, policy(args))
                await service.start()
            else:
                remote_castore = open_castore(address, address)
                service = GrpcBuildService(address, deadline=args.timeout)
                await service.wait_ready()
            results = await remote_builds(requests, local=local, remote_build_service=service,
                                          remote_castore=remote_castore,
                                          fetch_outputs=not args.no_fetch_outputs,
                                          jobs=args.jobs, on_event=on_event)
        finally:
            for display in displays:
                if hasattr(display, "close"):
                    display.close()
            if service is not None:
                await service.aclose()
            if remote_castore is not local:
                await remote_castore.aclose()
            await local.aclose()
            quiet.close()
        return _report(results, requests, sources, address, as_json=args.json)

    return run_cancellable(main)


def _event_printer(displays: list[Any], sources: list[str]) -> Any:
    """Streamed builds' events, as the pipeline events of a local run, to the displays.

    Each build's stages are named by the server's build id (its run id) once
    it is known, by the request's file until then.
    """
    from stages.service.events import Started, to_pipeline_event

    keys = list(sources)

    def on_event(i: int, event: Any) -> None:
        if isinstance(event, Started):
            keys[i] = event.build_id
        converted = to_pipeline_event(event, keys[i])
        for display in displays:
            display(converted)

    return on_event


def _report(results: list[Any], requests: list[Any], sources: list[str], address: str, *,
            as_json: bool) -> int:
    from stages.castore.errors import CastoreError
    from stages.castore.nodes import DirectoryNode, FileNode
    from stages.errors import BuildError
    from stages.request import build_to_json

    failed = 0
    for result, req, source in zip(results, requests, sources):
        if isinstance(result, (BuildError, CastoreError)):
            failed += 1
            print(f"ocibuild: error: {source}: {result}", file=sys.stderr)
            continue
        if isinstance(result, BaseException):
            raise result
        if as_json:
            print(build_to_json(result), flush=True)
            continue
        print(f"{source}: built (on {address})")
        for out, node, needles in zip(req.outputs, result.outputs, result.outputs_needles):
            what = ("directory" if isinstance(node, DirectoryNode)
                    else "file" if isinstance(node, FileNode) else "symlink")
            digest = getattr(node, "digest", b"").hex() or repr(getattr(node, "target", b""))
            print(f"  {out}: {what} {digest} needles {list(needles.needles)}")
    return 1 if failed else 0

"""``ocibuild serve``: castore and the build service over gRPC.

::

    ocibuild serve --listen ADDR [--listen ADDR ...] [--jobs N] [--state-dir DIR]
                   [--blob-service-addr URL] [--directory-service-addr URL]
                   [--prune-keep N] [--prune-older-than DURATION | --no-prune]

ADDR is ``unix:///abs/path`` or ``host:port``. Clients reach it as
``grpc+unix:///abs/path`` or ``grpc+http://host:port`` (BLOB_SERVICE_ADDR,
DIRECTORY_SERVICE_ADDR, BUILD_SERVICE_ADDR). One line on stdout says when it
is ready; SIGTERM or SIGINT shut it down cleanly (exit 0). Run records are
pruned at start and hourly (:mod:`stages.service.prune`). See
:mod:`stages.grpc.serve`.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from stages.cli import UserError
from stages.cli.common import check_timeout, policy, policy_options
from stages.policy import DEFAULT_SERVE_TIMEOUT as DEFAULT_TIMEOUT
from stages.service.prune import SERVE_KEEP, SERVE_OLDER_THAN, PruneSettings, format_duration

__all__ = ["register"]


def cmd_serve(args: argparse.Namespace) -> int:
    from stages.grpc.serve import parse_listen_address, serve

    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, not {args.jobs}")
    for text in args.listen:
        parse_listen_address(text)  # bad addresses fail before anything starts
    check_timeout(args.timeout)
    return asyncio.run(serve(args.listen, state_dir=args.state_dir,
                             blob_address=args.blob_service_addr,
                             directory_address=args.directory_service_addr, jobs=args.jobs,
                             policy=policy(args), timeout=args.timeout,
                             prune=_prune_settings(args)))


def _prune_settings(args: argparse.Namespace) -> PruneSettings | None:
    """The PruneSettings of --prune-keep, --prune-older-than, --no-prune (None: no pruning)."""
    from stages.service.prune import parse_duration

    if args.no_prune:
        if args.prune_keep is not None or args.prune_older_than is not None:
            raise UserError("--no-prune: not with --prune-keep or --prune-older-than")
        return None
    keep = SERVE_KEEP if args.prune_keep is None else args.prune_keep
    if keep < 0:
        raise UserError(f"--prune-keep must be 0 or more, not {keep}")
    try:
        older_than = (SERVE_OLDER_THAN if args.prune_older_than is None
                      else parse_duration(args.prune_older_than))
    except ValueError as exc:
        raise UserError(f"--prune-older-than: {exc}") from None
    return PruneSettings(keep=keep, older_than=older_than)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve the store and the build service over gRPC",
        description="Serve tvix.castore.v1 BlobService and DirectoryService, and "
                    "tvix.build.v1 BuildService, with gRPC health checking and reflection. "
                    "Prints 'ocibuild: serving on ...' when ready; SIGTERM/SIGINT cancel "
                    "running builds, clean up and exit 0.")
    p.add_argument("--listen", "-l", action="append", required=True, metavar="ADDR",
                   help="unix:///abs/path or host:port; repeat to listen on several")
    p.add_argument("--jobs", "-j", type=int, default=None,
                   help="concurrent builds (default: the number of cores)")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="where runs and bundles live (default: $OCIBUILD_STATE, else "
                        "/var/lib/ocibuild for root)")
    p.add_argument("--blob-service-addr", metavar="URL",
                   help="the blob store to serve and build from (default: "
                        "$BLOB_SERVICE_ADDR, else the embedded local store)")
    p.add_argument("--directory-service-addr", metavar="URL",
                   help="the directory store to serve and build from (default: "
                        "$DIRECTORY_SERVICE_ADDR, else the embedded local store)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"kill a builder that runs longer than this (default "
                        f"{DEFAULT_TIMEOUT:.0f})")
    p.add_argument("--prune-keep", type=int, default=None, metavar="N",
                   help=f"run records: keep the newest N (default {SERVE_KEEP}); pruned at "
                        f"start and hourly, never a running run")
    p.add_argument("--prune-older-than", default=None, metavar="DURATION",
                   help=f"run records: remove those last active longer ago than this "
                        f"(45s, 90m, 12h, 30d; default {format_duration(SERVE_OLDER_THAN)})")
    p.add_argument("--no-prune", action="store_true",
                   help="keep every run record")
    policy_options(p)
    p.set_defaults(handler=cmd_serve)

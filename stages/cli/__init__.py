"""The ``ocibuild`` command line.

Each command group lives in its own module with a ``register(subparsers)``
function; a command's handler returns an exit code. Errors that users cause
(bad input, missing paths, unusable stores) are printed as one line on stderr
with a non-zero exit, never as a traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "UserError"]

# Command-group modules, in the order --help lists them.
COMMAND_MODULES = ["stages.cli.castore_cmd", "stages.cli.build_cmd", "stages.cli.serve_cmd",
                   "stages.cli.nix_cmd", "stages.cli.ray_cmd"]


class UserError(Exception):
    """An error whose message is the whole story; printed without traceback."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from pipeline.errors import PipelineError
    from stages.castore.errors import CastoreError
    from stages.errors import BuildError

    return (UserError, CastoreError, BuildError, PipelineError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ocibuild",
        description="Hermetic builds in OCI containers over a content-addressed store.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _mounts_inputs(argv: Sequence[str]) -> bool:
    """Whether the command will run builds here (a FUSE mount server to start)."""
    if "-h" in argv or "--help" in argv:
        return False
    address = os.environ.get("BUILD_SERVICE_ADDR", "")
    for i, word in enumerate(argv):
        if word.startswith("--build-service-addr="):
            address = word.partition("=")[2]
        elif word == "--build-service-addr" and i + 1 < len(argv):
            address = argv[i + 1]
    local = not address or address.startswith(("oci:", "bwrap:"))
    if argv[:2] == ["nix", "build"]:
        return not address.startswith("ray:")  # (a gRPC address is for 'ocibuild build')
    return argv[:1] == ["build"] and local


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if _mounts_inputs(words):
        # Its ~0.3 s of start-up, while this process imports and plans.
        from stages.castore.fuse import spare

        spare.prestart()
    parser = build_parser()
    args = parser.parse_args(argv)
    # What is imported by now lives as long as the process: out of the
    # collector's way, during the run and in the collection at exit (~25 ms
    # of a command's time otherwise).
    gc.freeze()
    try:
        return int(args.handler(args) or 0)
    except _user_error_types() as exc:
        print(f"ocibuild: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ocibuild: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())

"""``ocibuild ray-worker``: make this machine a build node of a Ray cluster.

::

    ocibuild ray-worker (--head [--port P] | --address HOST:PORT) [--jobs N]
                        [--state-dir DIR] [--block] [-- RAY-START-ARGS...]

It cleans up after dead build services on the node's state directory (what
a node lost mid-build left: bundles, mounts, containers), then runs ``ray
start`` with the custom resource ``ocibuild`` = N (containers at once) and
``OCIBUILD_STATE`` = the state directory, which the node's build actor
(:mod:`stages.cluster.node`) keeps its runs, bundles and store cache in.
The same by hand::

    OCIBUILD_STATE=/var/lib/ocibuild ray start --address HOST:PORT \\
        --resources '{"ocibuild": 2}'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from stages.cli import UserError

__all__ = ["register"]


def cmd_ray_worker(args: argparse.Namespace) -> int:
    import asyncio

    from stages.cluster.service import RESOURCE
    from stages.service import cleanup_dead_instances, default_state_dir

    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, not {args.jobs}")
    if bool(args.head) == bool(args.address):
        raise UserError("ray-worker: give --head (start a cluster) or --address HOST:PORT "
                        "(join one)")
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray is None:
        raise UserError("ray-worker: the 'ray' command is not installed (install "
                        "'ocibuild[ray]')")
    state = (args.state_dir or default_state_dir()).absolute()
    state.mkdir(parents=True, exist_ok=True, mode=0o711)
    cleaned = asyncio.run(cleanup_dead_instances(state))
    if cleaned:
        print(f"ocibuild: cleaned up after {len(cleaned)} dead build service(s) in {state}",
              file=sys.stderr)
    extra = list(args.ray_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    argv = [ray, "start", "--resources", json.dumps({RESOURCE: args.jobs}),
            "--disable-usage-stats"]
    if args.head:
        argv += ["--head", "--port", str(args.port)]
    else:
        argv += ["--address", args.address]
    if args.block:
        argv.append("--block")
    argv += extra
    env = {**os.environ, "OCIBUILD_STATE": str(state), "RAY_USAGE_STATS_ENABLED": "0"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(ray, argv, env)  # ray start is the rest of this process


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ray-worker", help="make this machine a build node of a Ray cluster",
        description="Clean up after dead build services on the state directory, then 'ray "
                    "start' this node with the 'ocibuild' resource (N containers at once). "
                    "Clients then build on the cluster with --build-service-addr ray://...")
    p.add_argument("--head", action="store_true", help="start a new cluster, this node its head")
    p.add_argument("--port", type=int, default=6379, help="with --head: the GCS port "
                                                          "(default 6379)")
    p.add_argument("--address", metavar="HOST:PORT", help="join the cluster whose head is here")
    p.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="containers this node runs at once (default: its cores)")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="the node's runs, bundles and store cache (default: $OCIBUILD_STATE, "
                        "else /var/lib/ocibuild for root)")
    p.add_argument("--block", action="store_true",
                   help="stay in the foreground until the node stops (for a service manager)")
    p.add_argument("ray_args", nargs=argparse.REMAINDER, metavar="-- RAY-START-ARGS",
                   help="more arguments for 'ray start' (--temp-dir, --num-cpus, ...)")
    p.set_defaults(handler=cmd_ray_worker)

"""The janitor of one service instance: kills its containers if the owner dies.

A service (``ocibuild build``, ``nix build``, ``serve``) with the runc
runtime starts one supervisor process in its own session (a bwrap sandbox
dies with bwrap, and bwrap with the service: no supervisor then), holding the write end of a pipe to
the supervisor's stdin. When the service ends normally it writes ``bye``
and closes the pipe; the supervisor exits. When the service dies any other
way (SIGKILL included) the kernel closes the pipe, the supervisor reads
end-of-file without ``bye``, and kills and deletes every container under
the instance's runc root at once (``runc kill --all``, ``runc delete
--force``). The FUSE mount server unmounts the inputs the same way
(PR_SET_PDEATHSIG); the next service to start on the state directory
removes the rest (bundles, runtime directory), after waiting for this
janitor: it inherits a locked ``janitor.lock`` of the instance and holds it
until it exits.

The supervisor imports nothing but the standard library, so it starts in a
few dozen milliseconds, while the service does the rest of its start-up.

Usage (by :class:`~stages.service.OciBuildService`)::

    python -m stages.service.supervisor --runc-root DIR [--runc RUNC]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["BYE", "kill_containers", "main"]

#: What the owner writes before closing the pipe when it ends normally.
BYE = b"bye\n"


def _runc(runc: str, root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([runc, "--root", str(root), *args], stdin=subprocess.DEVNULL,
                          capture_output=True, check=False, timeout=30)


def kill_containers(root: Path, runc: str = "runc", *, settle: float = 1.0) -> list[str]:
    """Kill and delete every container runc knows under ``root``; return their ids.

    Listed again until two lists in a row come back empty (``settle``
    seconds apart at most): a ``runc run`` that was starting when its owner
    died writes its container's state only after a first list.
    """
    killed: list[str] = []
    empty = 0
    while empty < 2:
        ids = _list(runc, root)
        if not ids:
            empty += 1
            time.sleep(settle / 4)
            continue
        empty = 0
        for cid in ids:  # all killed first: the builds stop together
            _runc(runc, root, "kill", "--all", cid, "KILL")
        for cid in ids:
            _runc(runc, root, "delete", "--force", cid)
        killed += [c for c in ids if c not in killed]
    return killed


def _list(runc: str, root: Path) -> list[str]:
    if not root.is_dir():
        return []
    listed = _runc(runc, root, "list", "--format", "json")
    return [c["id"] for c in (json.loads(listed.stdout or b"null") or [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ocibuild-supervisor")
    parser.add_argument("--runc-root", type=Path, required=True)
    parser.add_argument("--runc", default="runc")
    args = parser.parse_args(argv)
    # The owner's terminal and process group are not ours: only the pipe counts.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    received = b""
    while chunk := os.read(sys.stdin.fileno(), 64):
        received = (received + chunk)[-len(BYE):]
    if received == BYE:
        return 0
    killed = kill_containers(args.runc_root, args.runc)
    if killed:
        print(f"ocibuild-supervisor: the service died; killed {len(killed)} container(s): "
              f"{', '.join(killed)}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

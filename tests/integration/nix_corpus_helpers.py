"""The Nix corpus (tests/nix_corpus/*.nix) and the helpers its tests share.

Used by test_nix_corpus.py (ocibuild beside Nix) and test_ray_cluster.py
(the same corpus on a Ray cluster): instantiating the case files with a
nonce, the fixed-output case's expected hash, running commands.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

__all__ = ["CASES", "CORPUS", "OCIBUILD", "REPO", "RUNTIMES", "Corpus", "instantiate",
           "recursive_hash", "sh", "valid"]

#: The runtimes every corpus build runs under.
RUNTIMES = ("runc", "bwrap")

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "nix_corpus"
CASES = ("outputs", "chain", "sources", "passasfile", "symlinks", "big", "fixed", "failing",
         "refchecks", "structured")
OCIBUILD = [sys.executable, "-m", "stages.cli"]


def sh(*args: str, check: bool = True, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True,
                          timeout=timeout, **kw)


class Corpus:
    def __init__(self, base: Path, nonce: str) -> None:
        self.base = base
        self.nonce = nonce
        self.dir = base / "corpus"
        self.drvs: dict[str, str] = {}            # "case.attr" -> .drv path
        self.nix_ok: set[str] = set()             # .drv paths nix-build built
        self.nix_outputs: dict[str, dict[str, str]] = {}   # .drv -> {output: path}
        self.nix_stderr = ""
        self.ours: dict[str, dict] = {}           # runtime -> ocibuild's --json
        self.ours_rc: dict[str, int] = {}
        self.store = f"local://{base}/store"

    # Each runtime builds the corpus into a store and state directory of its
    # own (runc's are "store" and "state"), so both really build.
    def state(self, runtime: str = "runc") -> Path:
        return self.base / ("state" if runtime == "runc" else f"{runtime}-state")

    def store_of(self, runtime: str = "runc") -> str:
        return self.store if runtime == "runc" else f"local://{self.base}/{runtime}-store"

    def store_args(self, runtime: str = "runc") -> list[str]:
        """State and stores of a runtime's builds (resume and shell read the
        runtime from the run)."""
        store = self.store_of(runtime)
        return ["--state-dir", str(self.state(runtime)), "--blob-service-addr", store,
                "--directory-service-addr", store]

    def build_args(self, runtime: str = "runc") -> list[str]:
        """store_args and the runtime, for ``nix build``."""
        scheme = "oci" if runtime == "runc" else runtime
        return [*self.store_args(runtime), "--build-service-addr",
                f"{scheme}://{self.state(runtime)}"]

    @property
    def failing(self) -> set[str]:
        return {d for k, d in self.drvs.items() if k.split(".", 1)[1].startswith("fail_")}


def valid(path: str) -> bool:
    return sh("nix-store", "--check-validity", path, check=False).returncode == 0


def recursive_hash(base: Path, nonce: str) -> str:
    """The NAR hash of fixed.nix's recursive output, by nix-hash over the expected tree."""
    tree = base / "expected-recursive"
    tree.mkdir()
    (tree / "file").write_text(f"fixed content {nonce}\n")
    (tree / "exe").write_text("#!/bin/sh\n")
    (tree / "exe").chmod(0o755)
    return sh("nix-hash", "--type", "sha256", str(tree)).stdout.strip()


def instantiate(c: Corpus, case: str, args: dict[str, str]) -> None:
    """Every attribute of the case file, as a .drv, into c.drvs["case.attr"]."""
    argstrs = [a for k, v in args.items() for a in ("--argstr", k, v)]
    call = " ".join(f'{k} = "{v}";' for k, v in args.items())
    names = sh("nix-instantiate", "--eval", "--json", "-E",
               f"builtins.attrNames (import {c.dir / case}.nix {{ {call} }})").stdout
    for attr in json.loads(names):
        out = sh("nix-instantiate", *argstrs, "-A", attr, str(c.dir / f"{case}.nix")).stdout
        c.drvs[f"{case}.{attr}"] = out.split()[0]

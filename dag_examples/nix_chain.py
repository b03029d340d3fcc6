"""Build a small chain of Nix derivations with ocibuild, and check Nix agrees byte for byte.

Run: ``.venv/bin/python dag_examples/nix_chain.py`` (as root, with the repo's
Nix set up: ``make nix-setup``; ``make demo`` runs it last).

The chain (a fresh nonce in every name, so both tools really build)::

    busybox (a store path, builtins.path) ──> greeting ──> shout ──> bundle
                                                 └───────────────────┘

- ``greeting``: one file, ``hello from ocibuild``;
- ``shout``: greeting's text upper-cased, plus a line naming greeting's path
  (a direct reference);
- ``bundle``: two outputs: ``out`` (a directory: shout's text copied, which
  names greeting, so ``out`` refers to greeting only through copied content;
  an executable script; a relative symlink) and ``doc`` (no references).

Steps: ``nix-instantiate`` makes the .drv files; ocibuild builds the chain as
one graph (:func:`stages.nix.build.build_derivations`, on the embedded store
and state directory, or ``$OCIBUILD_STORE``/``$OCIBUILD_STATE``); then
``nix-build`` builds the same derivations, and every output's NAR hash and
references are printed side by side. The exit status is 1 if any differ.
Afterwards the outputs and .drv files are deleted from the Nix store again.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stages.castore.addresses import default_address
from stages.nix.build import build_derivations
from stages.nix.pathinfo import open_pathinfo
from stages.service import OciBuildService

REPO = Path(__file__).resolve().parent.parent
NIX_ENV = dict(os.environ, NIX_CONF_DIR=os.environ.get("NIX_CONF_DIR", str(REPO / ".nix")),
               NIX_REMOTE="local")

CHAIN = r"""
{ nonce }:
let
  bbd = builtins.path { path = ./bbdir; name = "busybox"; };
  bb = "${bbd}/busybox";
  mk = name: attrs: derivation ({
    name = "${name}-${nonce}";
    system = builtins.currentSystem;
    builder = bb;
  } // attrs);
  greeting = mk "greeting" { args = [ "sh" "-c" "echo hello from ocibuild > $out" ]; };
  shout = mk "shout" {
    args = [ "sh" "-c" "${bb} tr a-z A-Z < ${greeting} > $out; echo 'made from ${greeting}' >> $out" ];
  };
  bundle = mk "bundle" {
    outputs = [ "out" "doc" ];
    args = [ "sh" "-c" ''
      ${bb} mkdir -p $out/bin
      ${bb} cat ${shout} > $out/message
      printf '#!/bin/sh\necho hi\n' > $out/bin/hi
      ${bb} chmod +x $out/bin/hi
      ${bb} ln -s ../message $out/bin/message
      echo "the bundle of the demo" > $doc
    '' ];
  };
in { inherit greeting shout bundle; }
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, env=NIX_ENV)


async def build_with_ocibuild(drvs: list[str]):
    address = default_address()
    async with OciBuildService() as service:
        with open_pathinfo(address) as pathinfo:
            return await build_derivations(drvs, service=service, pathinfo=pathinfo, jobs=2)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="ocibuild-nix-chain-"))
    drvs: list[str] = []
    try:
        (work / "bbdir").mkdir()
        shutil.copy2("/bin/busybox", work / "bbdir" / "busybox")
        (work / "chain.nix").write_text(CHAIN)
        nonce = secrets.token_hex(4)
        for attr in ("greeting", "shout", "bundle"):
            drvs.append(sh("nix-instantiate", "--argstr", "nonce", nonce, "-A", attr,
                           str(work / "chain.nix")).stdout.split()[0])
        print("derivations:")
        for d in drvs:
            print(f"  {d}")

        print("\nbuilding with ocibuild (one graph, jobs 2) ...", flush=True)
        ours = asyncio.run(build_with_ocibuild(drvs))
        failed = [r for r in ours.values() if not r.ok]
        for r in failed:
            print(f"ocibuild failed {r.drv_path}: {r.error}")
        if failed:
            return 1

        print("building with nix-build ...", flush=True)
        sh("nix-build", "--no-out-link", *drvs)

        same = True
        print("\noutput                                      ocibuild NAR hash / Nix NAR hash")
        for d in drvs:
            for _name, out in ours[d].outputs.items():
                nix_hash = sh("nix-store", "-q", "--hash", out.path).stdout.strip()
                nix_refs = sorted(sh("nix-store", "-q", "--references", out.path).stdout.split())
                ok = nix_hash == out.nar_hash and nix_refs == list(out.references)
                same &= ok
                label = out.path.split("-", 1)[1]
                print(f"{label:43s} {out.nar_hash}\n{'':43s} {nix_hash}  "
                      f"{'equal' if ok else 'DIFFERENT'}")
                refs = ", ".join(r.split("-", 1)[1] for r in out.references) or "(none)"
                print(f"{'':43s} references: {refs}")
        print("\nNAR hashes and references equal Nix's" if same else "\nMISMATCH with Nix")
        return 0 if same else 1
    finally:
        if drvs:
            outs = sh("nix-store", "-q", "--outputs", *drvs, check=False).stdout.split()
            sh("nix-store", "--delete", *[p for p in outs if os.path.exists(p)], *drvs,
               check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

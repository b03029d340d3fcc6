"""ocibuild demo: import a directory into the store and show its NAR hash.

Run with ``make demo`` (or ``.venv/bin/python dag_examples/demo.py``).

1. Builds a small tree in a temporary directory: a subdirectory, an
   executable script, a plain file and a symlink.
2. Imports it into the embedded local store (``$OCIBUILD_STORE``, else the
   XDG data directory), as ``ocibuild castore import`` does.
3. Prints the root node's digest and the NAR hash of what the store holds,
   rendered back from the store.
4. When ``nix-store`` is installed, hashes ``nix-store --dump`` of the same
   tree and shows that Nix agrees.

It exits non-zero if the hashes differ.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stages.castore import (
    default_store_dir,
    format_nar_hash,
    ingest_path,
    nar_hash_and_size,
    open_castore,
)


def make_tree(root: Path) -> Path:
    tree = root / "hello-tree"
    (tree / "bin").mkdir(parents=True)
    script = tree / "bin" / "hello"
    script.write_text("#!/bin/sh\necho 'hello from ocibuild'\n")
    script.chmod(0o755)
    (tree / "README").write_text("A tiny tree imported by the ocibuild demo.\n")
    (tree / "hello").symlink_to("bin/hello")
    return tree


def nix_nar_hash(tree: Path) -> str | None:
    """sha256 of `nix-store --dump`, printed as Nix prints NAR hashes."""
    if shutil.which("nix-store") is None:
        return None
    dump = subprocess.run(["nix-store", "--dump", str(tree)], check=True,
                          capture_output=True).stdout
    return format_nar_hash(hashlib.sha256(dump).digest())


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="ocibuild-demo-") as tmp:
        tree = make_tree(Path(tmp))
        castore = open_castore()  # BLOB_SERVICE_ADDR etc., else the local store
        try:
            node = await ingest_path(castore, tree)
            nar_hash, nar_size = await nar_hash_and_size(castore, node)
        finally:
            await castore.aclose()
        ours = format_nar_hash(nar_hash)

        print(f"store:      {os.environ.get('BLOB_SERVICE_ADDR') or default_store_dir()}")
        print(f"imported:   {tree} ({node.size} entries)")
        print(f"digest:     {node.digest.hex()} (BLAKE3, castore)")
        print(f"NAR:        {nar_size} bytes")
        print(f"NAR hash:   {ours}")

        theirs = nix_nar_hash(tree)
        if theirs is None:
            print("nix-store:  not installed; skipping the comparison with Nix")
            return 0
        print(f"nix-store:  {theirs} (sha256 of nix-store --dump)")
        if theirs != ours:
            print("MISMATCH: Nix serializes this tree differently", file=sys.stderr)
            return 1
        print("match:      the store's NAR is byte-for-byte what Nix would dump")
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""A real C project built as Nix derivations, for tests and benchmarks.

Brotli 1.1.0 (its library, then its command-line tool linked against it),
from the upstream sources the PyPI sdist ships (the Makefile fetches it into
``.cache/sources`` and checks its hash), compiled by ``zig cc`` from the
``ziglang`` wheel (a hermetic clang toolchain, 340 MB, a test dependency),
with a static busybox as the builder's shell. :func:`prepare` lays out a
work directory ``brotli.nix`` builds from.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

__all__ = ["BROTLI_SDIST", "NIX_FILE", "prepare"]

REPO = Path(__file__).resolve().parents[2]
BROTLI_SDIST = REPO / ".cache" / "sources" / "Brotli-1.1.0.tar.gz"
NIX_FILE = Path(__file__).with_name("brotli.nix")


def _zig_dir() -> Path:
    import ziglang

    return Path(ziglang.__file__).parent


def prepare(work: Path) -> Path:
    """``work`` with brotli.nix, ./zig, ./src/c and ./bbdir; returns the .nix file."""
    if not BROTLI_SDIST.exists():
        raise FileNotFoundError(f"{BROTLI_SDIST} is missing: run 'make sources' (make test "
                                f"and make bench do)")
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(BROTLI_SDIST) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("Brotli-1.1.0/c/")]
        tar.extractall(work / "unpacked", members=members, filter="data")
    (work / "src").mkdir()
    os.rename(work / "unpacked" / "Brotli-1.1.0" / "c", work / "src" / "c")
    shutil.rmtree(work / "unpacked")
    # The toolchain as the wheel installed it, without Python's own files.
    top = _zig_dir()
    shutil.copytree(top, work / "zig", symlinks=True,
                    ignore=lambda d, names: [n for n in names if Path(d) == top
                                             and n in ("__init__.py", "__main__.py",
                                                       "__pycache__")])
    (work / "bbdir").mkdir()
    shutil.copy2("/bin/busybox", work / "bbdir" / "busybox")
    target = work / "brotli.nix"
    shutil.copy2(NIX_FILE, target)
    return target

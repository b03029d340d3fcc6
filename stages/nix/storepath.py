"""Nix store paths: ``/nix/store/<hash part>-<name>``.

The hash part is 32 nixbase32 characters (160 bits); the name follows Nix
2.8's rules (libstore/path.cc, ``checkName``): not empty, at most 211
characters, not starting with ``.``, only ``A-Za-z0-9+-._?=``.

Caveats:

- Only the default store directory ``/nix/store`` is known; a store path
  elsewhere is refused (ocibuild's sandbox mounts inputs at /nix/store).
"""

from __future__ import annotations

import re

from stages.castore.nixbase32 import ALPHABET
from stages.nix.errors import StorePathError

__all__ = ["HASH_PART_LEN", "MAX_NAME_LEN", "STORE_DIR", "basename", "check_store_path",
           "hash_part", "name_part"]

STORE_DIR = "/nix/store"
HASH_PART_LEN = 32
MAX_NAME_LEN = 211

_HASH_RE = re.compile(f"[{ALPHABET}]{{{HASH_PART_LEN}}}")
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")


def check_store_path(path: str) -> str:
    """``path`` if it is a valid store path, else StorePathError saying why."""
    if not isinstance(path, str):
        raise StorePathError(repr(path), f"a store path is a str, not {type(path).__name__}")
    prefix = STORE_DIR + "/"
    if not path.startswith(prefix):
        raise StorePathError(path, f"it does not start with {prefix}")
    base = path[len(prefix):]
    if "/" in base:
        raise StorePathError(path, "it names a file inside a store path, not a store path")
    hash_, dash, name = base[:HASH_PART_LEN], base[HASH_PART_LEN:HASH_PART_LEN + 1], \
        base[HASH_PART_LEN + 1:]
    if not _HASH_RE.fullmatch(hash_):
        raise StorePathError(path, f"its hash part {hash_!r} is not {HASH_PART_LEN} "
                                   f"nixbase32 characters ({ALPHABET})")
    if dash != "-":
        raise StorePathError(path, "the hash part is not followed by '-'")
    if not name:
        raise StorePathError(path, "its name is empty")
    if len(name) > MAX_NAME_LEN:
        raise StorePathError(path, f"its name is longer than {MAX_NAME_LEN} characters")
    if name.startswith("."):
        raise StorePathError(path, "its name starts with a period")
    if not _NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _NAME_RE.fullmatch(c))
        raise StorePathError(path, f"its name contains the illegal character {bad!r} "
                                   "(allowed: A-Z a-z 0-9 + - . _ ? =)")
    return path


def basename(path: str) -> str:
    """``<hash part>-<name>`` of a valid store path."""
    return check_store_path(path)[len(STORE_DIR) + 1:]


def hash_part(path: str) -> str:
    """The 32-character nixbase32 hash part of a valid store path."""
    return basename(path)[:HASH_PART_LEN]


def name_part(path: str) -> str:
    """The name after the hash part (``hello-2.12``, ``foo.drv``)."""
    return basename(path)[HASH_PART_LEN + 1:]

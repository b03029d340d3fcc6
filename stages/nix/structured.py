"""Structured attributes and output placeholders, as Nix 2.8's builder writes them.

A derivation with ``__structuredAttrs = true`` carries its attributes as one
JSON object in the environment variable ``__json``. Nix 2.8 then passes none
of the derivation's environment to the builder; instead it writes two files
into the build directory (libstore/parsed-derivations.cc,
``prepareStructuredAttrs`` and ``writeStructuredAttrsShell``):

- ``.attrs.json``: the object plus ``outputs`` (output name -> output
  path), serialized as nlohmann::json's ``dump()`` does: keys sorted by
  their bytes, no spaces, UTF-8 kept, ``"``, ``\\``, and control characters
  escaped (``\\b \\f \\n \\r \\t``, others ``\\u00xx``), numbers in its own
  shortest form (:func:`dump_json`);
- ``.attrs.sh``: one bash ``declare`` per attribute whose name is a shell
  variable name and whose value bash can hold (:func:`attrs_shell`), with
  Nix 2.8's quirks kept: a number goes through a C ``float`` and an ``int``,
  so 3000000000 becomes -1294967296 and 1e15 becomes -2147483648, and a
  non-integral number is left out.

Placeholders: ``builtins.placeholder "out"`` is ``/`` + the base-32 sha256
of ``nix-output:out`` (:func:`hash_placeholder`). Nix rewrites each output's
placeholder into the output's path in the builder's arguments, environment,
passAsFile files and both attrs files (:func:`rewrite`).

Caveats: Nix 2.8 points ``NIX_ATTRS_JSON_FILE`` and ``NIX_ATTRS_SH_FILE`` at
its build directory on the host (``/tmp/nix-build-<drv name>-0``, with the
daemon's TMPDIR unset), not at /build where the builder sees the files;
ocibuild sets the same strings (:func:`attrs_file_vars`), so a builder that
prints them prints what it prints under Nix. Floats are formatted from
Python's shortest round-trip digits; nlohmann's Grisu2 agrees except in rare
cases where it is not the shortest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from typing import Any

from stages.castore import nixbase32

__all__ = ["attrs_file_vars", "attrs_shell", "dump_json", "hash_placeholder", "parse_json",
           "rewrite"]

ATTRS_JSON = ".attrs.json"
ATTRS_SH = ".attrs.sh"
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n",
                  "\r": "\\r", "\t": "\\t"}
_INT_MIN = -(2 ** 31)


def hash_placeholder(output: str) -> str:
    """``builtins.placeholder output``: what Nix rewrites into the output's path."""
    digest = hashlib.sha256(b"nix-output:" + output.encode("utf-8", "surrogateescape")).digest()
    return "/" + nixbase32.encode(digest)


def rewrite(text: str, rewrites: Mapping[str, str]) -> str:
    """Nix's ``rewriteStrings``: every occurrence of each key replaced, key by key."""
    for old, new in rewrites.items():
        text = text.replace(old, new)
    return text


def parse_json(text: str) -> dict[str, Any]:
    """The ``__json`` attribute as an object; ValueError says what is wrong with it."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def number(text: str) -> float:
        value = float(text)
        if math.isinf(value):  # nlohmann refuses what a double cannot hold
            raise ValueError(f"number overflow parsing {text[:40]!r}")
        return value

    def integer(text: str) -> int | float:
        # nlohmann keeps int64 and uint64; beyond them a number is a double.
        digits = text.lstrip("-")
        if len(digits) > 20 or not -(2 ** 63) <= int(text) < 2 ** 64:
            return number(text)
        return int(text)

    try:
        value = json.loads(text, parse_constant=no_constants, parse_float=number,
                           parse_int=integer)
    except RecursionError:
        raise ValueError("it nests too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"it is a JSON {type(value).__name__}, not an object")
    return value


def _string(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"string {s!r} is not valid Unicode (a lone surrogate)") from exc
    out = []
    for ch in s:
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _float(x: float) -> str:
    """A double as nlohmann::json prints it: shortest digits, decimal for exponents -4..15."""
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    mantissa, _, exp = repr(abs(x)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = whole + frac
    point = len(whole) + int(exp or 0)     # where the point goes, counted in digits
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0") or "0"
    k, n = len(digits), point
    if k <= n <= 15:
        return sign + digits + "0" * (n - k) + ".0"
    if 0 < n <= 15:
        return sign + digits[:n] + "." + digits[n:]
    if -4 < n <= 0:
        return sign + "0." + "0" * -n + digits
    e = n - 1
    mant = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{sign}{mant}e{'-' if e < 0 else '+'}{abs(e):02d}"


def dump_json(value: Any) -> str:
    """``value`` as nlohmann::json's ``dump()`` writes it (see the module docstring)."""
    # Iterative: a hostile __json may nest deeper than Python's recursion limit.
    out: list[str] = []
    todo: list[Any] = [value]
    close = object()
    while todo:
        item = todo.pop()
        if isinstance(item, tuple) and item and item[0] is close:
            out.append(item[1])
        elif item is None:
            out.append("null")
        elif item is True or item is False:
            out.append("true" if item else "false")
        elif isinstance(item, int):
            out.append(str(item))
        elif isinstance(item, float):
            out.append(_float(item))
        elif isinstance(item, str):
            out.append(_string(item))
        elif isinstance(item, list):
            out.append("[")
            todo.append((close, "]"))
            for i, element in enumerate(reversed(item)):
                todo.append(element)
                if i < len(item) - 1:
                    todo.append((close, ","))
        elif isinstance(item, dict):
            out.append("{")
            todo.append((close, "}"))
            keys = sorted(item, key=lambda k: k.encode("utf-8", "surrogatepass"))
            for i, key in enumerate(reversed(keys)):
                todo.append(item[key])
                todo.append((close, _string(key) + ":"))
                if i < len(keys) - 1:
                    todo.append((close, ","))
        else:
            raise TypeError(f"not a JSON value: {item!r}")
    return "".join(out)


def _shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _shell_scalar(value: Any) -> str | None:
    """Nix 2.8's ``handleSimpleType``; None for what bash cannot hold."""
    if isinstance(value, str):
        return _shell_quote(value)
    if value is None:
        return "''"
    if value is True or value is False:
        return "1" if value else ""
    if isinstance(value, int):
        # get<int>(): the low 32 bits, as a signed int.
        return str((value + 2 ** 31) % 2 ** 32 - 2 ** 31)
    if isinstance(value, float):
        try:
            as_float = struct.unpack("f", struct.pack("f", value))[0]
        except OverflowError:
            as_float = math.inf        # C converts an out-of-range double to inf
        if not math.isinf(as_float) and math.ceil(as_float) != as_float:
            return None
        whole = math.trunc(value)
        # get<int>() of an out-of-range double is INT_MIN on x86-64 (cvttsd2si).
        return str(whole if _INT_MIN <= whole < 2 ** 31 else _INT_MIN)
    return None


def attrs_shell(attrs: Mapping[str, Any]) -> str:
    """The ``.attrs.sh`` Nix 2.8 writes for the prepared attributes."""
    lines = []
    for key in sorted(attrs, key=lambda k: k.encode("utf-8", "surrogatepass")):
        if not _SHELL_NAME.fullmatch(key):
            continue
        value = attrs[key]
        scalar = _shell_scalar(value)
        if scalar is not None:
            lines.append(f"declare {key}={scalar}\n")
        elif isinstance(value, list):
            items = [_shell_scalar(v) for v in value]
            if all(i is not None for i in items):
                lines.append(f"declare -a {key}=({''.join(f'{i} ' for i in items)})\n")
        elif isinstance(value, dict):
            pairs = [(k, _shell_scalar(v)) for k, v in value.items()]
            if all(v is not None for _, v in pairs):
                pairs.sort(key=lambda kv: kv[0].encode("utf-8", "surrogatepass"))
                body = "".join(f"[{_shell_quote(k)}]={v} " for k, v in pairs)
                lines.append(f"declare -A {key}=({body})\n")
    return "".join(lines)


def attrs_file_vars(drv_name: str) -> dict[str, str]:
    """NIX_ATTRS_JSON_FILE and NIX_ATTRS_SH_FILE, as Nix 2.8 sets them (module docstring)."""
    top = f"/tmp/nix-build-{drv_name}.drv-0"
    return {"NIX_ATTRS_JSON_FILE": f"{top}/{ATTRS_JSON}", "NIX_ATTRS_SH_FILE": f"{top}/{ATTRS_SH}"}

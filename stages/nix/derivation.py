"""Nix derivations (.drv files) as values: parse, serialize, read.

A store derivation is one ATerm term, as Nix 2.8 writes it
(libstore/derivations.cc, ``unparse`` / ``parseDerivation``)::

    Derive([("out","/nix/store/...-x","",""),...],    outputs: name, path, hashAlgo, hash
           [("/nix/store/...-y.drv",["out"]),...],   input derivations and used outputs
           ["/nix/store/...-src",...],               input sources
           "x86_64-linux","/nix/store/...-sh",       system, builder
           ["-c","..."],                             args
           [("name","x"),("out","/nix/store/..."),...])   environment

(all on one line). Strings are double-quoted; ``"``, ``\\``, newline, CR and
tab are escaped as ``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t``; every other
character stands for itself. Outputs, input derivations, their output names,
input sources and the environment are written sorted (they are maps and sets
in Nix), so serializing a parsed Nix-written file gives back the same bytes.

Caveats:

- Strings are bytes to Nix. They are decoded as UTF-8 with
  ``surrogateescape``: any byte sequence survives a round trip.
  :func:`serialize_derivation`'s text gives the file's bytes with
  ``.encode("utf-8", "surrogateescape")``, which :func:`derivation_bytes`
  does.
- Parsing is stricter than Nix on two points: a duplicate output name, input
  derivation, input source or environment key is refused (Nix keeps one of
  them silently), and store paths are checked (as Nix does for paths, plus
  names). Lists Nix treats as sets are accepted unsorted and sorted, as Nix
  does; only then is the round trip not byte-identical (Nix never writes such
  files).
- An escape other than the five above (``\\a``) parses as the character
  itself, as in Nix; it cannot round-trip either.
- Only the 2.8 form is known: ``DrvWithVersion(...)`` (dynamic derivations of
  later Nix versions) is refused with a parse error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import attrs

from stages.nix.errors import DerivationParseError, NixError, StorePathError
from stages.nix.storepath import check_store_path

__all__ = [
    "Derivation",
    "DerivationOutput",
    "derivation_bytes",
    "parse_derivation",
    "read_derivation",
    "serialize_derivation",
]

#: Hash algorithms Nix 2.8 knows for content-addressed outputs.
HASH_ALGOS = ("md5", "sha1", "sha256", "sha512")


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _sorted_map(items: Iterable[tuple[str, object]]) -> dict:
    return dict(sorted(items, key=lambda kv: _utf8(kv[0])))


def _sorted_strs(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(items, key=_utf8))


def _strs(items: Iterable[str]) -> tuple[str, ...]:
    """A typed converter (attrs' mypy plugin cannot solve converter=tuple's type variable)."""
    return tuple(items)


@attrs.frozen(kw_only=True)
class DerivationOutput:
    """One output: its store path, and for content-addressed ones the hash.

    ``hash_algo`` is as in the file: ``""`` (input-addressed), ``"sha256"``
    (flat: the hash of the single file's contents) or ``"r:sha256"``
    (recursive: the hash of the NAR); ``hash`` is lower-case hex.
    """

    path: str
    hash_algo: str = ""
    hash: str = ""

    @property
    def is_fixed(self) -> bool:
        """A fixed output: the hash is given in advance."""
        return bool(self.hash_algo and self.hash)

    @property
    def is_recursive(self) -> bool:
        return self.hash_algo.startswith("r:")

    @property
    def algo(self) -> str:
        """The hash algorithm without the ``r:`` prefix."""
        return self.hash_algo[2:] if self.is_recursive else self.hash_algo


def _outputs(value: Mapping[str, DerivationOutput]) -> dict[str, DerivationOutput]:
    return _sorted_map(value.items())


def _input_drvs(value: Mapping[str, Iterable[str]]) -> dict[str, tuple[str, ...]]:
    return _sorted_map((k, _sorted_strs(v)) for k, v in value.items())


def _env(value: Mapping[str, str]) -> dict[str, str]:
    return _sorted_map(value.items())


@attrs.frozen(kw_only=True)
class Derivation:
    """A store derivation; every map and set is kept sorted, as Nix writes it.

    The mappings are plain dicts for interoperability (pickle, JSON); treat
    them as read-only.
    """

    outputs: Mapping[str, DerivationOutput] = attrs.field(converter=_outputs)
    input_drvs: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict, converter=_input_drvs)
    input_srcs: tuple[str, ...] = attrs.field(default=(), converter=_sorted_strs)
    system: str
    builder: str
    args: tuple[str, ...] = attrs.field(default=(), converter=_strs)
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_env)

    @property
    def is_fixed_output(self) -> bool:
        """Exactly one output, named ``out``, whose hash is given."""
        return (len(self.outputs) == 1 and "out" in self.outputs
                and self.outputs["out"].is_fixed)

    @property
    def name(self) -> str:
        """The derivation's ``name`` attribute (with structured attributes, the
        JSON's); "" when it has none."""
        if "name" in self.env or "__json" not in self.env:
            return self.env.get("name", "")
        try:
            name = json.loads(self.env["__json"]).get("name", "")
        except (ValueError, AttributeError, RecursionError):
            return ""
        return name if isinstance(name, str) else ""


# --- serializing ----------------------------------------------------------------

def _q(s: str) -> str:
    """Nix's ``printString``: escape backslash first, then the others."""
    if "\\" in s:
        s = s.replace("\\", "\\\\")
    if '"' in s:
        s = s.replace('"', '\\"')
    if "\n" in s or "\r" in s or "\t" in s:
        s = s.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return '"' + s + '"'


def _list(items: Iterable[str]) -> str:
    return "[" + ",".join(items) + "]"


def serialize_derivation(drv: Derivation) -> str:
    """The ATerm text Nix 2.8 writes for ``drv`` (see the module docstring)."""
    outputs = _list(f"({_q(name)},{_q(o.path)},{_q(o.hash_algo)},{_q(o.hash)})"
                    for name, o in drv.outputs.items())
    input_drvs = _list(f"({_q(path)},{_list(map(_q, names))})"
                       for path, names in drv.input_drvs.items())
    env = _list(f"({_q(k)},{_q(v)})" for k, v in drv.env.items())
    return (f"Derive({outputs},{input_drvs},{_list(map(_q, drv.input_srcs))},"
            f"{_q(drv.system)},{_q(drv.builder)},{_list(map(_q, drv.args))},{env})")


# --- parsing --------------------------------------------------------------------

# A whole string: runs of plain characters, each escape a backslash and any character.
_STRING = re.compile(r'"([^"\\]*(?:\\.[^"\\]*)*)"', re.DOTALL)
_OTHER_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t"}
_T = TypeVar("_T")


def _unescape(raw: str) -> str:
    """Nix's ``parseString`` escapes: \\n \\r \\t, and \\c is c for any other c.

    Escaped backslashes go first (scanning left to right, the first of two
    backslashes always starts an escape), parked as NUL, which a Nix string
    cannot hold; then every backslash left starts an escape of another
    character. All in C-speed string operations; text holding NUL (not
    from Nix) takes the slow path.
    """
    if "\0" in raw:
        return _OTHER_ESCAPE.sub(lambda m: _UNESCAPE.get(m.group(1), m.group(1)), raw)
    s = raw.replace("\\\\", "\0")
    s = s.replace("\\n", "\n").replace("\\r", "\r").replace("\\t", "\t").replace('\\"', '"')
    if "\\" in s:
        s = _OTHER_ESCAPE.sub(r"\1", s)
    return s.replace("\0", "\\")


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.pos = 0

    def error(self, message: str, pos: int | None = None) -> DerivationParseError:
        pos = self.pos if pos is None else pos
        line = self.text.count("\n", 0, pos) + 1
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return DerivationParseError(self.source, line, column, message)

    def _found(self) -> str:
        if self.pos >= len(self.text):
            return "the end of the input"
        return repr(self.text[self.pos:self.pos + 12]) + ("..." if
                                                          self.pos + 12 < len(self.text) else "")

    def expect(self, token: str, what: str = "") -> None:
        if not self.text.startswith(token, self.pos):
            label = f"{token!r}" + (f" ({what})" if what else "")
            raise self.error(f"expected {label}, found {self._found()}")
        self.pos += len(token)

    def peek(self, token: str) -> bool:
        return self.text.startswith(token, self.pos)

    def string(self, what: str) -> str:
        if not self.peek('"'):
            raise self.error(f"expected a string ({what}), found {self._found()}")
        m = _STRING.match(self.text, self.pos)
        if m is None:
            raise self.error(f"unterminated string ({what}) starting here")
        self.pos = m.end()
        raw = m.group(1)
        return _unescape(raw) if "\\" in raw else raw

    def store_path(self, what: str) -> str:
        start = self.pos
        s = self.string(what)
        try:
            return check_store_path(s)
        except StorePathError as exc:
            raise self.error(f"{what}: {exc}", start) from exc

    def items(self, item: Callable[[], _T], what: str) -> list[_T]:
        """``[item,item,...]``."""
        self.expect("[", f"start of the list of {what}")
        result: list[_T] = []
        if self.peek("]"):
            self.pos += 1
            return result
        while True:
            result.append(item())
            if self.peek("]"):
                self.pos += 1
                return result
            self.expect(",", f"',' or ']' in the list of {what}")

    def unique(self, pairs: Sequence[tuple[int, str, object]], what: str) -> dict:
        seen: dict = {}
        for pos, key, value in pairs:
            if key in seen:
                raise self.error(f"duplicate {what} {key!r}", pos)
            seen[key] = value
        return seen

    def output(self) -> tuple[int, str, DerivationOutput]:
        start = self.pos
        self.expect("(", "start of an output")
        name = self.string("output name")
        if not name:
            raise self.error("empty output name", start + 1)
        self.expect(",")
        path_pos = self.pos
        path = self.string("output path")
        self.expect(",")
        algo_pos = self.pos
        algo = self.string("output hash algorithm")
        self.expect(",")
        hash_pos = self.pos
        hash_ = self.string("output hash")
        self.expect(")", "end of an output")
        if path:
            try:
                check_store_path(path)
            except StorePathError as exc:
                raise self.error(f"output {name!r}: {exc}", path_pos) from exc
        if algo:
            bare = algo[2:] if algo.startswith("r:") else algo
            if bare not in HASH_ALGOS:
                raise self.error(f"output {name!r}: unknown hash algorithm {algo!r} "
                                 f"(known: {', '.join(HASH_ALGOS)}, each optionally "
                                 f"prefixed with 'r:')", algo_pos)
        elif hash_:
            raise self.error(f"output {name!r} has a hash but no hash algorithm", hash_pos)
        return start, name, DerivationOutput(path=path, hash_algo=algo, hash=hash_)

    def input_drv(self) -> tuple[int, str, tuple[str, ...]]:
        start = self.pos
        self.expect("(", "start of an input derivation")
        path = self.store_path("input derivation path")
        if not path.endswith(".drv"):
            raise self.error(f"input derivation {path!r} does not end in .drv", start + 1)
        self.expect(",")
        names = [(self.pos, n, None) for n in
                 self.items(lambda: self.string("output name"), "output names")]
        self.unique(names, f"output name of {path}")
        self.expect(")", "end of an input derivation")
        return start, path, tuple(n for _, n, _ in names)

    def positioned(self, item):
        def wrapped():
            pos = self.pos
            return pos, item()
        return wrapped

    def env_pair(self) -> tuple[int, str, str]:
        start = self.pos
        self.expect("(", "start of an environment variable")
        key = self.string("variable name")
        self.expect(",")
        value = self.string("variable value")
        self.expect(")", "end of an environment variable")
        return start, key, value

    def derivation(self) -> Derivation:
        if self.peek("DrvWithVersion("):
            raise self.error("DrvWithVersion derivations (newer than Nix 2.8) are not supported")
        self.expect("Derive(", "a derivation starts with 'Derive('")
        outputs = self.unique(self.items(self.output, "outputs"), "output")
        if not outputs:
            raise self.error("a derivation has at least one output", len("Derive("))
        self.expect(",")
        input_drvs = self.unique(self.items(self.input_drv, "input derivations"),
                                 "input derivation")
        self.expect(",")
        srcs = self.items(self.positioned(lambda: self.store_path("input source")),
                          "input sources")
        input_srcs = self.unique([(p, s, None) for p, s in srcs], "input source")
        self.expect(",")
        system = self.string("system")
        self.expect(",")
        builder = self.string("builder")
        self.expect(",")
        args = self.items(lambda: self.string("argument"), "arguments")
        self.expect(",")
        env = self.unique(self.items(self.env_pair, "environment variables"),
                          "environment variable")
        self.expect(")", "end of the derivation")
        if self.pos != len(self.text):
            raise self.error(f"unexpected text after the derivation: {self._found()}")
        return Derivation(outputs=outputs, input_drvs=input_drvs, input_srcs=tuple(input_srcs),
                          system=system, builder=builder, args=tuple(args), env=env)


def parse_derivation(data: bytes | str, *, source: str = "<drv>") -> Derivation:
    """Parse a .drv's text; DerivationParseError names line:column and what was expected."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        text = bytes(data).decode("utf-8", "surrogateescape")
    elif isinstance(data, str):
        text = data
    else:
        raise TypeError(f"a derivation is bytes or str, not {type(data).__name__}")
    return _Parser(text, source).derivation()


def read_derivation(path: str | Path) -> Derivation:
    """Read and parse a .drv file (errors name the file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise NixError(f"cannot read the derivation {path}: {exc.strerror}") from exc
    return parse_derivation(data, source=str(path))


def derivation_bytes(drv: Derivation) -> bytes:
    """:func:`serialize_derivation` as the bytes of the file."""
    return _utf8(serialize_derivation(drv))

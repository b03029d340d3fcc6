"""Errors of the Nix bridge (derivations, store paths, fixed outputs).

::

    NixError                        everything below; catch this at a boundary
    ├── StorePathError              not a valid store path (path=)
    ├── DerivationParseError        a .drv is not a Nix 2.8 ATerm derivation
                                    (source=, line=, column=)
    ├── UnsupportedDerivation       a valid derivation ocibuild does not build (yet)
                                    (drv=, feature=)
    ├── MissingInputError           an input of a derivation has no castore node (path=)
    ├── FixedOutputError            a fixed output cannot be checked (output=)
    │   └── FixedOutputMismatch     a fixed output has the wrong hash (output=, expected=, got=)

:class:`StorePathError` and :class:`DerivationParseError` are also
``ValueError`` (bad text), :class:`MissingInputError` is also
``LookupError`` (a missing key), so callers that only know the builtins
still catch them sensibly.
"""

from __future__ import annotations

__all__ = [
    "DerivationParseError",
    "FixedOutputError",
    "FixedOutputMismatch",
    "MissingInputError",
    "NixError",
    "StorePathError",
    "UnsupportedDerivation",
]


class NixError(Exception):
    """Root of the errors of :mod:`stages.nix`."""


class StorePathError(NixError, ValueError):
    """``path`` is not ``/nix/store/<32 nixbase32 chars>-<name>``; the message says why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path!r} is not a valid store path: {reason}")


class DerivationParseError(NixError, ValueError):
    """A derivation file that does not parse; names where and what was expected.

    ``line`` and ``column`` are 1-based and count characters (a .drv file is
    normally one line: Nix escapes newlines inside strings).
    """

    def __init__(self, source: str, line: int, column: int, message: str) -> None:
        self.source = source
        self.line = line
        self.column = column
        self.detail = message
        super().__init__(f"{source}:{line}:{column}: {message}")


class UnsupportedDerivation(NixError):
    """A well-formed derivation using a feature ocibuild does not build."""

    def __init__(self, drv: str, feature: str, message: str) -> None:
        self.drv = drv
        self.feature = feature
        super().__init__(f"{drv}: {message} [unsupported: {feature}]")


class MissingInputError(NixError, LookupError):
    """A store path a derivation needs has no castore node in the given inputs."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)

    def __str__(self) -> str:  # LookupError would repr() the message like a key
        return str(self.args[0])


class FixedOutputError(NixError):
    """A fixed-output derivation's output cannot be checked as declared."""

    def __init__(self, output: str, message: str) -> None:
        self.output = output
        super().__init__(message)


class FixedOutputMismatch(FixedOutputError):
    """The output's hash is not the declared one; both in Nix's printed form."""

    def __init__(self, *, output: str, expected: str, got: str) -> None:
        self.expected = expected
        self.got = got
        super().__init__(output, f"hash mismatch in fixed-output derivation output {output}:\n"
                                 f"  specified: {expected}\n       got:    {got}")

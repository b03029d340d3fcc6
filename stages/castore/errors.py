"""Errors of the content-addressed store.

::

    CastoreError                    everything below; catch this at a boundary
    ├── ValidationError             a node, directory or upload breaks a rule (rule=, name=,
                                    digest=)
    ├── NotFoundError               a blob or directory is not in the store (digest=)
    ├── CorruptionError             stored bytes no longer match their digest (digest=, where=)
    ├── IngestError                 a path cannot be imported (path=)
    ├── StoreError                  a store cannot be opened or used (address=)
    └── RefScanError                an output cannot be scanned for references
                                    (path=; in stages.castore.refscan)

Every error carries what it is about, so a message can name it.
"""

from __future__ import annotations

__all__ = [
    "CastoreError",
    "CorruptionError",
    "IngestError",
    "NotFoundError",
    "StoreError",
    "ValidationError",
]


class CastoreError(Exception):
    """Root of the castore error hierarchy."""


class ValidationError(CastoreError, ValueError):
    """Something breaks one of the protocol's rules.

    ``rule`` is a short stable identifier of the rule (for example
    ``"names-sorted"``); ``name`` and ``digest`` name the offending entry
    where there is one.
    """

    def __init__(self, rule: str, message: str, *, name: bytes | None = None,
                 digest: bytes | None = None) -> None:
        self.rule = rule
        self.name = name
        self.digest = digest
        detail = message
        if name is not None:
            detail += f" (name {name!r})"
        if digest is not None:
            detail += f" (digest {digest.hex()})"
        super().__init__(f"{rule}: {detail}")


class NotFoundError(CastoreError, LookupError):
    """A blob or directory is not in the store."""

    def __init__(self, kind: str, digest: bytes) -> None:
        self.kind = kind
        self.digest = digest
        super().__init__(f"{kind} {digest.hex()} not found in the store")


class CorruptionError(CastoreError):
    """Stored data does not hash to the digest it is stored under."""

    def __init__(self, kind: str, digest: bytes, where: str = "") -> None:
        self.kind = kind
        self.digest = digest
        self.where = where
        at = f" at {where}" if where else ""
        super().__init__(
            f"{kind} {digest.hex()} is corrupt{at}: its bytes no longer hash to "
            f"its digest; remove it and import it again")


class IngestError(CastoreError):
    """A filesystem path cannot be imported."""

    def __init__(self, path: object, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class StoreError(CastoreError):
    """A store cannot be opened or used."""

    def __init__(self, address: str, message: str) -> None:
        self.address = address
        super().__init__(f"store {address}: {message}")

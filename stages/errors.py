"""Errors of the build domain (requests, specs, bundles, containers).

::

    BuildError                      everything below; catch this at a boundary
    ├── RequestError                a request breaks a rule (field=, rule=)
    │   └── RequestFileError        a request file cannot be read or parsed (path=)
    ├── SpecError                   a valid request has no OCI spec (field=, rule=)
    ├── BundleError                 the bundle directory cannot be written (path=)
    ├── IdMapError                  /etc/subuid or /etc/subgid is unusable (path=, line=)
    ├── RuncError                   runc failed or the builder exited non-zero
                                    (exit_code=, log_tail=)
    │   └── RuncTimeoutError        the builder ran longer than its timeout (timeout=)
    ├── OutputError                 an output is missing or cannot be ingested (output=)
    ├── BuildFailed                 a build did not succeed, at which stage (key=, stage=,
                                    run_dir=)
    └── ServiceError                a build service cannot be opened or used (address=)

Castore's errors stay in ``stages.castore.errors``; a castore ValidationError
met while converting a request is translated into a RequestError naming the
field (``raise ... from``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

__all__ = [
    "BuildError",
    "BuildFailed",
    "BundleError",
    "IdMapError",
    "OutputError",
    "RequestError",
    "RequestFileError",
    "RuncError",
    "RuncTimeoutError",
    "ServiceError",
    "SpecError",
    "cause_of",
]

_E = TypeVar("_E", bound=BaseException)


class BuildError(Exception):
    """Root of the build domain's error hierarchy."""


class RequestError(BuildError, ValueError):
    """A BuildRequest breaks a rule of the protocol or of our sandbox.

    ``field`` names the offending field as a path into the request
    (``outputs[2]``, ``constraints.available_ro_paths[0]``); ``rule`` is a
    short stable identifier of the rule (``"path-clean"``, ``"sorted"``).
    """

    def __init__(self, field: str, rule: str, message: str) -> None:
        self.field = field
        self.rule = rule
        self.detail = message
        super().__init__(f"{field}: {message} [rule {rule}]")


class RequestFileError(RequestError):
    """A request file cannot be read, or its contents are not a BuildRequest."""

    def __init__(self, path: Path | str, rule: str, message: str) -> None:
        self.path = Path(path)
        super().__init__(str(path), rule, message)


class SpecError(BuildError, ValueError):
    """A valid request that this runtime cannot express (e.g. non-UTF-8 env)."""

    def __init__(self, field: str, rule: str, message: str) -> None:
        self.field = field
        self.rule = rule
        self.detail = message
        super().__init__(f"{field}: {message} [rule {rule}]")


class BundleError(BuildError):
    """Writing the bundle directory failed; nothing half-written is left."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"bundle {path}: {message}")


class IdMapError(BuildError):
    """/etc/subuid or /etc/subgid cannot be used for the user namespace."""

    def __init__(self, path: Path | str, message: str, *, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


class RuncError(BuildError):
    """runc failed, or the builder exited with a non-zero status.

    ``exit_code`` is runc's exit status (128+N when the builder died of
    signal N); ``log_tail`` holds the last lines of the build log;
    ``runtime_signal`` the signal that killed the runtime itself (runc,
    bwrap), if one did.
    """

    def __init__(self, container_id: str, message: str, *, exit_code: int | None = None,
                 log_tail: str = "", runtime_signal: int | None = None) -> None:
        self.container_id = container_id
        self.exit_code = exit_code
        self.log_tail = log_tail
        self.runtime_signal = runtime_signal
        text = f"container {container_id}: {message}"
        if exit_code is not None:
            text += f" (exit code {exit_code})"
        if log_tail:
            text += "\n--- last lines of the build log ---\n" + _printable(log_tail)
        super().__init__(text)


def _printable(text: str) -> str:
    """The builder's text with control characters but newline and tab escaped:
    an error message printed on a terminal cannot move its cursor or forge lines."""
    return "".join(c if c in "\n\t" or (c >= " " and c != "\x7f") else f"\\x{ord(c):02x}"
                   for c in text)


class RuncTimeoutError(RuncError, TimeoutError):
    """The builder did not finish within its timeout and was killed."""

    def __init__(self, container_id: str, timeout: float, *, log_tail: str = "") -> None:
        self.timeout = timeout
        super().__init__(container_id, f"killed after the timeout of {timeout:g} s",
                         log_tail=log_tail)


class OutputError(BuildError):
    """An output of the request is missing after the build, or cannot be ingested."""

    def __init__(self, output: str, message: str) -> None:
        self.output = output
        super().__init__(f"output {output!r}: {message}")


class BuildFailed(BuildError):
    """A build did not succeed. ``stage`` is where it failed, when one did."""

    def __init__(self, key: str, message: str, *, stage: str | None = None,
                 run_dir: Path | None = None) -> None:
        self.key = key
        self.stage = stage
        self.run_dir = run_dir
        self.message = message
        where = f" at stage {stage}" if stage else ""
        run = f" (run {run_dir.name})" if run_dir is not None else ""
        super().__init__(f"build failed{where}{run}: {message}")


class ServiceError(BuildError):
    """A build service cannot be opened or used."""

    def __init__(self, address: str, message: str) -> None:
        self.address = address
        super().__init__(f"build service {address}: {message}")


def cause_of(exc: BaseException, kind: type[_E] | tuple[type[_E], ...],
             *, depth: int = 8) -> _E | None:
    """The first of ``exc`` and its ``__cause__`` chain that is a ``kind``
    (at most ``depth`` links down: a failed stage wraps what it raised)."""
    cause: BaseException | None = exc
    for _ in range(depth):
        if cause is None:
            return None
        if isinstance(cause, kind):
            return cause
        cause = cause.__cause__
    return None

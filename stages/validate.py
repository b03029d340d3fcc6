"""The validate stage: every rule of PROTOCOL.md, plus the sandbox's safety rules.

:func:`validate_request` raises :class:`stages.errors.RequestError` on the
first broken rule, naming the field (``outputs[2]``,
``constraints.available_ro_paths[0]``) and the rule (a stable identifier, see
``RULES``). It is pure: it never touches the disk, so a refused request leaves
nothing behind.

The container's filesystem is the *build root*: a read-only root, with the
scratch paths mounted writable on it, each input mounted read-only at
``inputs_dir/<name>``, and each available_ro_path mounted read-only at the
same absolute path. The safety rules keep every path inside that root and keep
the mounts from hiding one another.

Caveats:

- "Sorted" means strictly increasing bytewise (UTF-8 order equals code point
  order), so a duplicate is reported as ``unique``, a misordering as
  ``sorted``.
- The first path components ``proc``, ``dev``, ``sys`` and ``tmp`` belong to
  the sandbox (its own mounts), and so do ``etc/passwd``, ``etc/group``,
  ``etc/hosts``, ``etc/resolv.conf``, ``etc/services`` and ``bin/sh``; a
  request path on or above them is refused (``path-reserved``).
- An empty refscan needle would match every output, so it is refused.
- Env values may hold any bytes but NUL (execve cannot pass it); whether a
  value can be expressed in config.json is the spec stage's concern.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stages.castore.errors import ValidationError
from stages.castore.nodes import validate_name
from stages.context import (
    BuildHost,
    BuildSpec,
    StageContext,
    request_from_result,
    request_to_result,
)
from stages.errors import RequestError
from stages.oci.layout import is_under, longest_scratch_prefix
from stages.policy import check_request
from stages.request import BuildRequest

__all__ = ["RESERVED_FILES", "RESERVED_TOP", "RULES", "is_under", "longest_scratch_prefix",
           "stage", "validate_request"]

#: First path components owned by the sandbox's own mounts.
RESERVED_TOP = frozenset({"proc", "dev", "sys", "tmp"})
#: Files the sandbox provides itself.
RESERVED_FILES = ("etc/passwd", "etc/group", "etc/hosts", "etc/resolv.conf", "etc/services",
                  "bin/sh")
MAX_COMPONENT = 255
MAX_PATH = 4095

RULES = {
    "args-empty": "command_args needs at least the builder",
    "arg-empty": "the builder (command_args[0]) must not be empty",
    "nul": "strings must not contain NUL",
    "path-empty": "a path must not be empty",
    "path-absolute": "a path relative to the build root must not start with '/'",
    "path-relative": "an available_ro_path must be absolute",
    "path-clean": "no '.', '..' or empty components and no trailing '/'",
    "path-too-long": "components at most 255 bytes, paths at most 4095",
    "path-reserved": "the path belongs to the sandbox itself",
    "sorted": "the list must be sorted bytewise",
    "unique": "the list must not hold the same entry twice",
    "input-name": "an input needs a valid, non-empty name",
    "env-key": "an env key is non-empty without '=' or NUL",
    "system-empty": "constraints.system must be non-empty when constraints are present",
    "output-outside-scratch": "an output must lie inside a scratch path",
    "collision": "two things would occupy the same place in the build root",
    "needle-empty": "a refscan needle must not be empty",
    "exec-string-too-long": "an argument or KEY=VALUE is at most 128 KiB (the kernel's "
                            "MAX_ARG_STRLEN)",
    "exec-too-big": "arguments and environment together within execve's limit",
}

#: The kernel's limit on one argument or environment string, NUL included
#: (MAX_ARG_STRLEN: 32 pages).
MAX_EXEC_STRING = 32 * 4096
#: What arguments and environment may take together: execve's limit with the
#: default 8 MiB stack (a quarter of it), less room for the pointers, the
#: loader's auxiliary vector and what runc adds.
MAX_EXEC_TOTAL = (2 << 20) - (64 << 10)


def _fail(field: str, rule: str, message: str) -> RequestError:
    return RequestError(field, rule, message)


def _check_string(field: str, value: str) -> None:
    if "\0" in value:
        raise _fail(field, "nul", f"{value!r} contains NUL")


def _check_components(field: str, value: str, parts: Sequence[str]) -> None:
    if any(p in ("", ".", "..") for p in parts):
        raise _fail(field, "path-clean",
                    f"{value!r} is not a clean path (no '.', '..' or empty components, "
                    f"no trailing '/')")
    if len(value.encode()) > MAX_PATH or any(len(p.encode()) > MAX_COMPONENT for p in parts):
        raise _fail(field, "path-too-long", f"{value[:80]!r}... exceeds the path length limits")


def check_relative_path(field: str, value: str) -> None:
    """A clean path relative to the build root, clear of the sandbox's own paths."""
    _check_string(field, value)
    if not value:
        raise _fail(field, "path-empty", "the path must not be empty")
    if value.startswith("/"):
        raise _fail(field, "path-absolute",
                    f"{value!r} must be relative to the build root, without a leading '/'")
    parts = value.split("/")
    _check_components(field, value, parts)
    if parts[0] in RESERVED_TOP:
        raise _fail(field, "path-reserved",
                    f"{value!r} lies in /{parts[0]}, which the sandbox mounts itself")
    for reserved in RESERVED_FILES:
        if is_under(reserved, value):
            raise _fail(field, "path-reserved",
                        f"{value!r} would cover /{reserved}, which the sandbox provides")


def check_absolute_path(field: str, value: str) -> None:
    _check_string(field, value)
    if not value:
        raise _fail(field, "path-empty", "the path must not be empty")
    if not value.startswith("/"):
        raise _fail(field, "path-relative", f"{value!r} must be an absolute path")
    if value == "/":
        raise _fail(field, "path-reserved", "the root itself cannot be mounted read-only")
    parts = value[1:].split("/")
    _check_components(field, value, parts)
    if parts[0] in RESERVED_TOP:
        raise _fail(field, "path-reserved",
                    f"{value!r} lies in /{parts[0]}, which the sandbox mounts itself")
    for reserved in RESERVED_FILES:
        if is_under(reserved, value[1:]):
            raise _fail(field, "path-reserved",
                        f"{value!r} would cover /{reserved}, which the sandbox provides")


def _check_sorted_unique(field: str, keys: Sequence) -> None:
    for i in range(1, len(keys)):
        if keys[i] == keys[i - 1]:
            raise _fail(f"{field}[{i}]", "unique", f"{keys[i]!r} appears twice")
        if keys[i] < keys[i - 1]:
            raise _fail(f"{field}[{i}]", "sorted",
                        f"{keys[i]!r} comes after {keys[i - 1]!r}; the list must be "
                        f"sorted bytewise")


def validate_request(req: BuildRequest) -> BuildRequest:
    """Check every rule; return the request unchanged, or raise RequestError."""
    # command_args
    if not req.command_args:
        raise _fail("command_args", "args-empty", "the request names no builder")
    if not req.command_args[0]:
        raise _fail("command_args[0]", "arg-empty", "the builder path is empty")
    for i, arg in enumerate(req.command_args):
        _check_string(f"command_args[{i}]", arg)

    # paths, each on its own
    check_relative_path("working_dir", req.working_dir)
    if req.inputs or req.inputs_dir:
        check_relative_path("inputs_dir", req.inputs_dir)
    for i, p in enumerate(req.scratch_paths):
        check_relative_path(f"scratch_paths[{i}]", p)
    for i, p in enumerate(req.outputs):
        check_relative_path(f"outputs[{i}]", p)
    for i, f in enumerate(req.additional_files):
        check_relative_path(f"additional_files[{i}].path", f.path)

    # inputs: named, sorted, unique
    for i, node in enumerate(req.inputs):
        try:
            validate_name(node.name)
        except ValidationError as exc:
            raise _fail(f"inputs[{i}]", "input-name", str(exc)) from exc
        try:
            node.name.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(f"inputs[{i}]", "input-name",
                        f"{node.name!r} is not UTF-8; it becomes a path in config.json") from None
    _check_sorted_unique("inputs", [n.name for n in req.inputs])

    _check_sorted_unique("scratch_paths", [p.encode() for p in req.scratch_paths])
    _check_sorted_unique("outputs", [p.encode() for p in req.outputs])

    # environment
    for i, env in enumerate(req.environment_vars):
        if not env.key or "=" in env.key or "\0" in env.key:
            raise _fail(f"environment_vars[{i}].key", "env-key",
                        f"{env.key!r}: an env key must be non-empty, without '=' or NUL")
        if b"\0" in env.value:
            raise _fail(f"environment_vars[{i}].value", "nul",
                        f"the value of {env.key} contains NUL, which execve cannot pass")
    _check_sorted_unique("environment_vars", [e.key.encode() for e in req.environment_vars])
    _check_exec_size(req)

    # constraints
    c = req.constraints
    if c is not None:
        if not c.system:
            raise _fail("constraints.system", "system-empty",
                        "constraints are present, so system must name a platform")
        _check_string("constraints.system", c.system)
        for i, p in enumerate(c.available_ro_paths):
            check_absolute_path(f"constraints.available_ro_paths[{i}]", p)
        _check_sorted_unique("constraints.available_ro_paths",
                             [p.encode() for p in c.available_ro_paths])

    for i, needle in enumerate(req.refscan_needles):
        _check_string(f"refscan_needles[{i}]", needle)
        if not needle:
            raise _fail(f"refscan_needles[{i}]", "needle-empty",
                        "an empty needle would match every output")

    _check_layout(req)
    return req


def _check_exec_size(req: BuildRequest) -> None:
    """What execve(2) can pass: refused here, not as E2BIG inside runc."""
    total = 0
    strings = [(f"command_args[{i}]", a.encode()) for i, a in enumerate(req.command_args)]
    strings += [(f"environment_vars[{i}].value", e.key.encode() + b"=" + e.value)
                for i, e in enumerate(req.environment_vars)]
    for field, data in strings:
        size = len(data) + 1
        if size > MAX_EXEC_STRING:
            raise _fail(field, "exec-string-too-long",
                        f"{size} bytes; execve passes at most {MAX_EXEC_STRING} per string "
                        f"(pass large data as a file: additional_files)")
        total += size + 8  # and its pointer
    if total > MAX_EXEC_TOTAL:
        raise _fail("command_args", "exec-too-big",
                    f"arguments and environment take {total} bytes; execve passes at most "
                    f"{MAX_EXEC_TOTAL} (pass large data as files: additional_files)")


def _check_layout(req: BuildRequest) -> None:
    """Where things land in the build root: outputs in scratch, no mount hides another."""
    scratch = list(req.scratch_paths)
    inputs = [(f"inputs[{i}]", f"{req.inputs_dir}/{n.name.decode('utf-8', 'surrogateescape')}")
              for i, n in enumerate(req.inputs)]
    ro = [(f"constraints.available_ro_paths[{i}]", p[1:])
          for i, p in enumerate(req.available_ro_paths)]

    # A scratch path must not lie in or under a read-only input (nothing can be
    # mounted there, and the input would hide it).
    for i, s in enumerate(scratch):
        for field, place in inputs:
            if is_under(s, place):
                raise _fail(f"scratch_paths[{i}]", "collision",
                            f"{s!r} lies in /{place}, the read-only mount of {field}")

    # A read-only path must not hide a scratch path or an input, nor lie in an input.
    for rfield, rplace in ro:
        for i, s in enumerate(scratch):
            if is_under(s, rplace):
                raise _fail(rfield, "collision",
                            f"/{rplace} would hide the scratch path {s!r} (scratch_paths[{i}])")
        for ifield, iplace in inputs:
            if is_under(iplace, rplace) or is_under(rplace, iplace):
                raise _fail(rfield, "collision",
                            f"/{rplace} overlaps /{iplace}, where {ifield} is mounted")

    for i, out in enumerate(req.outputs):
        if longest_scratch_prefix(out, scratch) is None:
            raise _fail(f"outputs[{i}]", "output-outside-scratch",
                        f"{out!r} lies in none of the scratch paths {scratch}; it could not "
                        f"be written")
        for field, place in inputs + ro:
            if is_under(out, place):
                raise _fail(f"outputs[{i}]", "collision",
                            f"{out!r} lies in /{place}, mounted read-only for {field}")

    # Additional files: not in a read-only place, not on top of a mount point,
    # not above one another.
    paths = [f.path for f in req.additional_files]
    for i, p in enumerate(paths):
        field = f"additional_files[{i}].path"
        for ofield, place in inputs + ro:
            if is_under(p, place):
                raise _fail(field, "collision",
                            f"{p!r} lies in /{place}, mounted read-only for {ofield}")
            if is_under(place, p):
                raise _fail(field, "collision",
                            f"{p!r} would stand where /{place} is mounted for {ofield}")
        for j, s in enumerate(scratch):
            if is_under(s, p):
                raise _fail(field, "collision",
                            f"{p!r} would stand where the scratch path {s!r} "
                            f"(scratch_paths[{j}]) is mounted")
        if is_under(req.working_dir, p):
            raise _fail(field, "collision",
                        f"{p!r} would stand where the working directory "
                        f"{req.working_dir!r} must be")
        if req.inputs_dir and is_under(req.inputs_dir, p):
            raise _fail(field, "collision",
                        f"{p!r} would stand where inputs_dir {req.inputs_dir!r} must be")
        for j, q in enumerate(paths):
            if i != j and is_under(q, p):
                what = "twice" if p == q else f"above additional_files[{j}] {q!r}"
                rule = "unique" if p == q else "collision"
                raise _fail(field, rule, f"{p!r} is written {what}")


async def stage(build: BuildSpec, host: BuildHost, ctx: StageContext) -> dict[str, Any]:
    """Pipeline stage: refuse a bad request before anything touches the disk.

    A request made by another stage (``build.request_from``) is taken from
    that stage's result and kept in this one's, for the stages after it.
    """
    if build.request is not None:
        req = validate_request(build.request)
        check_request(req, host.policy)
        return {"inputs": len(req.inputs), "outputs": list(req.outputs),
                "command": list(req.command_args)}
    assert build.request_from is not None  # a BuildSpec holds a request or request_from
    req = validate_request(request_from_result(ctx.results[build.request_from]))
    check_request(req, host.policy)
    return {"inputs": len(req.inputs), "outputs": list(req.outputs),
            "command": list(req.command_args), "request": request_to_result(req)}

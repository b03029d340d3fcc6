"""A Nix derivation as a tvix BuildRequest (PROTOCOL.md, "Nix derivations as build requests").

:func:`derivation_to_request` makes the request whose sandbox looks to the
builder as Nix 2.8's sandbox does here (``sandbox = true``, no
``sandbox-paths``), so that the same derivation gives the same bytes:

- ``command_args`` = builder + args; working dir ``build`` (/build);
  scratch paths ``build`` and ``nix/store``; inputs under ``nix/store``,
  each named by its store path's basename, sorted by name; outputs are the
  output paths without their leading ``/``, sorted (``output_names`` says
  which output each is).
- The environment is built the way Nix 2.8's ``initEnv`` builds it
  (libstore/build/local-derivation-goal.cc), in this order, later writes
  winning: PATH=/path-not-set, HOME=/homeless-shelter, NIX_STORE=/nix/store,
  NIX_BUILD_CORES; then the derivation's env (so a derivation may override
  those four); then NIX_BUILD_TOP, TMPDIR, TEMPDIR, TMP, TEMP and PWD (all
  /build); then, for fixed-output derivations only, NIX_OUTPUT_CHECKED=1 and
  the ``impureEnvVars`` (from ``impure_env``); then NIX_LOG_FD=2 and
  TERM=xterm-256color. The derivation cannot override those last ones.
- ``passAsFile`` (whitespace-separated names): each named variable of the
  env is not set; its value goes to ``/build/.attr-<nixbase32 sha256 of the
  name>`` (an additional file ``build/.attr-...``) and ``<name>Path`` points
  to it.
- Constraints: the derivation's system; no /bin/sh (Nix 2.8 here has empty
  ``sandbox-paths``); network only for a fixed-output derivation.
- Reference-scan needles, in this order (``needle_paths[i]`` is the store
  path of needle ``i``): the hash part of each output path, in the order of
  ``request.outputs``; then of each input, in the order of
  ``request.inputs`` (sorted by basename).

Inputs: ``inputs`` maps store paths to castore nodes (whatever their name;
they are renamed to the basename). It must hold every input source and
every used output of every input derivation (the output paths are read
from the input derivations themselves, through ``read_drv``). It may hold
more: Nix mounts the whole closure of the inputs into its sandbox and scans
outputs for references to all of it, so a caller that knows the closure
passes it, and every entry becomes an input and a needle.

Caveats:

- Refused with :class:`UnsupportedDerivation`: structured attributes
  (``__json``), outputs without a path (floating content-addressed,
  deferred or impure outputs), ``__noChroot`` (Nix 2.8 with ``sandbox =
  true`` refuses it as well).
- Ignored, as Nix 2.8 on Linux ignores them in the sandbox or handles them
  elsewhere: ``__impureHostDeps``, ``__sandboxProfile``,
  ``__darwinAllowLocalNetworking`` (Darwin only); ``requiredSystemFeatures``,
  ``preferLocalBuild`` (for the caller). ``allowedReferences`` and the other
  output checks are not part of the request: the Nix builder enforces them
  on the outputs (:func:`stages.nix.build.check_references`).
- ``impureEnvVars`` of a fixed-output derivation take their values from
  ``impure_env`` (Nix takes them from its own environment); a name missing
  there is set to the empty string, as Nix does.
- ``cores=0`` gives NIX_BUILD_CORES = ``os.cpu_count()``, which is what Nix's
  default ``cores`` setting prints on this machine.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence

import attrs

from stages.castore import nixbase32
from stages.castore.nodes import Node
from stages.nix.derivation import Derivation, read_derivation
from stages.nix.errors import MissingInputError, NixError, UnsupportedDerivation
from stages.nix.storepath import STORE_DIR, basename, check_store_path, hash_part
from stages.request import AdditionalFile, BuildConstraints, BuildRequest, EnvVar

__all__ = ["BUILD_DIR", "DerivationRequest", "attr_file_name", "derivation_to_request",
           "sandbox_environment"]

#: Where the builder runs, inside the sandbox (Nix's ``sandbox-build-dir``).
BUILD_DIR = "/build"
HOME_DIR = "/homeless-shelter"
_WHITESPACE = " \t\n\r"


@attrs.frozen(kw_only=True)
class DerivationRequest:
    """The request for a derivation, and how to read its result back.

    ``needle_paths[i]`` is the store path whose hash part is
    ``request.refscan_needles[i]``; ``output_names[i]`` is the output name of
    ``request.outputs[i]``.
    """

    request: BuildRequest
    needle_paths: tuple[str, ...]
    output_names: tuple[str, ...]


def attr_file_name(name: str) -> str:
    """The file Nix 2.8 writes a passAsFile variable to: ``.attr-`` + base32 sha256 of the name."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    return ".attr-" + nixbase32.encode(digest)


def _tokens(value: str) -> list[str]:
    """Nix's ``tokenizeString``: split on space, tab, newline, CR; no empty tokens."""
    for sep in _WHITESPACE[1:]:
        value = value.replace(sep, " ")
    return [t for t in value.split(" ") if t]


def _describe(drv: Derivation) -> str:
    return f"derivation {drv.name!r}" if drv.name else "derivation"


def sandbox_environment(drv: Derivation, *, cores: int = 0,
                        impure_env: Mapping[str, str] | None = None
                        ) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The builder's environment and passAsFile files ``(file name, contents)``.

    See the module docstring for the order in which variables are set.
    """
    if "__json" in drv.env:
        raise UnsupportedDerivation(_describe(drv), "structured-attrs",
                                    "derivations with structured attributes (__json, "
                                    "__structuredAttrs = true) are not supported yet")
    if cores < 0:
        raise ValueError(f"cores must be >= 0, not {cores}")
    env: dict[str, str] = {
        "PATH": "/path-not-set",
        "HOME": HOME_DIR,
        "NIX_STORE": STORE_DIR,
        "NIX_BUILD_CORES": str(cores or os.cpu_count() or 1),
    }
    files: list[tuple[str, str]] = []
    pass_as_file = set(_tokens(drv.env.get("passAsFile", "")))
    for key, value in drv.env.items():  # sorted, as Nix's std::map iterates
        if key in pass_as_file:
            name = attr_file_name(key)
            files.append((name, value))
            env[key + "Path"] = f"{BUILD_DIR}/{name}"
        else:
            env[key] = value
    for key in ("NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"):
        env[key] = BUILD_DIR
    if drv.is_fixed_output:
        env["NIX_OUTPUT_CHECKED"] = "1"
        impure = impure_env or {}
        for key in _tokens(drv.env.get("impureEnvVars", "")):
            env[key] = impure.get(key, "")
    env["NIX_LOG_FD"] = "2"
    env["TERM"] = "xterm-256color"
    return env, files


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def derivation_to_request(drv: Derivation, inputs: Mapping[str, Node], *, cores: int = 0,
                          impure_env: Mapping[str, str] | None = None,
                          read_drv: Callable[[str], Derivation] = read_derivation,
                          sandbox_paths: Sequence[str] = ()) -> DerivationRequest:
    """The BuildRequest for ``drv``; see the module docstring for every rule.

    ``inputs``: store path -> castore node, for at least every input source
    and every used output of every input derivation (MissingInputError names
    the first one missing). ``read_drv`` reads an input derivation by its
    .drv path (default: from the file system), to learn its output paths.
    ``sandbox_paths`` are the targets of nix.conf's sandbox paths
    (:mod:`stages.nix.config`): read-only paths of every build, as Nix binds them;
    /bin/sh among them is the sandbox's own (``provide_bin_sh``).
    """
    what = _describe(drv)
    if drv.env.get("__noChroot") == "1":
        raise UnsupportedDerivation(what, "__noChroot",
                                    "__noChroot asks to build outside the sandbox; ocibuild "
                                    "always sandboxes (as Nix does with sandbox = true)")
    outputs: list[tuple[str, str]] = []
    for name, out in drv.outputs.items():
        if not out.path:
            raise UnsupportedDerivation(what, "floating-ca",
                                        f"output {name!r} has no store path (a floating "
                                        "content-addressed, deferred or impure output); "
                                        "not supported")
        outputs.append((check_store_path(out.path), name))
    outputs.sort(key=lambda po: _bytes(po[0]))
    output_paths = {p for p, _ in outputs}

    # The inputs the derivation names directly: every one must be given.
    required: list[tuple[str, str]] = [(src, f"input source {src}") for src in drv.input_srcs]
    for drv_path, names in drv.input_drvs.items():
        try:
            input_drv = read_drv(drv_path)
        except NixError as exc:
            raise MissingInputError(drv_path, f"{what}: cannot read its input derivation "
                                              f"{drv_path}: {exc}") from exc
        for out_name in names:
            input_out = input_drv.outputs.get(out_name)
            if input_out is None:
                raise NixError(f"{what}: input derivation {drv_path} has no output "
                               f"{out_name!r} (it has {', '.join(input_drv.outputs)})")
            if not input_out.path:
                raise UnsupportedDerivation(what, "floating-ca",
                                            f"output {out_name!r} of input derivation "
                                            f"{drv_path} has no store path; not supported")
            required.append((input_out.path, f"{input_out.path}, output {out_name!r} of input "
                                             f"derivation {drv_path}"))
    for path, description in required:
        if path not in inputs:
            raise MissingInputError(path, f"{what}: no castore node given for {description}")

    nodes: dict[str, Node] = {}
    for path, node in inputs.items():
        name = basename(path)
        if path in output_paths:
            raise NixError(f"{what}: {path} is both an output and an input")
        nodes[name] = node.renamed(name.encode())
    input_names = sorted(nodes, key=_bytes)

    env, files = sandbox_environment(drv, cores=cores, impure_env=impure_env)
    for key in env:
        if not key or "=" in key or "\0" in key:
            raise UnsupportedDerivation(what, "env-key",
                                        f"environment variable name {key!r} cannot be passed "
                                        "to a builder (empty, or holds '=' or NUL)")
    needle_paths = [p for p, _ in outputs] + [f"{STORE_DIR}/{n}" for n in input_names]
    request = BuildRequest(
        inputs=[nodes[n] for n in input_names],
        command_args=[drv.builder, *drv.args],
        working_dir=BUILD_DIR.lstrip("/"),
        scratch_paths=[BUILD_DIR.lstrip("/"), STORE_DIR.lstrip("/")],
        inputs_dir=STORE_DIR.lstrip("/"),
        outputs=[p.lstrip("/") for p, _ in outputs],
        environment_vars=[EnvVar(key=k, value=_bytes(v))
                          for k, v in sorted(env.items(), key=lambda kv: _bytes(kv[0]))],
        constraints=BuildConstraints(system=drv.system, network_access=drv.is_fixed_output,
                                     provide_bin_sh="/bin/sh" in sandbox_paths,
                                     available_ro_paths=sorted(set(sandbox_paths) - {"/bin/sh"},
                                                               key=_bytes)),
        additional_files=[AdditionalFile(path=f"{BUILD_DIR.lstrip('/')}/{name}",
                                         contents=_bytes(value))
                          for name, value in sorted(files)],
        refscan_needles=[hash_part(p) for p in needle_paths],
    )
    return DerivationRequest(request=request, needle_paths=tuple(needle_paths),
                             output_names=tuple(n for _, n in outputs))

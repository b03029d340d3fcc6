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
- ``exportReferencesGraph`` (pairs ``name path``): /build/``name`` holds the
  closure of ``path`` (an input; with the outputs of each .drv in it) as
  ``nix-store --register-validity`` reads it, derivers left empty.
- Structured attributes (``__json``, from ``__structuredAttrs = true``):
  none of the derivation's environment is passed (nor passAsFile or
  exportReferencesGraph files); /build/.attrs.json and /build/.attrs.sh
  are written and NIX_ATTRS_JSON_FILE / NIX_ATTRS_SH_FILE set, all as Nix
  2.8 does (:mod:`stages.nix.structured`); ``impureEnvVars`` is read from
  the JSON.
- Output placeholders (``builtins.placeholder``) become the output paths in
  the arguments, the environment and every file above.
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

- Refused with :class:`UnsupportedDerivation`: ``exportReferencesGraph``
  with structured attributes (Nix puts content addresses into the JSON,
  which ocibuild's path info does not keep), outputs without a path
  (floating content-addressed, deferred or impure outputs), ``__noChroot``
  (Nix 2.8 with ``sandbox = true`` refuses it as well).
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
import re
from collections.abc import Callable, Mapping, Sequence

import attrs

from stages.castore import nixbase32
from stages.castore.nodes import Node
from stages.nix.derivation import Derivation, read_derivation
from stages.nix.errors import MissingInputError, NixError, UnsupportedDerivation
from stages.nix.storepath import STORE_DIR, basename, check_store_path, hash_part
from stages.nix.structured import (
    ATTRS_JSON,
    ATTRS_SH,
    attrs_file_vars,
    attrs_shell,
    dump_json,
    hash_placeholder,
    parse_json,
    rewrite,
)
from stages.request import AdditionalFile, BuildConstraints, BuildRequest, EnvVar

__all__ = ["BUILD_DIR", "DerivationRequest", "attr_file_name", "derivation_to_request",
           "output_rewrites", "sandbox_environment", "structured_attrs"]

#: Where the builder runs, inside the sandbox (Nix's ``sandbox-build-dir``).
BUILD_DIR = "/build"
HOME_DIR = "/homeless-shelter"
_WHITESPACE = " \t\n\r"
_EXPORT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


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


def _strings_attr(drv: Derivation, attrs: Mapping[str, object] | None, name: str) -> list[str]:
    """Nix's ``getStringsAttr``: a JSON list of strings, or the env value's tokens."""
    if attrs is None:
        return _tokens(drv.env.get(name, ""))
    value = attrs.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NixError(f"attribute '{name}' of {_describe(drv)} must be a list of strings")
    return value


def structured_attrs(drv: Derivation) -> dict[str, object] | None:
    """The derivation's structured attributes (``__json``), or None without them."""
    if "__json" not in drv.env:
        return None
    try:
        return parse_json(drv.env["__json"])
    except ValueError as exc:
        raise NixError(f"cannot process __json attribute of {_describe(drv)}: {exc}") from exc


def _export_graphs(drv: Derivation, references: Mapping[str, Sequence[str]] | None,
                   read_drv: Callable[[str], Derivation]) -> list[tuple[str, str]]:
    """The files of a (non-structured) ``exportReferencesGraph``, as Nix 2.8 writes them.

    Each pair ``name path`` gives /build/``name``: the closure of ``path``
    (which must be an input), with the outputs of every .drv in it, in
    ``nix-store --register-validity`` form without derivers.
    """
    tokens = _tokens(drv.env.get("exportReferencesGraph", ""))
    if not tokens:
        return []
    what = _describe(drv)
    if len(tokens) % 2:
        raise NixError(f"{what}: odd number of tokens in 'exportReferencesGraph': "
                       f"{drv.env['exportReferencesGraph']!r}")
    if references is None:
        raise UnsupportedDerivation(what, "exportReferencesGraph",
                                    "exportReferencesGraph needs the references of the inputs' "
                                    "closure, and none were given")

    def closure(start: str, into: set[str]) -> None:
        todo = [start]
        while todo:
            path = todo.pop()
            if path in into:
                continue
            if path not in references:
                raise MissingInputError(path, f"{what}: exportReferencesGraph reaches {path}, "
                                              "which is not in the inputs' closure")
            into.add(path)
            todo.extend(references[path])

    files: dict[str, str] = {}  # a name given twice: the last pair wins, as in Nix
    for name, target in zip(tokens[::2], tokens[1::2]):
        if not _EXPORT_NAME.fullmatch(name):
            raise NixError(f"{what}: invalid file name {name!r} in 'exportReferencesGraph'")
        if not target.startswith(STORE_DIR + "/"):
            raise NixError(f"{what}: 'exportReferencesGraph' contains a non-store path "
                           f"{target!r}")
        path = check_store_path("/".join(target.split("/")[:4]))
        if path not in references:
            raise NixError(f"{what}: cannot export references of path '{path}' because it is "
                           "not in the input closure of the derivation")
        paths: set[str] = set()
        closure(path, paths)
        for p in [p for p in paths if p.endswith(".drv")]:
            for out in read_drv(p).outputs.values():
                if not out.path:
                    raise UnsupportedDerivation(what, "floating-ca",
                                                f"exportReferencesGraph of {p}, whose outputs "
                                                "have no store path")
                closure(out.path, paths)
        text = "".join(f"{p}\n\n{len(references[p])}\n" + "".join(f"{r}\n" for r in
                                                                  sorted(references[p]))
                       for p in sorted(paths))
        files[name] = text
    return list(files.items())


def sandbox_environment(drv: Derivation, *, cores: int = 0,
                        impure_env: Mapping[str, str] | None = None,
                        references: Mapping[str, Sequence[str]] | None = None,
                        read_drv: Callable[[str], Derivation] = read_derivation,
                        ) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The builder's environment and the files Nix writes into /build ``(name, contents)``.

    See the module docstring for the order in which variables are set.
    ``references`` (store path -> its references, for the inputs' closure)
    is needed only for ``exportReferencesGraph``. Output placeholders are
    rewritten to the output paths in values and files.
    """
    if cores < 0:
        raise ValueError(f"cores must be >= 0, not {cores}")
    attrs = structured_attrs(drv)
    env: dict[str, str] = {
        "PATH": "/path-not-set",
        "HOME": HOME_DIR,
        "NIX_STORE": STORE_DIR,
        "NIX_BUILD_CORES": str(cores or os.cpu_count() or 1),
    }
    files: list[tuple[str, str]] = []
    if attrs is None:
        pass_as_file = set(_tokens(drv.env.get("passAsFile", "")))
        for key, value in drv.env.items():  # sorted, as Nix's std::map iterates
            if key in pass_as_file:
                name = attr_file_name(key)
                files.append((name, value))
                env[key + "Path"] = f"{BUILD_DIR}/{name}"
            else:
                env[key] = value
        files += _export_graphs(drv, references, read_drv)
    for key in ("NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"):
        env[key] = BUILD_DIR
    if drv.is_fixed_output:
        env["NIX_OUTPUT_CHECKED"] = "1"
        impure = impure_env or {}
        for key in _strings_attr(drv, attrs, "impureEnvVars"):
            env[key] = impure.get(key, "")
    env["NIX_LOG_FD"] = "2"
    env["TERM"] = "xterm-256color"
    if attrs is not None:
        if isinstance(attrs.get("exportReferencesGraph"), dict):
            raise UnsupportedDerivation(_describe(drv), "structured-exportReferencesGraph",
                                        "exportReferencesGraph with structured attributes "
                                        "needs content-address info ocibuild does not keep")
        attrs["outputs"] = {name: hash_placeholder(name) for name in drv.outputs}
        try:
            files += [(ATTRS_SH, attrs_shell(attrs)), (ATTRS_JSON, dump_json(attrs))]
        except ValueError as exc:
            raise NixError(f"cannot process __json attribute of {_describe(drv)}: {exc}") from exc
        env.update(attrs_file_vars(drv.name))
    rewrites = output_rewrites(drv)
    env = {rewrite(k, rewrites): rewrite(v, rewrites) for k, v in env.items()}
    files = [(name, rewrite(text, rewrites)) for name, text in files]
    return env, files


def output_rewrites(drv: Derivation) -> dict[str, str]:
    """Each output's placeholder -> its path (Nix's ``inputRewrites`` of a local build)."""
    return {hash_placeholder(name): out.path for name, out in drv.outputs.items() if out.path}


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def derivation_to_request(drv: Derivation, inputs: Mapping[str, Node], *, cores: int = 0,
                          impure_env: Mapping[str, str] | None = None,
                          read_drv: Callable[[str], Derivation] = read_derivation,
                          sandbox_paths: Sequence[str] = (),
                          references: Mapping[str, Sequence[str]] | None = None
                          ) -> DerivationRequest:
    """The BuildRequest for ``drv``; see the module docstring for every rule.

    ``inputs``: store path -> castore node, for at least every input source
    and every used output of every input derivation (MissingInputError names
    the first one missing). ``read_drv`` reads an input derivation by its
    .drv path (default: from the file system), to learn its output paths.
    ``sandbox_paths`` are the targets of nix.conf's sandbox paths
    (:mod:`stages.nix.config`): read-only paths of every build, as Nix binds them;
    /bin/sh among them is the sandbox's own (``provide_bin_sh``).
    ``references`` maps each path of ``inputs`` to its references; only
    ``exportReferencesGraph`` needs it.
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

    env, files = sandbox_environment(drv, cores=cores, impure_env=impure_env,
                                     references=references, read_drv=read_drv)
    for key in env:
        if not key or "=" in key or "\0" in key:
            raise UnsupportedDerivation(what, "env-key",
                                        f"environment variable name {key!r} cannot be passed "
                                        "to a builder (empty, or holds '=' or NUL)")
    needle_paths = [p for p, _ in outputs] + [f"{STORE_DIR}/{n}" for n in input_names]
    request = BuildRequest(
        inputs=[nodes[n] for n in input_names],
        command_args=[drv.builder, *(rewrite(a, output_rewrites(drv)) for a in drv.args)],
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

"""Building Nix derivations (.drv files) on the OCI build service, as ONE pipeline graph.

:func:`build_derivations` takes .drv store paths and:

1. reads their closure of input derivations (recursively);
2. keeps the derivations that must be built: a requested one, or an input of
   one that must be built, whose outputs are not all registered in the
   path-info database (:mod:`stages.nix.pathinfo`) with their castore node
   present;
3. imports the input sources of those from /nix/store into castore, with
   their reference closure, and registers them (references and NAR hash from
   Nix's own database, the NAR hash recomputed by us and checked against
   Nix's);
4. builds everything left as one graph: for each derivation, a stage
   ``<key>/request`` (after the ``<key>/register`` stages of its input
   derivations) makes its BuildRequest (:func:`stages.nix.to_request.
   derivation_to_request`, inputs: the reference closure of its input
   sources and used input outputs, as Nix mounts and scans it); the
   build's seven stages run under the prefix ``<key>``; a stage
   ``<key>/register`` checks a fixed output's hash, computes each output's
   NAR hash and size, turns the build's outputs_needles into references and
   registers every output in one transaction.

Independent derivations build concurrently, up to ``jobs`` containers. A
failing derivation fails itself and abandons its dependents; the others go on.

The run directory keeps the plan (:data:`PLAN_FILE`: the derivations, their
build keys, cores, sandbox paths), from which :func:`resume_derivations`
makes the same graph again and continues the run (``ocibuild resume``).

Results (:class:`DrvResult`, per requested .drv): ``built`` with every
output's path, NAR hash (``sha256:<nixbase32>``, as ``nix-store -q --hash``
prints it) and references (full store paths, self-references included), or
``failed`` with the reason.

Caveats:

- Keys are ``<hash prefix>-<name>-<token>``, the token the run id's: one per call keeps two
  processes building the same derivation on one state directory apart; the
  later one to register keeps the earlier one's registration (store paths are
  immutable).
- Input sources must be valid in the local Nix store (``nix-instantiate``
  puts them there). Nix's database is read directly (read-only SQLite,
  ``/nix/var/nix/db/db.sqlite``, or ``$NIX_STATE_DIR/db/db.sqlite``);
  without it, ``nix-store -q`` is asked, one process per path.
- Only the derivations' own outputs are registered; the .drv files are not
  imported (the derivation is read from /nix/store by path).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from stages.castore.hashes import format_sha256
from stages.nix.derivation import Derivation, read_derivation
from stages.nix.errors import NixError
from stages.nix.pathinfo import PathInfo, PathInfoDB, node_present
from stages.nix.storepath import check_store_path, hash_part, name_part

if TYPE_CHECKING:
    from pipeline import Graph, Run, Stage, Subscriber
    from stages.castore.addresses import Castore
    from stages.context import BuildHost, BuildSpec
    from stages.nix.to_request import DerivationRequest
    from stages.service import BuildService, OciBuildService

__all__ = ["PLAN_FILE", "DrvResult", "NixStoreError", "OutputResult", "build_derivations",
           "import_from_nix_store", "is_nix_run", "plan_runtime", "resume_derivations"]


class NixStoreError(NixError):
    """Nix's own store cannot tell us about a path (or disagrees with what we read)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


@attrs.frozen(kw_only=True)
class OutputResult:
    """One output of a built derivation."""

    path: str
    nar_hash: str
    references: tuple[str, ...]

    def to_json(self) -> dict:
        return {"path": self.path, "nar_hash": self.nar_hash,
                "references": list(self.references)}


@attrs.frozen(kw_only=True)
class DrvResult:
    """What became of one derivation: built (outputs) or failed (error).

    ``cached``: every output was registered before the call; nothing ran.
    ``kept``: with ``keep_failed``, the sandboxes the failure left to enter,
    as (drv path, run id, build key): the derivation's own, or its inputs'.
    """

    drv_path: str
    status: str  # "built" | "failed"
    outputs: Mapping[str, OutputResult] = attrs.field(factory=dict)
    error: str | None = None
    cached: bool = False
    kept: tuple[tuple[str, str, str], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "built"

    def to_json(self) -> dict:
        if self.ok:
            return {"status": "built",
                    "outputs": {n: o.to_json() for n, o in self.outputs.items()}}
        out: dict = {"status": "failed", "error": self.error or "failed"}
        if self.kept:
            out["kept"] = [{"drv": d, "run": r, "build": k} for d, r, k in self.kept]
        return out


def _result_from_pathinfo(drv_path: str, drv: Derivation, pathinfo: PathInfoDB, *,
                          cached: bool) -> DrvResult:
    outputs = {}
    for name, out in drv.outputs.items():
        info = pathinfo.get(out.path)
        outputs[name] = OutputResult(path=out.path, nar_hash=info.nar_hash,
                                     references=info.references)
    return DrvResult(drv_path=drv_path, status="built", outputs=outputs, cached=cached)


# --- Nix's own store: input sources -----------------------------------------------------


def _nix_db_path() -> Path:
    state = os.environ.get("NIX_STATE_DIR", "/nix/var/nix")
    return Path(state) / "db" / "db.sqlite"


class _NixStore:
    """References and NAR hashes of valid paths of the local Nix store."""

    def __init__(self) -> None:
        self._conn: sqlite3.Connection | None = None
        db = _nix_db_path()
        if db.exists():
            try:
                self._conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30,
                                             check_same_thread=False)
                self._conn.execute("SELECT 1 FROM ValidPaths LIMIT 1").fetchall()
            except sqlite3.Error:
                self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def query(self, path: str) -> tuple[list[str], bytes]:
        """(references, NAR sha256 digest) of a valid path."""
        if self._conn is not None:
            try:
                row = self._conn.execute("SELECT id, hash FROM ValidPaths WHERE path = ?",
                                         (path,)).fetchone()
                if row is None:
                    raise NixStoreError(path, "not a valid path of the local Nix store "
                                              f"({_nix_db_path()})")
                refs = [r for (r,) in self._conn.execute(
                    "SELECT v.path FROM Refs r JOIN ValidPaths v ON r.reference = v.id "
                    "WHERE r.referrer = ?", (row[0],))]
                return refs, _parse_nix_db_hash(path, row[1])
            except sqlite3.Error:
                pass  # fall back to asking nix-store
        return self._query_cli(path)

    @staticmethod
    def _query_cli(path: str) -> tuple[list[str], bytes]:
        from stages.castore.hashes import parse_sha256

        def ask(flag: str) -> str:
            try:
                proc = subprocess.run(["nix-store", "-q", flag, path], capture_output=True,
                                      text=True, timeout=60)
            except OSError as exc:
                raise NixStoreError(path, f"cannot run nix-store: {exc}") from exc
            if proc.returncode != 0:
                raise NixStoreError(path, f"nix-store -q {flag} failed: "
                                          f"{proc.stderr.strip() or proc.returncode}")
            return proc.stdout

        refs = ask("--references").split()
        return refs, parse_sha256(ask("--hash").strip())


def _parse_nix_db_hash(path: str, text: str) -> bytes:
    """Nix's ValidPaths.hash: ``sha256:<base16>`` (older) or ``sha256:<nixbase32>``."""
    from stages.castore.hashes import parse_sha256

    if not text.startswith("sha256:"):
        raise NixStoreError(path, f"Nix's database has a NAR hash {text!r} that is not sha256")
    body = text[len("sha256:"):]
    if len(body) == 64:
        return bytes.fromhex(body)
    return parse_sha256(text)


async def import_from_nix_store(castore: Castore, pathinfo: PathInfoDB,
                                paths: Iterable[str]) -> list[str]:
    """Import ``paths`` and their reference closure from /nix/store; return what was new.

    Each path not yet registered is ingested into castore, its NAR hash
    computed and checked against Nix's, and all of them are registered in
    one transaction. NixStoreError names a path Nix does not know, or whose
    NAR hash differs from Nix's.
    """
    from stages.castore.ingest import ingest_path
    from stages.castore.nar import nar_hash_and_size

    nix = await asyncio.to_thread(_NixStore)
    try:
        todo = [check_store_path(p) for p in paths]
        seen: set[str] = set()
        wanted: dict[str, list[str]] = {}
        expected: dict[str, bytes] = {}
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            if pathinfo.has(path):
                info = pathinfo.get(path)
                if await node_present(castore, info.node):
                    continue
                raise NixStoreError(path, "registered, but its castore node is missing from "
                                          "the store")
            refs, digest = await asyncio.to_thread(nix.query, path)
            wanted[path] = refs
            expected[path] = digest
            todo.extend(r for r in refs if r not in seen)
    finally:
        nix.close()
    infos = []
    for path, refs in wanted.items():
        node = await ingest_path(castore, path)
        digest, size = await nar_hash_and_size(castore, node)
        if digest != expected[path]:
            raise NixStoreError(path, f"NAR hash {format_sha256(digest)} as imported, but Nix "
                                      f"records {format_sha256(expected[path])}; the store "
                                      f"path was modified (nix-store --verify --check-contents)")
        infos.append(PathInfo(path=path, node=node, references=refs, nar_sha256=digest,
                              nar_size=size, deriver=None))
    await asyncio.to_thread(pathinfo.register, infos)
    return sorted(wanted)


# --- the plan ---------------------------------------------------------------------------

_KEY_JUNK = re.compile(r"[^A-Za-z0-9_.-]+")


def _key(drv_path: str, drv: Derivation | None, nonce: str) -> str:
    """``<hash prefix>-<name>-<nonce>``; the name from the path when ``drv`` is None."""
    name = (drv.name if drv is not None else "") or name_part(drv_path).removesuffix(".drv")
    return f"{hash_part(drv_path)[:8]}-{_KEY_JUNK.sub('_', name)[:40]}-{nonce}"


def last_log(state_dir: Path, drv_path: str) -> Path | None:
    """The builder log of ``drv_path``'s most recent build under a state directory
    (what ``ocibuild nix log`` prints), or None if it was never built there."""
    check_store_path(drv_path)
    if not drv_path.endswith(".drv"):
        raise NixError(f"{drv_path} is not a derivation (a .drv store path)")
    # The key's name part, from the path alone (the .drv itself may be gone).
    prefix = _key(drv_path, None, "")
    logs = [p for p in (state_dir / "runs").glob(f"*/logs/{prefix}*.log")
            if p.stem[len(prefix):].isalnum()]
    return max(logs, key=lambda p: p.stat().st_mtime, default=None)


@attrs.define
class _Plan:
    """Runtime state of one build_derivations call."""

    castore: Castore
    pathinfo: PathInfoDB
    drvs: dict[str, Derivation] = attrs.field(factory=dict)
    errors: dict[str, str] = attrs.field(factory=dict)          # drv -> why it cannot build
    to_build: list[str] = attrs.field(factory=list)             # dependencies first
    keys: dict[str, str] = attrs.field(factory=dict)
    requests: dict[str, DerivationRequest] = attrs.field(factory=dict)
    #: Targets of nix.conf's sandbox paths, read-only in every build.
    sandbox_paths: tuple[str, ...] = ()

    def load(self, drv_path: str) -> Derivation:
        drv = self.drvs.get(drv_path)
        if drv is None:
            check_store_path(drv_path)
            if not drv_path.endswith(".drv"):
                raise NixError(f"{drv_path} is not a derivation (.drv) path")
            try:
                drv = read_derivation(drv_path)
            except OSError as exc:
                raise NixError(f"cannot read derivation {drv_path}: {exc.strerror}") from exc
            self.drvs[drv_path] = drv
        return drv

    async def have_outputs(self, drv: Derivation) -> bool:
        for out in drv.outputs.values():
            info = self.pathinfo.find(out.path) if out.path else None
            if info is None or not await node_present(self.castore, info.node):
                return False
        return True

    async def visit(self, drv_path: str, done: set[str]) -> None:
        """Add what must be built for drv_path, inputs first; errors go to self.errors.

        Depth first, with an explicit stack: a chain of input derivations
        may be as long as a request makes it.
        """
        if drv_path in done:
            return
        drv = await self._enter(drv_path, done)
        if drv is None:
            return
        # Each derivation being visited, with its inputs still to visit.
        stack: list[tuple[str, Iterator[str]]] = [(drv_path, iter(drv.input_drvs))]
        while stack:
            path, deps = stack[-1]
            dep = next(deps, None)
            if dep is not None:
                if dep not in done:
                    dep_drv = await self._enter(dep, done)
                    if dep_drv is not None:
                        stack.append((dep, iter(dep_drv.input_drvs)))
                        continue  # its failure, if any, is passed on when it is done
                self._pass_failure(path, dep)
                continue
            stack.pop()
            if path not in self.errors:
                self.to_build.append(path)
            if stack:
                self._pass_failure(stack[-1][0], path)

    async def _enter(self, drv_path: str, done: set[str]) -> Derivation | None:
        """Start visiting drv_path: its derivation when its inputs are to be visited."""
        done.add(drv_path)
        try:
            drv = self.load(drv_path)
            if await self.have_outputs(drv):
                return None
        except NixError as exc:
            self.errors[drv_path] = str(exc)
            return None
        return drv

    def _pass_failure(self, drv_path: str, dep: str) -> None:
        if dep in self.errors:
            self.errors.setdefault(drv_path, f"input derivation {dep} failed: "
                                             f"{self.errors[dep]}")

    def input_paths(self, drv: Derivation) -> list[str]:
        paths = list(drv.input_srcs)
        for dep, names in drv.input_drvs.items():
            dep_drv = self.drvs[dep]
            paths.extend(dep_drv.outputs[n].path for n in names if n in dep_drv.outputs)
        return paths


def _deps_failed(plan: _Plan, drv_path: str) -> str | None:
    for dep in plan.drvs[drv_path].input_drvs:
        if dep in plan.errors:
            return f"input derivation {dep} failed: {plan.errors[dep]}"
    return None


async def _import_sources(plan: _Plan) -> None:
    """Import every input source the builds need; a drv whose sources fail fails.

    All sources go in one call (one look at Nix's database, one transaction);
    only if that fails is each derivation's set tried alone, to tell which
    derivations cannot build.
    """
    ready: list[str] = []
    for drv_path in plan.to_build:
        why = _deps_failed(plan, drv_path)
        if why is not None:
            plan.errors[drv_path] = why
        else:
            ready.append(drv_path)
    sources = sorted({s for d in ready for s in plan.drvs[d].input_srcs})
    try:
        await import_from_nix_store(plan.castore, plan.pathinfo, sources)
        plan.to_build = ready
        return
    except NixError:
        pass
    ok: list[str] = []
    for drv_path in ready:
        why = _deps_failed(plan, drv_path)
        if why is not None:
            plan.errors[drv_path] = why
            continue
        try:
            await import_from_nix_store(plan.castore, plan.pathinfo,
                                        plan.drvs[drv_path].input_srcs)
        except NixError as exc:
            plan.errors[drv_path] = f"importing its input sources: {exc}"
            continue
        ok.append(drv_path)
    plan.to_build = ok


def _make_request(plan: _Plan, drv_path: str, cores: int) -> DerivationRequest:
    """The request of drv_path, from what pathinfo holds for its inputs' closure."""
    from stages.nix.to_request import derivation_to_request

    drv = plan.drvs[drv_path]
    closure = plan.pathinfo.closure(plan.input_paths(drv))
    inputs = {p: plan.pathinfo.get(p).node for p in closure}
    references = {p: plan.pathinfo.get(p).references for p in closure}
    dreq = derivation_to_request(drv, inputs, cores=cores, read_drv=plan.load,
                                 sandbox_paths=plan.sandbox_paths, references=references)
    plan.requests[drv_path] = dreq
    return dreq


def _buildable(plan: _Plan, cores: int) -> list[tuple[str, str, list[str]]]:
    """The derivations to build, in the plan's order: path, key, and the
    register stages of the inputs built in the run that it waits for (none:
    its request is made now, and no request stage is needed). A derivation
    whose inputs failed, or whose request cannot be made, leaves the plan
    with its error."""
    out = []
    building = set(plan.to_build)
    for drv_path in plan.to_build:
        why = _deps_failed(plan, drv_path)
        deps = [f"{plan.keys[d]}/register" for d in plan.drvs[drv_path].input_drvs
                if d in building]
        if why is None and not deps:
            try:
                _make_request(plan, drv_path, cores)
            except NixError as exc:
                why = str(exc)
        if why is not None:
            plan.errors[drv_path] = why
            building.discard(drv_path)
            continue
        out.append((drv_path, plan.keys[drv_path], deps))
    plan.to_build = [d for d in plan.to_build if d in building]
    return out


def _request_stage(plan: _Plan, drv_path: str, cores: int, deps: list[str]) -> Stage:
    """``<key>/request``: the BuildRequest, made once its inputs are registered."""
    from pipeline import Stage

    return Stage(name=f"{plan.keys[drv_path]}/request", fn=_request_fn(plan, drv_path, cores),
                 deps=deps, description=f"BuildRequest of {drv_path}")


def _graph(plan: _Plan, host: BuildHost, cores: int,
           keep_failed: bool = False) -> tuple[list[BuildSpec], Graph | None]:
    """The builds and the graph; a derivation whose inputs are all there already gets its
    request now (no request stage: one less JSON round trip per stage of its build)."""
    from pipeline import Stage
    from stages.context import BuildSpec
    from stages.graph import graph_for_requests

    specs: list[BuildSpec] = []
    extra: list[Stage] = []
    # Kept bundles live in the state directory, not on the runtime tmpfs.
    keeping: dict = {"keep": "failed"} if keep_failed else {"ephemeral": True}
    for drv_path, key, deps in _buildable(plan, cores):
        if deps:
            extra.append(_request_stage(plan, drv_path, cores, deps))
            specs.append(BuildSpec(key=key, request_from=f"{key}/request", **keeping))
        else:
            specs.append(BuildSpec(key=key, request=plan.requests[drv_path].request, **keeping))
        extra.append(Stage(name=f"{key}/register", fn=_register_fn(plan, drv_path, cores),
                           deps=[f"{key}/ingest"],
                           description=f"NAR hashes, references; register {drv_path}'s outputs"))
    if not specs:
        return specs, None
    return specs, graph_for_requests(specs, host, stages=extra)


def _request_fn(plan: _Plan, drv_path: str, cores: int):
    async def request(ctx: object) -> dict:
        from stages.context import request_to_result

        dreq = await asyncio.to_thread(_make_request, plan, drv_path, cores)
        return request_to_result(dreq.request)

    return request


def _register_fn(plan: _Plan, drv_path: str, cores: int, source: str = "ingest"):
    """The register stage; ``source``: the stage whose result is the build's
    outputs (ingest here, build for a remote service)."""
    async def register(ctx) -> dict:
        from stages.castore.nar import nar_hash_and_size
        from stages.ingest import build_from_result
        from stages.nix.fixed_output import check_fixed_output

        drv = plan.drvs[drv_path]
        dreq = plan.requests.get(drv_path)
        if dreq is None:  # a resumed run reused the request stage: the same request again
            dreq = await asyncio.to_thread(_make_request, plan, drv_path, cores)
        built = build_from_result(dreq.request,
                                  ctx.results[f"{plan.keys[drv_path]}/{source}"])
        by_name = dict(zip(dreq.output_names, built.outputs))
        if drv.is_fixed_output:
            await check_fixed_output(plan.castore, drv, by_name["out"])
        infos = []
        for i, (_name, node) in enumerate(zip(dreq.output_names, built.outputs)):
            digest, size = await nar_hash_and_size(plan.castore, node)
            refs = [dreq.needle_paths[j] for j in built.outputs_needles[i].needles]
            infos.append(PathInfo(path="/" + dreq.request.outputs[i], node=node,
                                  references=refs, nar_sha256=digest, nar_size=size,
                                  deriver=drv_path))
        _check_output_cycles(drv_path, dreq.output_names, infos)
        check_references(drv_path, drv, infos, plan.pathinfo, dreq.output_names)
        await asyncio.to_thread(plan.pathinfo.register, infos)
        out = {}
        for name, info in zip(dreq.output_names, infos):
            ctx.log(f"{name}: {info.path} {info.nar_hash}")
            out[name] = {"path": info.path, "nar_hash": info.nar_hash,
                         "references": list(info.references)}
        return out

    return register


@contextlib.asynccontextmanager
async def _slot(ctx: object) -> AsyncIterator[None]:
    """A remote build's place among the ``jobs`` in flight (the cap does the counting)."""
    yield


def _remote_graph(plan: _Plan, service: BuildService, cores: int) -> Graph | None:
    """The graph of a remote build service: per derivation ``<key>/request``
    (when an input is built in the run), ``<key>/build`` (one call to the
    service, its builder's lines into ``logs/<key>.log``), ``<key>/register``."""
    from pipeline import Graph, Resource, Stage

    stages: list[Stage] = []
    for drv_path, key, deps in _buildable(plan, cores):
        if deps:
            stages.append(_request_stage(plan, drv_path, cores, deps))
        stages.append(Stage(name=f"{key}/build", fn=_remote_build_fn(plan, drv_path, cores,
                                                                     service),
                            deps=[f"{key}/request"] if deps else [],
                            resources=[Resource(name="remote", kind="remote", factory=_slot)],
                            description=f"build {drv_path} on the build service"))
        stages.append(Stage(name=f"{key}/register",
                            fn=_register_fn(plan, drv_path, cores, source="build"),
                            deps=[f"{key}/build"],
                            description=f"NAR hashes, references; register {drv_path}'s "
                                        f"outputs"))
    return Graph(stages=stages) if stages else None


def _remote_build_fn(plan: _Plan, drv_path: str, cores: int, service: BuildService):
    async def build(ctx) -> dict:
        from stages.castore.nodes import node_to_json_value
        from stages.service.events import LogLine, StageChanged, Started

        key = plan.keys[drv_path]
        dreq = plan.requests.get(drv_path)
        if dreq is None:
            dreq = await asyncio.to_thread(_make_request, plan, drv_path, cores)
        log_dir = ctx.run_dir / "logs"
        log_dir.mkdir(exist_ok=True)
        with open(log_dir / f"{key}.log", "ab") as log:
            def emit(event: object) -> None:
                if isinstance(event, LogLine):
                    log.write(event.data)
                    log.flush()
                    ctx.log(event.data.decode("utf-8", "replace").rstrip("\n"),
                            stream=event.stream, raw=event.data)
                elif isinstance(event, StageChanged) and event.state != "started":
                    ctx.log(f"{event.name}: {event.state} ({event.elapsed:.2f} s)")
                elif isinstance(event, Started):
                    ctx.log(f"building as {event.build_id}", build_id=event.build_id)

            built = await service.stream_build(dreq.request, emit)
        return {"outputs": [node_to_json_value(n) for n in built.outputs],
                "needles": [list(n.needles) for n in built.outputs_needles]}

    return build


#: The reference checks of an output, as Nix 2.8 applies them:
#: (attribute, allowed?, over the closure?).
REFERENCE_CHECKS = (("allowedReferences", True, False), ("allowedRequisites", True, True),
                    ("disallowedReferences", False, False),
                    ("disallowedRequisites", False, True))


@attrs.frozen
class OutputChecks:
    """What Nix 2.8 checks of one output: reference lists by attribute, size limits.

    ``ignore_self`` drops the output itself from its requisites (without
    structured attributes only, as in Nix).
    """

    lists: dict[str, list[str]]
    max_size: int | None = None
    max_closure_size: int | None = None
    ignore_self: bool = True


def output_checks(drv_path: str, drv: Derivation) -> dict[str, OutputChecks]:
    """The checks of each output: the four attributes of the environment for
    every output; with structured attributes, ``outputChecks.<output>``
    (its four lists, ``maxSize``, ``maxClosureSize``) instead.
    """
    from stages.nix.to_request import structured_attrs

    attrs_ = structured_attrs(drv)
    if attrs_ is None:
        lists = {a: drv.env[a].split() for a, _, _ in REFERENCE_CHECKS if a in drv.env}
        return {name: OutputChecks(lists) for name in drv.outputs} if lists else {}
    per_output = attrs_.get("outputChecks")
    if not isinstance(per_output, dict):
        return {}
    checks = {}
    for name in drv.outputs:
        spec = per_output.get(name)
        if not isinstance(spec, dict):
            continue
        lists = {}
        for attr, _, _ in REFERENCE_CHECKS:
            if attr in spec:
                value = spec[attr]
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise NixError(f"attribute '{attr}' of derivation '{drv_path}' must be a "
                                   "list of strings")
                lists[attr] = value
        limits = []
        for attr in ("maxSize", "maxClosureSize"):
            value = spec.get(attr)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 0):
                raise NixError(f"outputChecks.{name}.{attr} of derivation '{drv_path}' must be "
                               f"a non-negative integer, not {value!r}")
            limits.append(value)
        checks[name] = OutputChecks(lists, limits[0], limits[1], ignore_self=False)
    return checks


def check_references(drv_path: str, drv: Derivation, infos: Sequence[PathInfo],
                     pathinfo: PathInfoDB, names: Sequence[str] | None = None) -> None:
    """Enforce each output's checks (:func:`output_checks`) as Nix 2.8 does.

    A reference list holds store paths or names of this derivation's
    outputs; requisites are the output's closure. A violation is NixError in
    Nix's words, naming the output and every offending path (or the sizes).
    ``names[i]`` is the output name of ``infos[i]`` (default: matched by path).
    """
    checks = output_checks(drv_path, drv)
    if not checks:
        return
    own = {i.path: i for i in infos}
    if names is None:
        by_path = {o.path: n for n, o in drv.outputs.items()}
        names = [by_path[i.path] for i in infos]

    def resolve(items: list[str]) -> set[str]:
        paths = set()
        for item in items:
            if item in drv.outputs:
                paths.add(drv.outputs[item].path)
            elif item.startswith("/nix/store/"):
                paths.add(item)
            else:
                raise NixError(f"derivation '{drv_path}' contains an illegal reference "
                               f"specifier '{item}'")
        return paths

    def closure(path: str) -> set[str]:
        seen: set[str] = set()
        todo = [path]
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            refs = own[p].references if p in own else pathinfo.get(p).references
            todo.extend(r for r in refs if r not in seen)
        return seen

    def nar_size(path: str) -> int:
        return own[path].nar_size if path in own else pathinfo.get(path).nar_size

    for name, info in zip(names, infos):
        check = checks.get(name)
        if check is None:
            continue
        if check.max_size is not None and info.nar_size > check.max_size:
            raise NixError(f"path '{info.path}' is too large at {info.nar_size} bytes; limit "
                           f"is {check.max_size} bytes")
        if check.max_closure_size is not None:
            total = sum(nar_size(p) for p in closure(info.path))
            if total > check.max_closure_size:
                raise NixError(f"closure of path '{info.path}' is too large at {total} bytes; "
                               f"limit is {check.max_closure_size} bytes")
        for attr, allowed, recursive in REFERENCE_CHECKS:
            if attr not in check.lists:
                continue
            spec = resolve(check.lists[attr])
            if recursive:
                used = closure(info.path)
                if check.ignore_self:
                    used.discard(info.path)
            else:
                used = set(info.references)
            bad = sorted(p for p in used if (p not in spec) == allowed)
            if bad:
                raise NixError(f"output '{info.path}' is not allowed to refer to the "
                               f"following paths:" + "".join(f"\n  {p}" for p in bad))


def _check_output_cycles(drv_path: str, names: Sequence[str], infos: list[PathInfo]) -> None:
    """Refuse outputs of one derivation that refer to each other in a cycle, as Nix does."""
    name_of = {i.path: n for n, i in zip(names, infos)}
    edges = {i.path: [r for r in i.references if r in name_of and r != i.path] for i in infos}
    state: dict[str, int] = {}  # 1: on the current walk, 2: done

    for start in edges:
        if start in state:
            continue
        # Depth first, the trail (the current walk) an explicit stack.
        state[start] = 1
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(edges[start]))]
        while stack:
            path, refs = stack[-1]
            ref = next(refs, None)
            if ref is None:
                state[path] = 2
                stack.pop()
                continue
            if state.get(ref) == 1:
                trail = [p for p, _ in stack]
                cycle = " -> ".join(name_of[p] for p in [*trail[trail.index(ref):], ref])
                raise NixError(f"{drv_path}: its outputs refer to each other in a cycle "
                               f"({cycle}); Nix refuses such outputs too")
            if ref not in state:
                state[ref] = 1
                stack.append((ref, iter(edges[ref])))


def _failure(run: Run, plan: _Plan, drv_path: str) -> str:
    """Why drv_path's stages did not all finish: its first failure, or a failed input."""
    from pipeline import StageState

    key = plan.keys[drv_path]
    failed = [o for n, o in run.stages.items()
              if n.startswith(key + "/") and o.state is StageState.FAILED]
    if failed:
        first = min(failed, key=lambda o: o.ended or 0)
        return first.error or f"stage {first.name} failed"
    for dep in plan.drvs[drv_path].input_drvs:
        if dep in plan.errors:
            return f"input derivation {dep} failed"
    return f"did not finish (run {run.status.value})"


async def _run(service: OciBuildService, run_dir: Path, graph: Graph, specs: list, jobs: int,
               subscribers: Iterable[Subscriber]) -> Run:
    from pipeline import Runner
    from stages.graph import build_caps

    runner = Runner(graph, run_dir=run_dir, caps=build_caps(jobs),
                    subscribers=[*service.subscribers, *subscribers],
                    # The service's own caps, shared with its other runs, unless
                    # this build asked for another number of containers.
                    limiters=service.limiters if jobs == service.jobs else None)
    return await runner.run()


def _save_kept(plan: _Plan, host: BuildHost, run_dir: Path,
               specs: Sequence[BuildSpec]) -> dict[str, tuple[str, str]]:
    """Record the kept sandboxes of failed derivations as the run's builds (its
    builds.json, as ``ocibuild build`` writes it), so that ``ocibuild shell``
    enters them; return drv -> (run id, build key) of each."""
    from stages.service.runs import BUILDS_FILE, save_specs

    kept_specs, kept = [], {}
    by_key = {s.key: s for s in specs}
    for drv_path in plan.to_build:
        key = plan.keys[drv_path]
        dreq = plan.requests.get(drv_path)
        if (drv_path in plan.errors and dreq is not None and key in by_key
                and host.layout(by_key[key]).config.exists()):
            kept_specs.append(attrs.evolve(by_key[key], request=dreq.request, request_from=None))
            kept[drv_path] = (run_dir.name, key)
    if kept_specs:
        save_specs(run_dir, kept_specs, [d for d in plan.to_build if d in kept], host.runtime)
    else:  # a resumed run whose kept builds now passed: nothing left to enter
        (run_dir / BUILDS_FILE).unlink(missing_ok=True)
    return kept


#: The plan of an ``ocibuild nix build`` run, in its run directory: what
#: :func:`resume_derivations` needs to make the same graph again.
PLAN_FILE = "nix-plan.json"
PLAN_VERSION = 1


def _save_plan(run_dir: Path, plan: _Plan, targets: Sequence[str], cores: int,
               keep_failed: bool, remote: bool = False, runtime: str = "runc") -> None:
    import json

    from stages.util.files import write_atomic

    write_atomic(run_dir / PLAN_FILE, json.dumps({
        "version": PLAN_VERSION, "targets": list(targets), "to_build": plan.to_build,
        "keys": {d: plan.keys[d] for d in plan.to_build}, "cores": cores,
        "sandbox_paths": list(plan.sandbox_paths), "keep_failed": keep_failed,
        "remote": remote, "runtime": runtime,
        "errors": {d: e for d, e in plan.errors.items() if d not in plan.keys},
    }, indent=2) + "\n")


def plan_runtime(run_dir: Path) -> str | None:
    """The runtime an ``ocibuild nix build`` run built with (None: not a Nix
    run, or it does not say)."""
    import json

    try:
        return str(json.loads((run_dir / PLAN_FILE).read_text())["runtime"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_nix_run(run_dir: Path) -> bool:
    """Whether a run directory is one of ``ocibuild nix build`` (resumable by
    :func:`resume_derivations`)."""
    return (run_dir / PLAN_FILE).is_file()


def _load_plan(run_dir: Path) -> dict:
    import json

    path = run_dir / PLAN_FILE
    try:
        saved = json.loads(path.read_text())
        if saved.get("version") != PLAN_VERSION:
            raise NixError(f"{path}: plan version {saved.get('version')!r}, this ocibuild "
                           f"reads version {PLAN_VERSION}")
        to_build = [str(d) for d in saved["to_build"]]
        keys = {str(d): str(k) for d, k in saved["keys"].items()}
        if set(keys) != set(to_build):
            raise NixError(f"{path}: its keys do not match its derivations")
        if saved.get("remote"):
            raise NixError(f"run {run_dir.name} was built on a remote build service; "
                           f"resume continues local runs only (build it again)")
        return {"targets": [str(d) for d in saved["targets"]], "to_build": to_build,
                "keys": keys, "cores": int(saved["cores"]),
                "sandbox_paths": tuple(str(p) for p in saved["sandbox_paths"]),
                "keep_failed": bool(saved["keep_failed"]),
                "runtime": str(saved.get("runtime", "runc")),
                "errors": {str(d): str(e) for d, e in saved["errors"].items()}}
    except FileNotFoundError:
        raise NixError(f"{run_dir} is not a run of 'ocibuild nix build' "
                       f"(no {PLAN_FILE})") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NixError(f"{path}: unreadable plan: {exc}") from None


def _stage_names(graph: Graph, specs: Sequence[BuildSpec], stage: str,
                 pick: Sequence[BuildSpec]) -> list[str]:
    """A stage of a Nix run's graph: ``KEY/STAGE`` as given, a bare STAGE of every
    build in ``pick`` that has it; unknown stages and keys refused."""
    from stages.graph import STAGE_NAMES

    names = ("request", *STAGE_NAMES, "register")
    key, sep, bare = stage.rpartition("/")
    if bare not in names:
        raise NixError(f"unknown stage {bare!r}; stages: {', '.join(names)}")
    if not sep:
        return [n for s in pick if (n := f"{s.key}/{bare}") in graph]
    if key not in {s.key for s in specs}:
        raise NixError(f"no build {key!r} in this run; builds: "
                       f"{', '.join(s.key for s in specs)}")
    if stage not in graph:
        raise NixError(f"build {key} has no stage {bare!r} (its request was made "
                       f"before the run)")
    return [stage]


def _settle_errors(run: Run, plan: _Plan) -> None:
    """Record each derivation's failure from the run."""
    for drv_path in plan.to_build:  # dependencies first: a failed input is known
        outcome = run.stages.get(f"{plan.keys[drv_path]}/register")
        if outcome is None or not outcome.state.ok:
            plan.errors[drv_path] = _failure(run, plan, drv_path)


def _settle(run: Run, plan: _Plan, host: BuildHost, run_dir: Path,
            specs: list[BuildSpec], keep_failed: bool) -> dict[str, tuple[str, str]]:
    """Record each derivation's failure from the run; the kept sandboxes, if asked."""
    _settle_errors(run, plan)
    return _save_kept(plan, host, run_dir, specs) if keep_failed else {}


def _results(targets: Sequence[str], plan: _Plan, pathinfo: PathInfoDB,
             kept: dict[str, tuple[str, str]]) -> dict[str, DrvResult]:
    built = set(plan.to_build)
    results: dict[str, DrvResult] = {}
    for drv_path in targets:
        if drv_path in plan.errors:
            results[drv_path] = DrvResult(drv_path=drv_path, status="failed",
                                          error=plan.errors[drv_path],
                                          kept=tuple((d, r, k) for d, (r, k) in kept.items()))
            continue
        try:
            results[drv_path] = _result_from_pathinfo(
                drv_path, plan.drvs[drv_path], pathinfo, cached=drv_path not in built)
        except NixError as exc:
            results[drv_path] = DrvResult(drv_path=drv_path, status="failed", error=str(exc))
    return results


async def build_derivations(drv_paths: Sequence[str], *, service: BuildService,
                            pathinfo: PathInfoDB, jobs: int = 1, cores: int = 0,
                            subscribers: Iterable[Subscriber] = (),
                            sandbox_paths: Sequence[str] = (),
                            keep_failed: bool = False, castore: Castore | None = None,
                            runs_dir: Path | None = None) -> dict[str, DrvResult]:
    """Build ``drv_paths`` and what they need; one :class:`DrvResult` per requested path.

    ``service`` must be started (``async with``). An
    :class:`~stages.service.OciBuildService` builds here, each build's seven
    stages in the run's graph; its castore is where inputs and outputs go.
    Any other service (a Ray cluster, a gRPC server) gets one call per
    derivation; ``castore`` must then be the store it builds from and
    ``runs_dir`` where this run's record goes. ``pathinfo`` must be the
    castore's database. ``jobs`` caps concurrent builds; ``cores`` is
    NIX_BUILD_CORES (0: every core, as Nix's default). ``sandbox_paths``:
    read-only paths of every build (nix.conf's sandbox paths' targets; the
    service's policy must grant them, see :mod:`stages.nix.config`). Never
    raises for a derivation that fails: its result says why.
    ``keep_failed`` (local services only) keeps the sandbox (bundle,
    scratch) of each derivation whose build fails, for ``ocibuild shell``;
    its result's ``kept`` names the run and build key.
    """
    from stages.service import OciBuildService

    local = service if isinstance(service, OciBuildService) else None
    if local is not None:
        if local.host is None:
            raise NixError("the build service is not started; use it with 'async with'")
        castore, runs_dir = local.host.castore, local.runs_dir
    elif castore is None or runs_dir is None:
        raise ValueError("a remote build service needs the castore it builds from and a "
                         "runs_dir")
    elif keep_failed:
        raise NixError("--keep-failed keeps a sandbox on this machine: it needs a local "
                       "build service, not a remote one")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, not {jobs}")
    plan = _Plan(castore=castore, pathinfo=pathinfo, sandbox_paths=tuple(sandbox_paths))
    kept: dict[str, tuple[str, str]] = {}
    done: set[str] = set()
    for drv_path in drv_paths:
        await plan.visit(drv_path, done)
    await _import_sources(plan)

    if plan.to_build:
        from pipeline import Caps, Runner, new_run_dir, run_token

        run_dir = new_run_dir(runs_dir, "nix")
        try:
            plan.keys = {d: _key(d, plan.drvs[d], run_token(run_dir)) for d in plan.to_build}
            if local is None:
                specs: list[BuildSpec] = []
                graph = _remote_graph(plan, service, cores)
            else:
                # At once, before the graph is made: so that crash recovery (a later
                # service) removes their bundles, and a concurrent prune spares the run.
                local.record_keys(plan.keys.values())
                specs, graph = _graph(plan, local.host, cores, keep_failed)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: no run to keep
            raise
        if graph is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif local is None:
            _save_plan(run_dir, plan, drv_paths, cores, keep_failed, remote=True)
            run = await Runner(graph, run_dir=run_dir, caps=Caps(kinds={"remote": jobs}),
                               subscribers=subscribers).run()
            _settle_errors(run, plan)
        else:
            _save_plan(run_dir, plan, drv_paths, cores, keep_failed, runtime=local.runtime)
            run = await _run(local, run_dir, graph, specs, jobs, subscribers)
            kept = _settle(run, plan, local.host, run_dir, specs, keep_failed)
    return _results(drv_paths, plan, pathinfo, kept)


async def resume_derivations(run_dir: Path, *, service: OciBuildService, pathinfo: PathInfoDB,
                             jobs: int = 1, from_stage: str | None = None,
                             stop_after: str | None = None,
                             subscribers: Iterable[Subscriber] = ()
                             ) -> tuple[dict[str, DrvResult], Run]:
    """Continue an ``ocibuild nix build`` run in its directory: the same graph
    (from the run's :data:`PLAN_FILE`), its finished stages reused.

    By default each derivation goes on from its first unfinished stage: a
    failed build re-runs from its run stage, in the sandbox it left when it
    was kept (``--keep-failed``), else from a new bundle. ``from_stage``: a
    bare stage name re-runs that stage of every derivation not yet built (of
    every one if all are), ``KEY/STAGE`` one build's. ``stop_after``: a bare
    name stops every build after that stage. A derivation's results are
    registered as by :func:`build_derivations`; one :class:`DrvResult` per
    derivation the run was asked for.
    """
    from pipeline import load_run, resume
    from stages.graph import build_caps
    from stages.service.runs import restart_points

    host = service.host
    if host is None:
        raise NixError("the build service is not started; use it with 'async with'")
    saved = _load_plan(run_dir)
    plan = _Plan(castore=host.castore, pathinfo=pathinfo, sandbox_paths=saved["sandbox_paths"])
    for drv_path in saved["to_build"]:
        for dep in plan.load(drv_path).input_drvs:
            plan.load(dep)
    for drv_path in saved["targets"]:
        plan.load(drv_path)
    plan.to_build = list(saved["to_build"])
    plan.keys = dict(saved["keys"])
    service.record_keys(plan.keys.values())
    before = load_run(run_dir)
    specs, graph = _graph(plan, host, saved["cores"], saved["keep_failed"])
    if graph is None or plan.errors:
        why = "; ".join(f"{d}: {e}" for d, e in plan.errors.items()) or "nothing to build"
        raise NixError(f"run {run_dir.name} cannot be made again: {why}")
    unfinished = [s for s in specs
                  if not (o := before.stages.get(f"{s.key}/register")) or not o.state.ok]
    starts = restart_points(before, [(s, f"{s.key}/") for s in specs],
                            lambda s: host.layout(s).root.exists())
    if from_stage is not None:
        starts += _stage_names(graph, specs, from_stage, unfinished or specs)
    stops = None if stop_after is None else _stage_names(graph, specs, stop_after, specs)
    run = await resume(run_dir, graph, from_stage=starts, stop_after=stops,
                       caps=build_caps(jobs), subscribers=[*service.subscribers, *subscribers],
                       limiters=service.limiters if jobs == service.jobs else None)
    plan.errors.update(saved["errors"])  # found before the first attempt ran
    kept = _settle(run, plan, host, run_dir, specs, saved["keep_failed"])
    return _results(saved["targets"], plan, pathinfo, kept), run

"""Definitions: stages, resources, codecs and graphs, as frozen values.

A :class:`Graph` is built, validated, hashed and drawn without running
anything; the runtime state lives in :mod:`pipeline.runner`.

Caveats:

- A stage function is identified in the digest by ``module:qualname``. Two
  lambdas in one module have the same name; give stages real functions, or a
  ``version=``, when resume must notice a change of code.
- ``params`` (graph and stage) must be JSON-serializable: they enter the
  digest. Put there what changes the result, and nothing else.
- Stage and resource names are any non-empty text without whitespace; ``/``
  separates the prefixes that :meth:`Graph.prefixed` adds.
- Per-stage resources are named locally (``ctx.resources["tmp"]``); shared
  (graph-level) resources are named in the graph and referenced from stages by
  name.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import (
    TYPE_CHECKING,
    Any,
)

import attrs

if TYPE_CHECKING:
    import networkx as nx

from pipeline.errors import (
    CycleError,
    DefinitionError,
    DuplicateNameError,
    MissingDependencyError,
)

__all__ = [
    "JSON",
    "NOT_SERIALIZABLE",
    "PICKLE",
    "Codec",
    "Graph",
    "GraphBuilder",
    "Resource",
    "Stage",
    "qualname",
]

DIGEST_FORMAT = 1  # bump when the canonical form below changes
_NAME = re.compile(r"\S+")


def qualname(obj: Any) -> str:
    """``module:qualname`` of a function (or of a partial's function), for digests."""
    func = getattr(obj, "func", obj)  # functools.partial
    module = getattr(func, "__module__", None) or type(func).__module__
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"{module}:{name}"


def _resource_tuple(value: Iterable[Resource]) -> tuple[Resource, ...]:
    return tuple(value)


def _check_name(what: str) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, _attr: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise DefinitionError(f"{what} name must be non-empty text without whitespace, "
                                  f"not {value!r}", field="name")
    return check


# --- codecs -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Codec:
    """How a stage result is stored in the run directory.

    ``encode`` turns a result into a JSON value, ``decode`` turns it back. A
    codec with ``serializable=False`` stores nothing; such stages re-run on
    resume when a later stage needs their result.
    """

    name: str
    encode: Callable[[Any], Any] | None = None
    decode: Callable[[Any], Any] | None = None
    serializable: bool = True


def _pickle_encode(value: Any) -> str:
    return base64.b64encode(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).decode()


def _pickle_decode(data: str) -> Any:
    return pickle.loads(base64.b64decode(data))


JSON = Codec(name="json")
"""The default: the result must be a JSON value (dict, list, str, number, bool, None)."""
PICKLE = Codec(name="pickle", encode=_pickle_encode, decode=_pickle_decode)
"""Any picklable result, stored as base64 pickle (trust the run directory!)."""
NOT_SERIALIZABLE = Codec(name="none", serializable=False)
"""Nothing stored; the stage re-runs on resume when its result is needed."""


# --- resources and stages -----------------------------------------------------


@attrs.frozen(kw_only=True)
class Resource:
    """An async context manager factory with a declared kind.

    ``factory(ctx)`` gets the context of the stage that acquires it and returns
    an async context manager; the value it yields is ``ctx.resources[name]``.
    ``kind`` selects the cap (``Caps.kinds``) that limits how many resources of
    that kind are held at once; it defaults to the name.
    """

    name: str = attrs.field(validator=_check_name("resource"))
    factory: Callable[[Any], Any] = attrs.field()
    kind: str = attrs.field(default=attrs.Factory(lambda self: self.name, takes_self=True))
    description: str = ""

    @factory.validator
    def _callable(self, _attr: attrs.Attribute[Any], value: Any) -> None:
        if not callable(value):
            raise DefinitionError(f"resource {self.name!r}: factory must be callable, "
                                  f"not {value!r}", field="factory")

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "factory": qualname(self.factory)}


def _names(value: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _resources(value: Resource | str | Iterable[Resource | str]) -> tuple[Resource | str, ...]:
    if isinstance(value, (str, Resource)):
        return (value,)
    return tuple(value)


@attrs.frozen(kw_only=True)
class Stage:
    """One unit of a graph: ``async def fn(ctx) -> result``.

    - ``deps``: names of stages that must finish first.
    - ``resources``: :class:`Resource` values (acquired around this stage
      only) and names of the graph's shared resources (acquired before the
      first stage that names them, released after the last one is done).
    - ``timeout`` (seconds, per attempt), ``retries`` (extra attempts after an
      exception), ``retry_delay`` (seconds between attempts).
    - ``always``: a finalizer; runs once all its deps are done whatever their
      outcome (failed, abandoned, cancelled), and reads them in
      ``ctx.outcomes``. It is not cancelled when the run is.
    - ``codec``: how the result is stored (:data:`JSON` by default).
    - ``version``/``params``: enter the graph digest; change them when the
      stage's code or inputs change meaningfully.
    """

    name: str = attrs.field(validator=_check_name("stage"))
    fn: Callable[[Any], Awaitable[Any]] = attrs.field()
    deps: tuple[str, ...] = attrs.field(default=(), converter=_names)
    resources: tuple[Resource | str, ...] = attrs.field(default=(), converter=_resources)
    timeout: float | None = None
    retries: int = 0
    retry_delay: float = 0.0
    always: bool = False
    codec: Codec = JSON
    version: str = ""
    params: Any = None
    description: str = ""
    prefix: str = ""  # namespace added by Graph.prefixed; names resolve inside it first
    #: The graph this stage runs, when it is one (:func:`pipeline.as_stage`).
    subgraph: Graph | None = attrs.field(default=None, eq=False, repr=False)
    # Derived from ``resources`` once (the scheduler reads them per run).
    local_resources: tuple[Resource, ...] = attrs.field(init=False, eq=False, repr=False)
    shared_resources: tuple[str, ...] = attrs.field(init=False, eq=False, repr=False)

    @fn.validator
    def _fn_callable(self, _attr: attrs.Attribute[Any], value: Any) -> None:
        if not callable(value):
            raise DefinitionError(f"fn must be an async function, not {value!r}",
                                  stage=self.name, field="fn")

    def __attrs_post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise DefinitionError(f"timeout must be > 0 seconds, not {self.timeout!r}",
                                  stage=self.name, field="timeout")
        if type(self.retries) is not int or self.retries < 0:
            raise DefinitionError(f"retries must be an int >= 0, not {self.retries!r}",
                                  stage=self.name, field="retries")
        if self.retry_delay < 0:
            raise DefinitionError(f"retry_delay must be >= 0, not {self.retry_delay!r}",
                                  stage=self.name, field="retry_delay")
        if self.codec is not JSON and not isinstance(self.codec, Codec):
            raise DefinitionError(f"codec must be a Codec, not {self.codec!r}",
                                  stage=self.name, field="codec")
        deps = self.deps
        if deps:
            for dep in deps:
                if not isinstance(dep, str) or not _NAME.fullmatch(dep):
                    raise DefinitionError(f"dependency names must be non-empty text, not {dep!r}",
                                          stage=self.name, field="deps")
            if self.name in deps:
                raise CycleError([self.name])
            if len(set(deps)) != len(deps):
                dup = next(d for d in deps if deps.count(d) > 1)
                raise DefinitionError(f"dependency {dup!r} listed twice",
                                      stage=self.name, field="deps")
        if not self.resources:
            object.__setattr__(self, "local_resources", ())
            object.__setattr__(self, "shared_resources", ())
        else:
            self._check_resources()
        if self.params is None:
            return
        try:
            json.dumps(self.params, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise DefinitionError(f"params must be JSON-serializable: {exc}",
                                  stage=self.name, field="params") from exc

    def _check_resources(self) -> None:
        local: set[str] = set()
        for res in self.resources:
            if isinstance(res, Resource):
                name = res.name
            elif isinstance(res, str) and _NAME.fullmatch(res):
                name = res
            else:
                raise DefinitionError(f"resources must be Resource values or shared resource "
                                      f"names, not {res!r}", stage=self.name, field="resources")
            if name in local:
                raise DefinitionError(f"resource {name!r} listed twice",
                                      stage=self.name, field="resources")
            local.add(name)
        object.__setattr__(self, "local_resources",
                           tuple(r for r in self.resources if isinstance(r, Resource)))
        object.__setattr__(self, "shared_resources",
                           tuple(r for r in self.resources if isinstance(r, str)))

    def definition(self) -> dict[str, Any]:
        """The canonical form of this stage for the graph digest."""
        out = {
            "name": self.name,
            "fn": qualname(self.fn),
            "deps": sorted(self.deps),
            "resources": [r if isinstance(r, str) else r.definition() for r in self.resources],
            "timeout": self.timeout,
            "retries": self.retries,
            "always": self.always,
            "codec": self.codec.name,
            "version": self.version,
            "params": self.params,
        }
        if self.subgraph is not None:
            out["subgraph"] = self.subgraph.definition()
        return out


# --- graphs ---------------------------------------------------------------------


def _stages(value: Iterable[Stage]) -> tuple[Stage, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class Graph:
    """A validated DAG of stages plus the shared resources they name.

    Construction refuses duplicate names, unknown dependencies or shared
    resources, and cycles, naming them. ``version``/``params`` are the user's
    own part of the digest.
    """

    stages: tuple[Stage, ...] = attrs.field(converter=_stages)
    resources: tuple[Resource, ...] = attrs.field(default=(), converter=_resource_tuple)
    version: str = ""
    params: Any = None
    _by_name: dict[str, Stage] = attrs.field(init=False, repr=False, eq=False)
    _shared: dict[str, Resource] = attrs.field(init=False, repr=False, eq=False)
    _nx: nx.DiGraph | None = attrs.field(init=False, repr=False, eq=False)
    _order: tuple[str, ...] = attrs.field(init=False, repr=False, eq=False)
    _digest: str | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        by_name: dict[str, Stage] = {}
        for stage in self.stages:
            if not isinstance(stage, Stage):
                raise DefinitionError(f"graph stages must be Stage values, not {stage!r}")
            if stage.name in by_name:
                raise DuplicateNameError(stage.name)
            by_name[stage.name] = stage
        shared: dict[str, Resource] = {}
        for res in self.resources:
            if not isinstance(res, Resource):
                raise DefinitionError(f"graph resources must be Resource values, not {res!r}")
            if res.name in shared:
                raise DuplicateNameError(res.name, what="shared resource")
            shared[res.name] = res
        position = {name: i for i, name in enumerate(by_name)}
        users: dict[str, list[str]] = {name: [] for name in by_name}
        missing_deps: dict[str, int] = {}
        for stage in self.stages:
            for dep in stage.deps:
                if dep not in by_name:
                    raise MissingDependencyError(stage.name, dep)
                users[dep].append(stage.name)
            missing_deps[stage.name] = len(stage.deps)
            for wanted in stage.shared_resources:
                if wanted not in shared:
                    raise MissingDependencyError(stage.name, wanted, what="shared resource")
        # Kahn's algorithm: a stable topological order (ties by declaration order).
        ready = [name for name, n in missing_deps.items() if n == 0]
        order: list[str] = []
        while ready:
            # Stages made ready together run in declaration order.
            order.extend(ready)
            nxt: list[str] = []
            for name in ready:
                for user in users[name]:
                    missing_deps[user] -= 1
                    if missing_deps[user] == 0:
                        nxt.append(user)
            nxt.sort(key=position.__getitem__)
            ready = nxt
        if len(order) != len(by_name):
            stuck = [n for n in by_name if missing_deps[n] > 0]
            import networkx as nx

            g = nx.DiGraph((d, s.name) for s in self.stages if s.name in stuck for d in s.deps)
            raise CycleError([u for u, _v in nx.find_cycle(g)])
        try:
            json.dumps(self.params, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise DefinitionError(f"graph params must be JSON-serializable: {exc}",
                                  field="params") from exc
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "_nx", None)
        object.__setattr__(self, "_order", tuple(order))
        object.__setattr__(self, "_digest", None)

    # -- reading ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self) -> Iterator[Stage]:
        return (self._by_name[n] for n in self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Stage:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no stage {name!r} in the graph") from None

    @property
    def names(self) -> tuple[str, ...]:
        """Stage names in a stable topological order."""
        return self._order

    @property
    def nx(self) -> nx.DiGraph:
        """The frozen networkx DiGraph (edges go from a dependency to its user).

        Made on first use."""
        if self._nx is None:
            import networkx as nx  # imported on first use: it costs ~0.25 s at start-up

            g = nx.DiGraph()
            g.add_nodes_from(self._order)
            g.add_edges_from((d, s.name) for s in self.stages for d in s.deps)
            object.__setattr__(self, "_nx", nx.freeze(g))
        return self._nx

    @property
    def shared(self) -> Mapping[str, Resource]:
        return dict(self._shared)

    @property
    def digest(self) -> str:
        """sha256 of the canonical definition; changes whenever resume must refuse."""
        digest = self._digest
        if digest is None:
            blob = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"))
            digest = hashlib.sha256(blob.encode()).hexdigest()
            object.__setattr__(self, "_digest", digest)
        return digest

    def ancestors(self, name: str) -> set[str]:
        self[name]
        import networkx as nx

        return set(nx.ancestors(self.nx, name))

    def descendants(self, name: str) -> set[str]:
        self[name]
        import networkx as nx

        return set(nx.descendants(self.nx, name))

    def users(self, resource: str) -> list[str]:
        """Stages (in order) that name the shared resource."""
        return [n for n in self._order if resource in self._by_name[n].shared_resources]

    def definition(self) -> dict[str, Any]:
        """The canonical, JSON-serializable form the digest is computed from."""
        return {
            "format": DIGEST_FORMAT,
            "version": self.version,
            "params": self.params,
            "stages": [self._by_name[n].definition() for n in sorted(self._by_name)],
            "resources": [self._shared[n].definition() for n in sorted(self._shared)],
        }

    # -- composing ----------------------------------------------------------------

    def prefixed(self, prefix: str) -> Graph:
        """A copy with every stage and shared resource renamed ``prefix/name``.

        Stage functions keep resolving ``ctx.results["x"]`` and
        ``ctx.resources["x"]`` inside their prefix first, so a sub-graph's code
        does not change when it is embedded.
        """
        if not isinstance(prefix, str) or not _NAME.fullmatch(prefix) or prefix.endswith("/"):
            raise DefinitionError(f"prefix must be non-empty text without whitespace or a "
                                  f"trailing '/', not {prefix!r}", field="prefix")

        def rename(name: str) -> str:
            return f"{prefix}/{name}"

        stages = [
            attrs.evolve(
                s,
                name=rename(s.name),
                deps=[rename(d) for d in s.deps],
                resources=[rename(r) if isinstance(r, str) else r for r in s.resources],
                prefix=f"{prefix}/{s.prefix}",
            )
            for s in self.stages
        ]
        resources = [attrs.evolve(r, name=rename(r.name)) for r in self.resources]
        return Graph(stages=stages, resources=resources, version=self.version,
                     params=self.params)

    @classmethod
    def compose(
        cls,
        *parts: Graph,
        stages: Iterable[Stage] = (),
        resources: Iterable[Resource] = (),
        links: Mapping[str, Sequence[str]] | None = None,
        version: str = "",
        params: Any = None,
    ) -> Graph:
        """One graph from several (usually :meth:`prefixed`) graphs plus extra stages.

        ``links`` adds dependencies between the parts, e.g. to chain two builds:
        ``links={"b/validate": ["a/ingest"]}``. The parts' own versions and
        params are kept in the composed params so that the digest sees them.
        """
        all_stages: list[Stage] = [s for p in parts for s in p.stages]
        all_stages.extend(stages)
        links = dict(links or {})
        names = {s.name for s in all_stages}
        for target in links:
            if target not in names:
                raise MissingDependencyError("<links>", target)
        if links:
            all_stages = [
                attrs.evolve(s, deps=[*s.deps, *[d for d in links[s.name] if d not in s.deps]])
                if s.name in links else s
                for s in all_stages
            ]
        part_meta = [{"version": p.version, "params": p.params} for p in parts]
        if any(m["version"] or m["params"] is not None for m in part_meta):
            params = {"params": params, "parts": part_meta}
        return cls(stages=all_stages,
                   resources=[r for p in parts for r in p.resources] + list(resources),
                   version=version, params=params)


class GraphBuilder:
    """Collects stages with a decorator, then builds a :class:`Graph`.

    ::

        b = GraphBuilder()

        @b.stage(deps=["fetch"])
        async def parse(ctx): ...

        graph = b.build(version="1")
    """

    def __init__(self) -> None:
        self._stages: list[Stage] = []
        self._resources: list[Resource] = []

    def add(self, stage: Stage) -> Stage:
        self._stages.append(stage)
        return stage

    def resource(self, name: str, factory: Callable[[Any], Any], *, kind: str | None = None,
                 description: str = "") -> Resource:
        """Declare a shared (graph-level) resource."""
        res = Resource(name=name, factory=factory, kind=kind or name, description=description)
        self._resources.append(res)
        return res

    def stage(self, name: str | None = None,
              **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(Stage(name=name or fn.__name__, fn=fn, **kw))
            return fn
        return deco

    def build(self, *, version: str = "", params: Any = None) -> Graph:
        return Graph(stages=self._stages, resources=self._resources, version=version,
                     params=params)

"""Graph construction: refusals that name the problem, ordering, digest, composition."""

from __future__ import annotations

import contextlib

import pytest

from pipeline import (
    CycleError,
    DefinitionError,
    DuplicateNameError,
    Graph,
    GraphBuilder,
    MissingDependencyError,
    PipelineError,
    Resource,
    Stage,
)


async def noop(ctx):
    return None


async def other(ctx):
    return 1


def s(name, deps=(), **kw):
    return Stage(name=name, fn=kw.pop("fn", noop), deps=deps, **kw)


def test_cycle_is_named():
    with pytest.raises(CycleError) as info:
        Graph(stages=[s("a", ["c"]), s("b", ["a"]), s("c", ["b"]), s("d")])
    assert set(info.value.cycle) == {"a", "b", "c"}
    assert "->" in str(info.value)
    assert isinstance(info.value, PipelineError)


def test_self_dependency_is_a_cycle():
    with pytest.raises(CycleError, match="a -> a"):
        s("a", ["a"])


def test_cycle_downstream_nodes_not_blamed():
    with pytest.raises(CycleError) as info:
        Graph(stages=[s("x"), s("a", ["x", "b"]), s("b", ["a"]), s("z", ["a"])])
    assert set(info.value.cycle) == {"a", "b"}


def test_missing_dependency_is_named():
    with pytest.raises(MissingDependencyError) as info:
        Graph(stages=[s("a"), s("b", ["nope"])])
    assert info.value.stage == "b" and info.value.missing == "nope"
    assert "'nope'" in str(info.value) and "'b'" in str(info.value)


def test_missing_shared_resource_is_named():
    with pytest.raises(MissingDependencyError, match="shared resource 'mount'"):
        Graph(stages=[s("a", resources=["mount"])])


def test_duplicate_stage_name():
    with pytest.raises(DuplicateNameError, match="'a'"):
        Graph(stages=[s("a"), s("a")])


def test_duplicate_shared_resource():
    r = Resource(name="m", factory=contextlib.nullcontext)
    with pytest.raises(DuplicateNameError, match="shared resource name 'm'"):
        Graph(stages=[s("a")], resources=[r, r])


@pytest.mark.parametrize("kw,field", [
    ({"timeout": 0}, "timeout"),
    ({"retries": -1}, "retries"),
    ({"retry_delay": -1}, "retry_delay"),
    ({"params": {"x": object()}}, "params"),
    ({"deps": ["b", "b"]}, "deps"),
    ({"fn": 3}, "fn"),
    ({"codec": "json"}, "codec"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_stage_fields_are_named(kw, field):
    with pytest.raises(DefinitionError) as info:
        Stage(name="a", **{"fn": noop, **kw})
    assert info.value.field == field
    assert "'a'" in str(info.value)


@pytest.mark.parametrize("name", ["", "has space", None, "tab\there"])
def test_bad_names(name):
    with pytest.raises(DefinitionError, match="name"):
        Stage(name=name, fn=noop)


def test_order_is_topological_and_stable():
    g = Graph(stages=[s("d", ["b", "c"]), s("b", ["a"]), s("c", ["a"]), s("a")])
    order = g.names
    pos = {n: i for i, n in enumerate(order)}
    for stage in g:
        for dep in stage.deps:
            assert pos[dep] < pos[stage.name]
    assert order == Graph(stages=[s("d", ["b", "c"]), s("b", ["a"]), s("c", ["a"]),
                                  s("a")]).names
    assert set(g.nx.edges) == {("b", "d"), ("c", "d"), ("a", "b"), ("a", "c")}
    assert g.ancestors("d") == {"a", "b", "c"} and g.descendants("b") == {"d"}


def test_digest_stable_and_sensitive():
    def make(**kw):
        return Graph(stages=[s("a"), s("b", ["a"], **kw)], version="1")

    base = make().digest
    assert base == make().digest
    assert len(base) == 64
    # Declaration order does not matter.
    assert Graph(stages=[s("b", ["a"]), s("a")], version="1").digest == base
    changed = {
        make(fn=other).digest, make(version="2").digest, make(params={"k": 1}).digest,
        make(timeout=3).digest, make(retries=1).digest, make(always=True).digest,
        Graph(stages=[s("a"), s("b", ["a"])], version="2").digest,
        Graph(stages=[s("a"), s("b")], version="1").digest,
    }
    assert base not in changed and len(changed) == 8


def test_prefixed_and_compose_chain():
    inner = Graph(stages=[s("fetch"), s("use", ["fetch"], resources=["m"])],
                  resources=[Resource(name="m", factory=contextlib.nullcontext)])
    g = Graph.compose(inner.prefixed("a"), inner.prefixed("b"),
                      links={"b/fetch": ["a/use"]},
                      stages=[s("report", ["a/use", "b/use"])])
    assert set(g.names) == {"a/fetch", "a/use", "b/fetch", "b/use", "report"}
    assert g["b/fetch"].deps == ("a/use",)
    assert g["a/use"].resources == ("a/m",) and g["a/use"].prefix == "a/"
    assert set(g.shared) == {"a/m", "b/m"}
    assert g.names.index("a/use") < g.names.index("b/fetch")
    with pytest.raises(MissingDependencyError, match="'zz'"):
        Graph.compose(inner.prefixed("a"), links={"zz": ["a/use"]})
    with pytest.raises(DefinitionError, match="prefix"):
        inner.prefixed("bad/")
    with pytest.raises(DuplicateNameError):
        Graph.compose(inner.prefixed("a"), inner.prefixed("a"))


def test_builder():
    b = GraphBuilder()
    b.resource("pool", contextlib.nullcontext, kind="k")

    @b.stage()
    async def first(ctx):
        return 1

    @b.stage(deps=["first"], resources=["pool"])
    async def second(ctx):
        return 2

    g = b.build(version="v")
    assert g.names == ("first", "second") and g.shared["pool"].kind == "k"
    assert g.users("pool") == ["second"]


def test_getitem_unknown_names_it():
    g = Graph(stages=[s("a")])
    with pytest.raises(KeyError, match="'zz'"):
        g["zz"]

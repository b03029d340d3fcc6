"""Every Hypothesis strategy of the test suite, in one place.

Three families:

- castore values (``names``, ``digests``, ``nodes``, ``directories``...).
  Everything generated is valid by the protocol's rules: names are 1..255
  bytes without '/' or NUL and not '.' or '..', symlink targets 1..4095
  bytes without NUL, sizes fit a uint64, a Directory's names are unique
  across its three lists. Tests that want invalid values derive them.
- build requests (``valid_requests``, ``builds``), which pass validation by
  construction: each kind of path draws its components from its own prefix
  (``s-`` scratch, ``i-`` inputs, ``o-`` outputs, ``f-`` additional files,
  ``w-`` working dirs), so no two kinds can collide, while nesting (a
  scratch path inside another, inputs_dir inside a scratch path or not)
  still happens.
- pipeline DAGs (``dag_specs``): random graphs as plain data, which
  ``pipeline_tracker.build`` turns into a Graph of tracked stages.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import strategies as st

from stages.castore.nodes import Directory, DirectoryNode, FileNode, SymlinkNode
from stages.request import (
    AdditionalFile,
    Build,
    BuildConstraints,
    BuildRequest,
    EnvVar,
    OutputNeedles,
)

__all__ = [
    "DagSpec",
    "builds",
    "dag_specs",
    "digests",
    "directories",
    "directory_nodes",
    "file_nodes",
    "names",
    "nodes",
    "root_names",
    "sizes",
    "symlink_nodes",
    "targets",
    "valid_requests",
]


# --- castore values -----------------------------------------------------------

def _clean(raw: bytes) -> bytes:
    return raw.replace(b"/", b"_").replace(b"\0", b"\x01")


def _stretch(seed_and_len: tuple[bytes, int]) -> bytes:
    seed, length = seed_and_len
    return (seed * (length // len(seed) + 1))[:length]


# Long values are stretched from a short seed: drawing 255 random bytes per
# name makes generation slow without finding more bugs.
_short_names = st.binary(min_size=1, max_size=16).map(_clean)
_long_names = st.tuples(_short_names, st.integers(min_value=250, max_value=255)).map(_stretch)

names = st.one_of(_short_names, _short_names, _short_names, _long_names).filter(
    lambda n: n not in (b".", b".."))
"""Valid entry names, including long and non-UTF-8 ones."""

root_names = st.just(b"") | names
"""A name for a node that stands alone: empty, or any entry name."""

digests = st.binary(min_size=32, max_size=32)
sizes = st.integers(min_value=0, max_value=(1 << 64) - 1)
_short_targets = st.binary(min_size=1, max_size=48).map(lambda t: t.replace(b"\0", b"/"))
targets = st.one_of(
    _short_targets, _short_targets, _short_targets,
    st.tuples(_short_targets, st.integers(min_value=4000, max_value=4095)).map(_stretch))
"""Valid symlink targets (1..4095 bytes, no NUL), '/' included."""


def file_nodes(name: st.SearchStrategy[bytes] = names) -> st.SearchStrategy[FileNode]:
    return st.builds(FileNode, name=name, digest=digests, size=sizes,
                     executable=st.booleans())


def directory_nodes(name: st.SearchStrategy[bytes] = names) -> st.SearchStrategy[DirectoryNode]:
    return st.builds(DirectoryNode, name=name, digest=digests, size=sizes)


def symlink_nodes(name: st.SearchStrategy[bytes] = names,
                  target: st.SearchStrategy[bytes] = targets) -> st.SearchStrategy[SymlinkNode]:
    return st.builds(SymlinkNode, name=name, target=target)


def nodes(name: st.SearchStrategy[bytes] = names,
          target: st.SearchStrategy[bytes] = targets) -> st.SearchStrategy:
    """Any one node kind."""
    return file_nodes(name) | directory_nodes(name) | symlink_nodes(name, target)


@st.composite
def directories(draw: st.DrawFn, max_entries: int = 8) -> Directory:
    """A valid Directory: unique names spread over the three lists."""
    entry_names = draw(st.lists(names, max_size=max_entries, unique=True))
    entries = [draw(nodes(st.just(n))) for n in entry_names]
    return Directory.from_nodes(entries)


# --- build requests -----------------------------------------------------------

_ALPHA = "abcdefghijklmnopqrstuvwxyz0123456789_+.-"


def component(prefix: str) -> st.SearchStrategy[str]:
    return st.text(_ALPHA, min_size=1, max_size=6).map(lambda s: prefix + s)


def rel_path(prefix: str, max_depth: int = 2) -> st.SearchStrategy[str]:
    return st.lists(component(prefix), min_size=1, max_size=max_depth).map("/".join)


def sorted_unique(strategy: st.SearchStrategy, *, min_size: int = 0,
                  max_size: int = 3, key=lambda x: x) -> st.SearchStrategy[list]:
    return st.lists(strategy, min_size=min_size, max_size=max_size,
                    unique_by=key).map(lambda xs: sorted(xs, key=key))


env_keys = st.text(st.characters(blacklist_characters="=\0", codec="utf-8"), min_size=1,
                   max_size=8)
utf8_values = st.text(st.characters(blacklist_characters="\0", codec="utf-8"),
                      max_size=16).map(str.encode)


@st.composite
def valid_requests(draw, *, ro_paths: bool = True, utf8_env: bool = True) -> BuildRequest:
    scratch = draw(sorted_unique(rel_path("s-"), min_size=1, max_size=3))
    inputs_dir = draw(st.one_of(st.sampled_from(scratch), rel_path("n-")))
    inputs = draw(sorted_unique(nodes(component("i-").map(str.encode), _short_targets), max_size=3,
                                key=lambda n: n.name))
    outputs = sorted(set(draw(st.lists(
        st.tuples(st.sampled_from(scratch), rel_path("o-", 1)).map("/".join), max_size=3))))
    files = draw(st.lists(
        st.one_of(st.tuples(st.sampled_from(scratch), rel_path("f-")).map("/".join),
                  rel_path("f-")),
        max_size=3, unique=True))
    # no file above another
    files = [f for f in files if not any(g != f and g.startswith(f + "/") for g in files)]
    env = draw(sorted_unique(st.builds(EnvVar, key=env_keys,
                                       value=utf8_values if utf8_env else st.binary(max_size=8)
                                       .filter(lambda v: b"\0" not in v)),
                             max_size=5, key=lambda e: e.key.encode()))
    constraints = draw(st.one_of(st.none(), st.builds(
        BuildConstraints,
        system=st.sampled_from(["x86_64-linux", "aarch64-linux"]),
        min_memory=st.integers(0, 2**64 - 1),
        available_ro_paths=sorted_unique(rel_path("r-").map(lambda p: "/" + p), max_size=2,
                                         key=str.encode) if ro_paths else st.just(()),
        network_access=st.booleans(), provide_bin_sh=st.booleans())))
    return BuildRequest(
        inputs=inputs,
        command_args=draw(st.lists(st.text(st.characters(blacklist_characters="\0",
                                                         codec="utf-8"), max_size=8),
                                   max_size=3).map(lambda a: ["/bin/sh", *a])),
        working_dir=draw(st.one_of(st.sampled_from(scratch), rel_path("w-"))),
        scratch_paths=scratch,
        inputs_dir=inputs_dir,
        outputs=outputs,
        environment_vars=env,
        constraints=constraints,
        additional_files=[AdditionalFile(path=f, contents=draw(st.binary(max_size=16)))
                          for f in files],
        refscan_needles=draw(st.lists(st.text(_ALPHA, min_size=1, max_size=8), max_size=3)),
    )


@st.composite
def builds(draw) -> Build:
    req = draw(valid_requests())
    n = len(req.outputs)
    return Build(
        build_request=req,
        outputs=draw(st.lists(nodes(st.just(b""), _short_targets), min_size=n, max_size=n)),
        outputs_needles=[OutputNeedles(needles=sorted(set(draw(st.lists(
            st.integers(0, max(len(req.refscan_needles) - 1, 0)), max_size=3)))))
            for _ in range(n)],
    )


# --- pipeline DAGs ------------------------------------------------------------

@attrs.frozen
class DagSpec:
    """A random DAG: deps[i] are indices < i; per-stage flags."""

    deps: tuple[tuple[int, ...], ...]
    fail: frozenset[int]
    always: frozenset[int]
    local_kind: tuple[str | None, ...]
    sleeps: tuple[float, ...]


@st.composite
def dag_specs(draw: Any, max_stages: int = 12) -> DagSpec:
    n = draw(st.integers(1, max_stages))
    deps = []
    for i in range(n):
        if i == 0:
            deps.append(())
        else:
            deps.append(tuple(sorted(draw(st.sets(st.integers(0, i - 1), max_size=3)))))
    fail = draw(st.frozensets(st.integers(0, n - 1), max_size=max(1, n // 3)))
    always = draw(st.frozensets(st.integers(0, n - 1), max_size=2))
    local_kind = tuple(draw(st.sampled_from([None, None, "a", "b"])) for _ in range(n))
    sleeps = tuple(draw(st.sampled_from([0.0, 0.0, 0.001, 0.003])) for _ in range(n))
    return DagSpec(deps=tuple(deps), fail=fail - always, always=always,
                   local_kind=local_kind, sleeps=sleeps)

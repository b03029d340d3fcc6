"""Hypothesis strategies for build requests (one place for all build tests).

``valid_requests()`` builds requests that pass validation by construction:
each kind of path draws its components from its own prefix (``s-`` scratch,
``i-`` inputs, ``o-`` outputs, ``f-`` additional files, ``w-`` working dirs),
so no two kinds can collide, while nesting (a scratch path inside another,
inputs_dir inside a scratch path or not) still happens.
"""

from __future__ import annotations

from hypothesis import strategies as st

from stages.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from stages.request import (
    AdditionalFile,
    Build,
    BuildConstraints,
    BuildRequest,
    EnvVar,
    OutputNeedles,
)

_ALPHA = "abcdefghijklmnopqrstuvwxyz0123456789_+.-"
digests = st.binary(min_size=32, max_size=32)


def component(prefix: str) -> st.SearchStrategy[str]:
    return st.text(_ALPHA, min_size=1, max_size=6).map(lambda s: prefix + s)


def rel_path(prefix: str, max_depth: int = 2) -> st.SearchStrategy[str]:
    return st.lists(component(prefix), min_size=1, max_size=max_depth).map("/".join)


def sorted_unique(strategy: st.SearchStrategy, *, min_size: int = 0,
                  max_size: int = 3, key=lambda x: x) -> st.SearchStrategy[list]:
    return st.lists(strategy, min_size=min_size, max_size=max_size,
                    unique_by=key).map(lambda xs: sorted(xs, key=key))


def nodes(name: st.SearchStrategy[bytes]) -> st.SearchStrategy:
    return st.one_of(
        st.builds(lambda n, d, s: DirectoryNode(name=n, digest=d, size=s), name, digests,
                  st.integers(0, 2**64 - 1)),
        st.builds(lambda n, d, s, x: FileNode(name=n, digest=d, size=s, executable=x), name,
                  digests, st.integers(0, 2**64 - 1), st.booleans()),
        st.builds(lambda n, t: SymlinkNode(name=n, target=t), name,
                  st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t)),
    )


env_keys = st.text(st.characters(blacklist_characters="=\0", codec="utf-8"), min_size=1,
                   max_size=8)
utf8_values = st.text(st.characters(blacklist_characters="\0", codec="utf-8"),
                      max_size=16).map(str.encode)


@st.composite
def valid_requests(draw, *, ro_paths: bool = True, utf8_env: bool = True) -> BuildRequest:
    scratch = draw(sorted_unique(rel_path("s-"), min_size=1, max_size=3))
    inputs_dir = draw(st.one_of(st.sampled_from(scratch), rel_path("n-")))
    inputs = draw(sorted_unique(nodes(component("i-").map(str.encode)), max_size=3,
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
        outputs=draw(st.lists(nodes(st.just(b"")), min_size=n, max_size=n)),
        outputs_needles=[OutputNeedles(needles=sorted(set(draw(st.lists(
            st.integers(0, max(len(req.refscan_needles) - 1, 0)), max_size=3)))))
            for _ in range(n)],
    )

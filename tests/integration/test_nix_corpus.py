"""A corpus of derivations built by real Nix and by ocibuild: the same NAR hashes and references.

The corpus (tests/nix_corpus/*.nix) is instantiated once per module with a
fresh nonce (so every store path is new and nix-build really builds), each
case file giving an attribute set of derivations. Every derivation is built:

- by ``nix-build --keep-going`` (NIX_CONF_DIR=.nix, NIX_REMOTE=local, the
  sandbox on), the oracle: ``nix-store -q --hash`` and ``--references`` of
  each output;
- by ``ocibuild nix build --json --jobs 2`` (the CLI, one call for the whole
  corpus), once with each runtime (runc, bwrap), each over a fresh local
  store and state directory of its own; every test of ocibuild's side runs
  for both.

Attributes named ``fail_*`` must fail under both (and a derivation that
depends on one as well); every other one must build under both with equal
NAR hashes and equal references, output by output. The fixed-output
derivation with a wrong hash must fail naming both hashes, as Nix does.

Afterwards the module deletes the outputs and .drv files it made from the
Nix store (best effort: nothing else refers to them) and removes its
temporary directories.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from nix_corpus_helpers import (
    CASES,
    CORPUS,
    OCIBUILD,
    REPO,
    RUNTIMES,
    Corpus,
    instantiate,
    recursive_hash,
    sh,
    valid,
)

pytestmark = [pytest.mark.nix, pytest.mark.runc, pytest.mark.fuse, pytest.mark.timeout(300)]

@pytest.fixture(scope="module")
def corpus():
    base = Path(tempfile.mkdtemp(prefix="ocibuild-nix-corpus-"))
    base.chmod(0o711)
    c = Corpus(base, uuid.uuid4().hex[:10])
    try:
        shutil.copytree(CORPUS, c.dir, symlinks=True)
        (c.dir / "bbdir").mkdir()
        shutil.copy2("/bin/busybox", c.dir / "bbdir" / "busybox")
        rhash = recursive_hash(base, c.nonce)
        for case in CASES:
            instantiate(c, case, {"nonce": c.nonce, **({"rhash": rhash} if case == "fixed"
                                                         else {})})

        # Nix, the oracle: everything that must build in one nix-build, and each
        # failing one on its own (Nix 2.8 stops a whole --keep-going build at an
        # output cycle).
        drvs = sorted(set(c.drvs.values()))
        good = sorted(set(drvs) - c.failing)
        nix = sh("nix-build", "--no-out-link", "--keep-going", "--max-jobs", "2", *good,
                 check=False)
        c.nix_stderr = nix.stderr
        for drv in sorted(c.failing):
            c.nix_stderr += sh("nix-build", "--no-out-link", drv, check=False).stderr
        for drv in drvs:
            outs = json.loads(sh("nix", "show-derivation", drv).stdout)[drv]["outputs"]
            paths = {name: o["path"] for name, o in outs.items()}
            # Valid (registered), not only there: a failed output check leaves
            # Nix's output in the store, unregistered.
            if all(valid(p) for p in paths.values()):
                c.nix_ok.add(drv)
            c.nix_outputs[drv] = paths

        # ocibuild: the CLI, one call for the whole corpus, with each runtime.
        for runtime in RUNTIMES:
            ours = sh(*OCIBUILD, "nix", "build", "--json", "--jobs", "2",
                      *c.build_args(runtime), *drvs, check=False, cwd=REPO)
            assert ours.stdout, ours.stderr
            c.ours[runtime] = json.loads(ours.stdout)
            c.ours_rc[runtime] = ours.returncode
        yield c
    finally:
        made = [p for outs in c.nix_outputs.values() for p in outs.values()
                if os.path.exists(p)]
        if made:
            sh("nix-store", "--delete", *[p for p in made if valid(p)], check=False)
            for p in made:  # what Nix left unregistered (failed output checks)
                if os.path.lexists(p) and not valid(p):
                    subprocess.run(["rm", "-rf", p], check=False)
        if c.drvs:
            sh("nix-store", "--delete", *sorted(set(c.drvs.values())), check=False)
        shutil.rmtree(base, ignore_errors=True)


def _cases(corpus_failing: bool) -> list[str]:
    """Test ids: case.attr, known statically from the corpus files."""
    ids = []
    for case in CASES:
        text = (CORPUS / f"{case}.nix").read_text()
        body = text[text.rindex("\n{"):] if "\n{" in text else text
        for attr in re.findall(r"^  ([a-z_]+) = ", body, re.M) + \
                re.findall(r"inherit ([a-z_ ]+);", body):
            for a in attr.split():
                if a.startswith("fail_") == corpus_failing:
                    ids.append(f"{case}.{a}")
    return sorted(set(ids))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", _cases(False))
def test_same_nar_hash_and_references_as_nix(corpus: Corpus, name: str, runtime: str) -> None:
    drv = corpus.drvs[name]
    assert drv in corpus.nix_ok, f"nix-build did not build {drv}:\n{corpus.nix_stderr[-3000:]}"
    ours = corpus.ours[runtime][drv]
    assert ours["status"] == "built", ours
    assert set(ours["outputs"]) == set(corpus.nix_outputs[drv])
    for output, path in corpus.nix_outputs[drv].items():
        got = ours["outputs"][output]
        assert got["path"] == path
        assert got["nar_hash"] == sh("nix-store", "-q", "--hash", path).stdout.strip(), output
        assert got["references"] == sorted(sh("nix-store", "-q", "--references",
                                              path).stdout.split()), output


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", _cases(True))
def test_failures_fail_under_both(corpus: Corpus, name: str, runtime: str) -> None:
    drv = corpus.drvs[name]
    assert drv not in corpus.nix_ok
    ours = corpus.ours[runtime][drv]
    assert ours["status"] == "failed" and ours["error"], ours
    assert "outputs" not in ours
    assert corpus.ours_rc[runtime] != 0


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_failure_reasons_are_named(corpus: Corpus, runtime: str) -> None:
    err = {k: corpus.ours[runtime][d].get("error", "") for k, d in corpus.drvs.items()}
    assert "exit" in err["failing.fail_exit"] and "3" in err["failing.fail_exit"]
    assert "did not create" in err["failing.fail_no_output"]
    assert corpus.drvs["failing.fail_exit"] in err["failing.fail_dependent"]
    assert "cycle" in err["failing.fail_output_cycle"]
    # The wrong fixed hash: both hashes, as Nix names them in its own error (in SRI
    # form there; nix converts them to the nixbase32 form ocibuild prints).
    specified, got = re.search(r"specified: (sha256-\S+)\s+got:\s+(sha256-\S+)",
                               corpus.nix_stderr).groups()
    for sri in (specified, got):
        b32 = sh("nix", "hash", "to-base32", sri).stdout.strip()
        assert f"sha256:{b32}" in err["fixed.fail_wrong_hash"], (sri, err)
    assert "specified" in err["fixed.fail_wrong_hash"]
    # Output checks: Nix's own words, naming the output and each offending path.
    for name, bad in (("fail_allowed_refs", "dep1"), ("fail_allowed_reqs", "dep0"),
                      ("fail_disallowed_refs", "dep1"), ("fail_disallowed_reqs", "dep0")):
        drv = corpus.drvs[f"refchecks.{name}"]
        out = corpus.nix_outputs[drv]["out"]
        offending = corpus.nix_outputs[corpus.drvs[f"refchecks.{bad}"]]["out"]
        # (Nix's log indents the path further; its error text is the same.)
        words = f"output '{out}' is not allowed to refer to the following paths:"
        assert re.search(re.escape(words) + r"\n\s+" + re.escape(offending),
                         corpus.nix_stderr), (name, corpus.nix_stderr[-2000:])
        assert f"{words}\n  {offending}" in err[f"refchecks.{name}"], err[f"refchecks.{name}"]
    # With structured attributes: the output is among its own requisites, and
    # the size limits of outputChecks, in Nix's words with Nix's numbers.
    out = corpus.nix_outputs[corpus.drvs["structured.fail_structured_requisites"]]["out"]
    assert f"paths:\n  {out}" in err["structured.fail_structured_requisites"]
    assert re.search(re.escape("paths:") + r"\n\s+" + re.escape(out), corpus.nix_stderr)
    for name, pattern in (("fail_structured_max_size", r"path '{}' is too large at \d+ bytes; "
                                                        r"limit is 1000 bytes"),
                          ("fail_structured_closure_size", r"closure of path '{}' is too large "
                                                           r"at \d+ bytes; limit is 1000 bytes")):
        out = corpus.nix_outputs[corpus.drvs[f"structured.{name}"]]["out"]
        want = re.search(pattern.format(re.escape(out)), corpus.nix_stderr)
        assert want, (name, corpus.nix_stderr[-2000:])
        assert want.group(0) in err[f"structured.{name}"], err[f"structured.{name}"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_nix_log_prints_what_nix_logged(corpus: Corpus, runtime: str) -> None:
    """``ocibuild nix log DRV`` against ``nix-store --read-log`` of the same derivation."""
    for name in ("failing.fail_exit", "failing.fail_no_output"):
        drv = corpus.drvs[name]
        theirs = sh("nix-store", "--read-log", drv).stdout
        ours = sh(*OCIBUILD, "nix", "log", "--state-dir", str(corpus.state(runtime)), drv,
                  cwd=REPO).stdout
        assert ours == theirs and ours.strip(), (name, ours, theirs)
    never = sh(*OCIBUILD, "nix", "log", "--state-dir", str(corpus.base / "state"),
               corpus.drvs["outputs.multi"].replace("-", "-x", 1)[:-4] + ".drv", check=False,
               cwd=REPO)
    assert never.returncode == 1 and never.stderr.count("\n") == 1, never.stderr


KEEP_FAILED = r"""
{ nonce }:
let
  lib = import ./lib.nix { inherit nonce; };
  failing = lib.mk {
    name = "keep-failed";
    passAsFile = [ "note" ];
    note = "a note";
    # Fails until someone puts /build/fixed into its sandbox.
    script = "echo attempt >> /build/attempts; echo partial > /build/partial; mkdir -p $out; "
      + "echo half > $out/half; test -e /build/fixed || exit 4; cp /build/attempts $out/";
  };
in lib.mk {
  name = "after-keep-failed";
  script = "mkdir $out; cp ${failing}/attempts $out/seen";
}
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_keep_failed_shell_then_resume(corpus: Corpus, runtime: str) -> None:
    """The sandbox of a failed derivation: entered with `shell` (`$out` as Nix
    sets it, what the builder left), mended there, then `resume` re-runs the
    build from its run stage in that sandbox and goes on to its dependent."""
    (corpus.dir / "keepfailed.nix").write_text(KEEP_FAILED)
    top = sh("nix-instantiate", "--argstr", "nonce", corpus.nonce + runtime,
             str(corpus.dir / "keepfailed.nix")).stdout.split()[0]
    shown = json.loads(sh("nix", "show-derivation", "-r", top).stdout)
    (drv,) = [d for d in shown if "-keep-failed-" in d and "after" not in d]
    out = shown[drv]["outputs"]["out"]["path"]
    top_out = shown[top]["outputs"]["out"]["path"]
    try:
        proc = sh(*OCIBUILD, "nix", "build", "--keep-failed", *corpus.build_args(runtime), top,
                  check=False, cwd=REPO)
        assert proc.returncode == 1, proc.stderr
        found = re.search(r"enter it with: ocibuild shell --build (\S+) (\S+)\n", proc.stderr)
        assert found, proc.stderr
        key, run_id = found.groups()
        assert f"failed {top}: input derivation {drv} failed" in proc.stderr
        script = ('echo "out=$out"; read p < /build/partial; echo "partial=$p"; '
                  'read h < $out/half; echo "half=$h"; read n < $notePath; echo "note=$n"; pwd; '
                  'echo mended > /build/fixed')
        shell = subprocess.run([*OCIBUILD, "shell", "--build", key, *corpus.store_args(runtime), run_id,
                                "--", "/bin/sh", "-c", script], capture_output=True, text=True,
                               timeout=120, cwd=REPO, stdin=subprocess.DEVNULL)
        assert shell.returncode == 0, shell.stderr
        # $out as Nix sets it, and what the builder left where it left it.
        assert shell.stdout == (f"out={out}\npartial=partial\nhalf=half\nnote=a note\n"
                                "/build\n")

        resumed = sh(*OCIBUILD, "resume", *corpus.store_args(runtime), "--json", run_id,
                     check=False, cwd=REPO)
        assert resumed.returncode == 0, resumed.stderr
        result = json.loads(resumed.stdout)[top]
        assert result["status"] == "built", result
        assert result["outputs"]["out"]["path"] == top_out
        # The failed build ran again in its own sandbox (its first attempt's
        # file still there), and its dependent saw that.
        dest = corpus.base / f"resumed-export-{runtime}"
        dest.mkdir()
        store = ["--blob-service-addr", corpus.store_of(runtime), "--directory-service-addr",
                 corpus.store_of(runtime)]
        exported = Path(sh(*OCIBUILD, "nix", "export", *store, top_out, str(dest),
                           cwd=REPO).stdout.strip())
        assert (exported / "seen").read_text() == "attempt\nattempt\n"
        # Its sandbox is gone now that it passed, and nothing is left to enter.
        assert not (corpus.state(runtime) / "bundles" / key).exists()
        again = sh(*OCIBUILD, "shell", "--build", key, *corpus.store_args(runtime), run_id, "--",
                   "/bin/sh", "-c", "true", check=False, cwd=REPO)
        assert again.returncode == 1 and len(again.stderr.splitlines()) == 1, again.stderr
        listing = sh(*OCIBUILD, "runs", "--state-dir", str(corpus.state(runtime)),
                     cwd=REPO).stdout
        assert any(line.startswith(run_id) and "finished" in line
                   for line in listing.splitlines()), listing
        # A second resume of the finished run builds nothing again.
        twice = sh(*OCIBUILD, "resume", *corpus.store_args(runtime), run_id, cwd=REPO)
        assert f"built {top}" in twice.stdout
    finally:
        sh("nix-store", "--delete", top, drv, check=False)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_resume_of_a_failed_nix_run_without_kept_sandbox(corpus: Corpus, runtime: str) -> None:
    """Without --keep-failed the failed build's bundle is gone: resume makes it
    anew (fresh sandbox, so the derivation fails the same way again)."""
    (corpus.dir / "keepfailed2.nix").write_text(KEEP_FAILED)
    top = sh("nix-instantiate", "--argstr", "nonce", corpus.nonce + "x" + runtime,
             str(corpus.dir / "keepfailed2.nix")).stdout.split()[0]
    try:
        proc = sh(*OCIBUILD, "nix", "build", *corpus.build_args(runtime), top, check=False,
                  cwd=REPO)
        assert proc.returncode == 1
        run_id = _last_run(corpus, runtime)
        resumed = sh(*OCIBUILD, "resume", *corpus.store_args(runtime), run_id, check=False, cwd=REPO)
        assert resumed.returncode == 1, resumed.stderr
        assert "Traceback" not in resumed.stderr
        assert "exit code 4" in resumed.stderr, resumed.stderr
        bad = sh(*OCIBUILD, "resume", *corpus.store_args(runtime), "--from", "runn", run_id,
                 check=False, cwd=REPO)
        assert bad.returncode == 1 and "unknown stage 'runn'" in bad.stderr
        assert len(bad.stderr.splitlines()) == 1, bad.stderr
    finally:
        sh("nix-store", "--delete", top, check=False)


def _last_run(corpus: Corpus, runtime: str) -> str:
    runs = corpus.state(runtime) / "runs"
    return max(runs.iterdir(), key=lambda p: p.stat().st_mtime).name


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_rebuild_is_cached_and_export_matches_nix(corpus: Corpus, runtime: str) -> None:
    """A second call builds nothing; exported trees have Nix's NAR hash."""
    good = [d for k, d in sorted(corpus.drvs.items()) if d in corpus.nix_ok]
    again = sh(*OCIBUILD, "nix", "build", *corpus.build_args(runtime), *good, cwd=REPO)
    assert again.stdout.count("cached ") == len(good), again.stdout
    dest = corpus.base / f"export-{runtime}"
    dest.mkdir()
    for name in ("symlinks.links", "symlinks.linkout", "symlinks.exeout", "sources.copy",
                 "outputs.multi"):
        for path in corpus.nix_outputs[corpus.drvs[name]].values():
            store = ["--blob-service-addr", corpus.store_of(runtime),
                     "--directory-service-addr", corpus.store_of(runtime)]
            out = sh(*OCIBUILD, "nix", "export", *store, path, str(dest), cwd=REPO)
            exported = Path(out.stdout.strip())
            assert exported == dest / Path(path).name
            assert "sha256:" + sh("nix-hash", "--type", "sha256", "--base32",
                                  str(exported)).stdout.strip() == \
                sh("nix-store", "-q", "--hash", path).stdout.strip(), path
            again = sh(*OCIBUILD, "nix", "export", *store, path, str(dest), cwd=REPO,
                       check=False)
            assert again.returncode == 1 and "already exists" in again.stderr


def test_nix_chain_example_runs_and_agrees_with_nix() -> None:
    """dag_examples/nix_chain.py (the end of `make demo`) runs as written.

    Its verdict is not trusted: every NAR hash it prints for ocibuild is checked
    to be followed by the same hash, and the example must have built under
    the store and state directory it was given, leaving no FUSE mount.
    """
    base = Path(tempfile.mkdtemp(prefix="ocibuild-nix-chain-test-"))
    base.chmod(0o711)
    try:
        env = {k: v for k, v in os.environ.items()
               if k not in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "BUILD_SERVICE_ADDR")}
        env.update(OCIBUILD_STATE=str(base / "state"), OCIBUILD_STORE=str(base / "store"))
        proc = subprocess.run([sys.executable, str(REPO / "dag_examples" / "nix_chain.py")],
                              env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        hashes = re.findall(r"sha256:[0-9a-z]{52}", proc.stdout)
        assert len(hashes) == 2 * 4  # four outputs, each ours then Nix's
        assert all(hashes[i] == hashes[i + 1] for i in range(0, len(hashes), 2))
        assert (base / "store" / "nix-pathinfo.sqlite").is_file()
        with open("/proc/self/mountinfo") as f:
            assert str(base) not in f.read()
    finally:
        shutil.rmtree(base, ignore_errors=True)


SLEEPERS = r"""
{ nonce }:
let
  bbd = builtins.path { path = ./bbdir; name = "busybox"; };
  mk = name: script: derivation {
    name = "${name}-${nonce}"; system = builtins.currentSystem; builder = "${bbd}/busybox";
    args = [ "sh" "-c" "B=${bbd}/busybox; ${script}" ];
  };
  base = mk "base" "echo base > $out";
in {
  inherit base;
  top = mk "top" "$B cat ${base}; echo ${base} > $out";
} // builtins.listToAttrs (map (i: { name = "sleep${toString i}";
       value = mk "sleep${toString i}" "$B sleep 0.5; echo ${toString i} > $out"; })
     [ 1 2 3 4 ])
"""


def test_independent_derivations_overlap_up_to_jobs_and_built_inputs_are_skipped() -> None:
    """Four independent sleepers with jobs=2: two containers at a time, never three;
    a derivation whose input was built by an earlier call builds alone."""
    import asyncio

    from pipeline import Collector, EventKind
    from stages.nix.build import build_derivations
    from stages.nix.pathinfo import PathInfoDB
    from stages.service import OciBuildService

    base = Path(tempfile.mkdtemp(prefix="ocibuild-nix-jobs-"))
    base.chmod(0o711)
    drvs: dict[str, str] = {}
    try:
        (base / "bbdir").mkdir()
        shutil.copy2("/bin/busybox", base / "bbdir" / "busybox")
        (base / "s.nix").write_text(SLEEPERS)
        nonce = uuid.uuid4().hex[:10]
        for attr in ("base", "top", "sleep1", "sleep2", "sleep3", "sleep4"):
            drvs[attr] = sh("nix-instantiate", "--argstr", "nonce", nonce, "-A", attr,
                            str(base / "s.nix")).stdout.split()[0]
        store = f"local://{base}/store"
        events = Collector()

        async def go() -> tuple[dict, dict]:
            async with OciBuildService(base / "state", blob_address=store,
                                       directory_address=store) as svc:
                with PathInfoDB(base / "store" / "nix-pathinfo.sqlite") as pi:
                    first = await build_derivations([drvs["base"]], service=svc, pathinfo=pi,
                                                    jobs=2)
                    second = await build_derivations(
                        [drvs[a] for a in ("top", "sleep1", "sleep2", "sleep3", "sleep4")],
                        service=svc, pathinfo=pi, jobs=2, subscribers=[events])
                    return first, second

        first, second = asyncio.run(go())
        assert first[drvs["base"]].ok and not first[drvs["base"]].cached
        assert all(r.ok and not r.cached for r in second.values()), second
        assert second[drvs["top"]].outputs["out"].references == \
            (first[drvs["base"]].outputs["out"].path,)
        started = events.stages(EventKind.STAGE_STARTED)
        assert not [s for s in started if "-base-" in s], "base was built again"
        # Containers alive at once, from the run stages' start/end events.
        running, most = 0, 0
        for e in events:
            if e.stage and e.stage.endswith("/run"):
                if e.kind is EventKind.STAGE_STARTED:
                    running += 1
                    most = max(most, running)
                elif e.kind in (EventKind.STAGE_FINISHED, EventKind.STAGE_FAILED):
                    running -= 1
        assert most == 2
    finally:
        if drvs:
            sh("nix-store", "--delete", *drvs.values(), check=False)
        shutil.rmtree(base, ignore_errors=True)

"""``ocibuild build``, ``graph``, ``runs``, ``resume``, ``log`` and ``shell``.

Builds run on the OCI build service (:mod:`stages.service`) over the store
chosen by ``--blob-service-addr``/``--directory-service-addr`` (or
``BLOB_SERVICE_ADDR``/``DIRECTORY_SERVICE_ADDR``, or the embedded store),
with state (runs, bundles) in ``--state-dir`` (or the path of an
``oci:///abs/dir`` ``BUILD_SERVICE_ADDR``, or ``OCIBUILD_STATE``).

``runs --prune`` removes old runs and their bundles (:mod:`stages.service.prune`).

The first SIGINT or SIGTERM cancels the builds cleanly: containers are
killed and deleted, mounts removed, bundles removed unless kept. A second
one does not cut that short.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from stages.cli import UserError
from stages.cli.common import (
    check_timeout,
    policy_options,
    progress_option,
    run_cancellable,
    runtime,
    service,
    state_dir,
    store_options,
    subscribers,
)

__all__ = ["register"]

FORMATS = ("dot", "mermaid", "svg", "png", "text")


def _report(run: Any, specs: list[Any], sources: list[str], *, as_json: bool) -> int:
    from pipeline import RunStatus
    from stages.errors import BuildError
    from stages.request import build_to_json
    from stages.service import build_result

    failed = 0
    if run.status is RunStatus.STOPPED:
        print(f"ocibuild: run {run.run_dir.name} stopped as asked; inspect {run.run_dir} "
              f"and the bundles, continue with: ocibuild resume {run.run_dir.name}",
              file=sys.stderr)
        return 0
    for spec, source in zip(specs, sources):
        try:
            build = build_result(run, spec)
        except BuildError as exc:
            failed += 1
            print(f"ocibuild: error: {source}: {exc}", file=sys.stderr)
            continue
        if as_json:
            print(build_to_json(build), flush=True)
        else:
            from stages.castore.nodes import DirectoryNode, FileNode

            print(f"{source}: built (run {run.run_dir.name})")
            for out, node, needles in zip(spec.request.outputs, build.outputs,
                                          build.outputs_needles):
                what = ("directory" if isinstance(node, DirectoryNode)
                        else "file" if isinstance(node, FileNode) else "symlink")
                digest = getattr(node, "digest", b"").hex() or repr(getattr(node, "target", b""))
                print(f"  {out}: {what} {digest} needles {list(needles.needles)}")
    return 1 if failed else 0


def cmd_build(args: argparse.Namespace) -> int:
    from stages.graph import STAGE_NAMES
    from stages.request import read_request_file

    if args.stop_after is not None and args.stop_after.split("/")[-1] not in STAGE_NAMES:
        raise UserError(f"--stop-after: unknown stage {args.stop_after!r}; "
                        f"stages: {', '.join(STAGE_NAMES)}")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, not {args.jobs}")
    check_timeout(args.timeout)
    requests = [read_request_file(p) for p in args.requests]
    sources = [str(p) for p in args.requests]
    from stages.cli.remote_build import remote_address, run_remote

    if (address := remote_address(args)) is not None:
        return run_remote(args, address, requests, sources)
    keep = "always" if args.keep else ("failed" if args.keep_failed else "never")

    async def main() -> int:
        async with service(args, jobs=args.jobs, keep=keep, timeout=args.timeout) as svc:
            run, specs = await svc.run_builds(requests, stop_after=args.stop_after,
                                              sources=sources, subscribers=subscribers(args))
        return _report(run, specs, sources, as_json=args.json)

    return run_cancellable(main)


def _find_run(args: argparse.Namespace, run: str) -> Path:
    path = Path(run)
    if path.is_dir():
        return path.absolute()
    state = state_dir(args)
    candidate = state / "runs" / run
    if candidate.is_dir():
        return candidate
    raise UserError(f"no run {run!r} in {state / 'runs'} (see 'ocibuild runs')")


def cmd_resume(args: argparse.Namespace) -> int:
    from stages.nix.build import is_nix_run
    from stages.service import load_build_specs
    from stages.service.runs import run_runtime

    run_dir = _find_run(args, args.run)
    if is_nix_run(run_dir):
        from stages.cli.nix_cmd import resume_nix

        return resume_nix(args, run_dir)
    specs = load_build_specs(run_dir)
    sources = [s.key for s in specs]

    async def main() -> int:
        async with service(args, jobs=args.jobs,
                           runtime=runtime(args, run_runtime(run_dir))) as svc:
            run, specs2 = await svc.resume_run(run_dir, from_stage=args.from_stage,
                                               stop_after=args.stop_after,
                                               subscribers=subscribers(args))
        return _report(run, specs2, sources, as_json=args.json)

    return run_cancellable(main)


def cmd_runs(args: argparse.Namespace) -> int:
    from stages.service import list_runs

    if args.prune:
        return _prune(args)
    given = [o for o, v in (("--keep", args.keep), ("--older-than", args.older_than),
                            ("--dry-run", args.dry_run or None)) if v is not None]
    if given:
        raise UserError(f"{', '.join(given)}: only with --prune")
    state = state_dir(args)
    rows = list_runs(state)
    if not rows:
        print(f"no runs in {state / 'runs'}")
        return 0
    for path, run, problem in rows:
        if run is None:
            print(f"{path.name}  unreadable: {problem}")
            continue
        counts = run.state_counts()
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"{path.name}  {run.status.value:<9}  {summary}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    import time

    from stages.service.prune import (
        CLI_KEEP,
        PruneSettings,
        format_duration,
        parse_duration,
        prune_runs,
    )

    if args.keep is not None and args.keep < 0:
        raise UserError(f"--keep must be 0 or more, not {args.keep}")
    try:
        older_than = None if args.older_than is None else parse_duration(args.older_than)
    except ValueError as exc:
        raise UserError(f"--older-than: {exc}") from None
    keep = args.keep if args.keep is not None or older_than is not None else CLI_KEEP
    state = state_dir(args)
    now = time.time()
    report = prune_runs(state, PruneSettings(keep=keep, older_than=older_than),
                        dry_run=args.dry_run, now=now)
    verb = "would remove" if args.dry_run else "removed"
    for r in report.removed:
        bundles = f"  with bundle{'s' if len(r.bundles) > 1 else ''} {', '.join(r.bundles)}" \
            if r.bundles else ""
        print(f"{verb} {r.run_id}  {r.status:<10}  last active "
              f"{format_duration(now - r.last_active)} ago{bundles}")
    for run_id in report.spared:
        print(f"spared {run_id}  running")
    for line in report.errors:
        print(f"ocibuild: error: {line}", file=sys.stderr)
    n, b = len(report.removed), report.bundles
    summary = (f"{verb} {n} run{'' if n == 1 else 's'} and {b} bundle{'' if b == 1 else 's'} "
               f"from {state / 'runs'} ({report.settings.describe()}); kept {report.kept}")
    if report.spared:
        summary += f", spared {len(report.spared)} running"
    print(summary + (" (dry run)" if args.dry_run else ""))
    return 1 if report.errors else 0


def cmd_graph(args: argparse.Namespace) -> int:
    from pipeline import render_image, to_dot, to_mermaid, to_text
    from stages.context import BuildSpec
    from stages.graph import build_graph
    from stages.request import read_request_file

    req = read_request_file(args.request)
    graph = build_graph(BuildSpec(request=req, key="graph"), None)
    fmt = args.format or (args.output.suffix.lstrip(".") if args.output else "text")
    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt in ("svg", "png"):
        if args.output is None:
            raise UserError(f"--format {fmt} needs -o FILE")
        render_image(graph, args.output, format=fmt)
        return 0
    text = {"dot": to_dot, "mermaid": to_mermaid, "text": to_text}[fmt](graph)
    if args.output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        args.output.write_text(text)
    return 0


def _run_is_live(run_dir: Path) -> bool:
    """Whether the run is still running: its record says so, and a live service
    instance has its keys (a run whose owner died stays "running" on disk)."""
    from pipeline import RunStatus, load_run
    from stages.service.recovery import live_instance_keys
    from stages.service.runs import key_of_run

    try:
        if load_run(run_dir).status is not RunStatus.RUNNING:
            return False
    except Exception:  # noqa: BLE001 - an unreadable record is no running run
        return False
    state = run_dir.parent.parent
    return any(key_of_run(run_dir.name, key) for key in live_instance_keys(state))


def cmd_log(args: argparse.Namespace) -> int:
    import time

    run_dir = _find_run(args, args.run)
    logs_dir = run_dir / "logs"
    if args.build is not None:
        if not args.build or "/" in args.build or args.build.startswith("."):
            raise UserError(f"--build {args.build!r}: not a build key")
        chosen = logs_dir / f"{args.build}.log"
        if not chosen.is_file() and not args.follow:
            raise UserError(f"run {run_dir.name} has no log of build {args.build!r}")
    out = sys.stdout.buffer
    offsets: dict[Path, int] = {}
    last: list[Path | None] = [None]

    def copy_new() -> bool:
        """Write what the logs gained since last time; whether there was any."""
        paths = [chosen] if args.build is not None else sorted(logs_dir.glob("*.log"))
        several = args.build is None and len(paths) > 1
        grew = False
        for path in paths:
            try:
                with open(path, "rb") as f:
                    f.seek(offsets.get(path, 0))
                    while data := f.read(1 << 20):
                        if several and last[0] != path:
                            out.write(f"==> {path.stem} <==\n".encode())
                        last[0] = path
                        out.write(data)
                        offsets[path] = offsets.get(path, 0) + len(data)
                        grew = True
                    out.flush()
            except FileNotFoundError:
                continue
        return grew

    copy_new()
    if not args.follow:
        if not offsets and args.build is None and not any(logs_dir.glob("*.log")):
            print(f"ocibuild: run {run_dir.name} has no builder output (yet)", file=sys.stderr)
        return 0
    try:
        while True:
            live = _run_is_live(run_dir)
            if not copy_new() and not live:
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 130


def cmd_shell(args: argparse.Namespace) -> int:
    from stages.cli.shell import open_shell

    run_dir = _find_run(args, args.run)
    return open_shell(run_dir, args, command=args.command or None)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build BuildRequest files in OCI containers",
                       description="Build each REQUEST (a tvix.build.v1.BuildRequest as proto "
                                   "JSON .json, binary .pb/.binpb or text .txtpb/.textproto). "
                                   "Independent requests build concurrently.")
    p.add_argument("requests", nargs="+", type=Path, metavar="REQUEST")
    p.add_argument("--json", action="store_true",
                   help="print each Build as one line of proto-JSON")
    p.add_argument("--jobs", "-j", type=int, default=None,
                   help="concurrent builds (default: the number of cores)")
    p.add_argument("--stop-after", metavar="STAGE",
                   help="stop after this stage (validate, spec, bundle, mount, run, ingest) "
                        "and keep the bundle for inspection")
    p.add_argument("--keep-failed", action="store_true",
                   help="keep the bundle of a failed build for inspection and 'ocibuild shell'")
    p.add_argument("--keep", action="store_true", help="keep every bundle")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="kill a builder that runs longer than this")
    p.add_argument("--build-service-addr", metavar="ADDR",
                   help="bwrap:///abs/state/dir builds here with bubblewrap (oci:///... with "
                        "runc, the default); grpc+unix:///abs/path, grpc+http(s)://host:port "
                        "or ray://... build remotely "
                        "(default: $BUILD_SERVICE_ADDR when it is a grpc+ address)")
    p.add_argument("--no-fetch-outputs", action="store_true",
                   help="remote builds: leave the outputs in the server's store")
    progress_option(p)
    store_options(p)
    policy_options(p)
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("graph", help="draw the stage graph of a build")
    p.add_argument("request", type=Path, metavar="REQUEST")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: from -o's suffix, else text)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE")
    p.set_defaults(handler=cmd_graph)

    p = sub.add_parser("runs", help="list build runs and their state, or prune them",
                       description="List build runs and their state. With --prune, remove "
                                   "the runs (and their kept bundles) beyond the newest "
                                   "--keep N and/or last active longer ago than --older-than; "
                                   "a running run is never removed.")
    p.add_argument("--state-dir", type=Path, metavar="DIR")
    p.add_argument("--prune", action="store_true",
                   help="remove old runs instead of listing them")
    p.add_argument("--keep", type=int, default=None, metavar="N",
                   help="with --prune: keep the newest N runs (default 100 unless "
                        "--older-than is given)")
    p.add_argument("--older-than", default=None, metavar="DURATION",
                   help="with --prune: remove runs last active longer ago than this "
                        "(45s, 90m, 12h, 30d)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --prune: list what would be removed, remove nothing")
    p.set_defaults(handler=cmd_runs)

    p = sub.add_parser("resume", help="continue a stopped or failed run",
                       description="Continue a run of 'ocibuild build' or 'ocibuild nix "
                                   "build' in its directory: finished stages are reused, a "
                                   "failed build goes on from its failed stage (in the "
                                   "sandbox it left, when kept; a build whose bundle is gone "
                                   "makes it anew). The operator's options apply again.")
    p.add_argument("run", metavar="RUN", help="run id (see 'ocibuild runs') or directory")
    p.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="re-run from this stage on (default: the first unfinished one); "
                        "STAGE alone: of the last build ('nix build' runs: of every "
                        "derivation not yet built), KEY/STAGE: of one build")
    p.add_argument("--stop-after", metavar="STAGE")
    p.add_argument("--json", action="store_true")
    p.add_argument("--jobs", "-j", type=int, default=None)
    progress_option(p)
    store_options(p)
    policy_options(p)
    p.set_defaults(handler=cmd_resume)

    p = sub.add_parser("log", help="print a run's builder output",
                       description="Print what the builders of a run wrote (stdout and "
                                   "stderr, as written), each build's log after a header "
                                   "when the run has several; with --follow, keep printing "
                                   "as they write until the run ends.")
    p.add_argument("run", metavar="RUN", help="run id (see 'ocibuild runs') or directory")
    p.add_argument("--build", metavar="KEY", help="only this build's log")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new output while the run is running")
    p.add_argument("--state-dir", type=Path, metavar="DIR")
    p.set_defaults(handler=cmd_log)

    p = sub.add_parser("shell", help="a shell inside the sandbox of a kept run",
                       usage="%(prog)s [--build KEY] RUN [-- COMMAND...]")
    p.add_argument("--build", metavar="KEY",
                   help="which build of a run of several requests (default: the last); "
                        "give it before RUN")
    p.add_argument("run", metavar="RUN", help="run id (see 'ocibuild runs') or directory")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="command to run instead of an interactive shell")
    store_options(p)
    p.set_defaults(handler=cmd_shell)

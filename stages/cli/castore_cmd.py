"""``ocibuild castore``: import paths, export NARs, mount nodes.

::

    ocibuild castore [STORE OPTIONS] import [--json] PATH...
    ocibuild castore [STORE OPTIONS] nar          < node.json > out.nar
    ocibuild castore [STORE OPTIONS] mount MOUNTPOINT < nodes.jsonl

A node on stdin or stdout is one line of proto-JSON of
``tvix.castore.v1.Node`` (``google.protobuf.json_format``), so the output of
``import --json`` is the input of ``nar`` and ``mount``.

Store options (on the group or on each command; the command's win):
``--blob-service-addr`` and ``--directory-service-addr``, defaulting to
``$BLOB_SERVICE_ADDR`` / ``$DIRECTORY_SERVICE_ADDR``, else the embedded local
store (``$OCIBUILD_STORE`` or the XDG data directory).

Caveats:

- ``nar`` streams: when a blob deep in the tree turns out missing or corrupt,
  the bytes before it are already on stdout; the exit status is then non-zero
  and the output must be discarded.
- ``mount`` checks that every node's root is in the store before mounting;
  what lies below a root is only read when a process looks at it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from stages.cli import UserError

__all__ = ["register"]


def _store_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    group = parser.add_argument_group("store")
    group.add_argument(
        "--blob-service-addr", metavar="URL", default=default,
        help="blob service address, e.g. local:///abs/dir, memory://, grpc+unix:///path "
             "(default: $BLOB_SERVICE_ADDR, else the embedded local store)")
    group.add_argument(
        "--directory-service-addr", metavar="URL", default=default,
        help="directory service address (default: $DIRECTORY_SERVICE_ADDR, else the "
             "embedded local store)")


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser(
        "castore", help="the content-addressed store: import, NAR export, mount",
        description="Work with the content-addressed store (castore).")
    _store_options(group, default=None)
    sub = group.add_subparsers(dest="castore_command", metavar="COMMAND", required=True)

    # Store options repeated per command; SUPPRESS keeps the group's value
    # unless the command's option is given.
    imp = sub.add_parser(
        "import", help="import paths; print their root nodes",
        description="Import each PATH (directory, file or symlink; symlinks are not "
                    "followed) into the store and print its root node, named by the "
                    "path's basename.")
    _store_options(imp, default=argparse.SUPPRESS)
    imp.add_argument("--json", action="store_true",
                     help="print one proto-JSON tvix.castore.v1.Node line per path")
    imp.add_argument("paths", nargs="+", metavar="PATH")
    imp.set_defaults(handler=_run_import)

    nar = sub.add_parser(
        "nar", help="write the NAR of a node read on stdin",
        description="Read one proto-JSON tvix.castore.v1.Node line on stdin and write "
                    "its NAR serialization (as nix-store --dump would) to stdout.")
    _store_options(nar, default=argparse.SUPPRESS)
    nar.set_defaults(handler=_run_nar)

    mount = sub.add_parser(
        "mount", help="serve nodes read on stdin as a read-only FUSE filesystem",
        description="Read proto-JSON tvix.castore.v1.Node lines on stdin (each named, "
                    "names unique) and serve them under their names at MOUNTPOINT until "
                    "SIGINT or SIGTERM; then unmount and exit 0.")
    _store_options(mount, default=argparse.SUPPRESS)
    mount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    mount.set_defaults(handler=_run_mount)


# --- helpers -----------------------------------------------------------------

def _open_castore(args: argparse.Namespace):
    from stages.castore.addresses import open_castore

    return open_castore(args.blob_service_addr, args.directory_service_addr)


def _read_node_lines(text: str, *, what: str) -> list:
    """Parse proto-JSON Node lines; blank lines are ignored."""
    from stages.castore.errors import ValidationError
    from stages.castore.nodes import node_from_json

    nodes = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            nodes.append(node_from_json(line))
        except ValidationError as exc:
            raise UserError(f"{what}, line {number}: malformed node: {exc}") from exc
    return nodes


def _read_stdin() -> str:
    if sys.stdin is None:
        raise UserError("stdin is closed; pipe proto-JSON node lines into this command")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"stdin: not UTF-8 text (proto-JSON expected): {exc}") from exc


async def _check_root_present(castore, node) -> None:
    """NotFoundError naming the digest when a node's root is not stored."""
    from stages.castore.errors import NotFoundError
    from stages.castore.nodes import DirectoryNode, FileNode, blob_digest

    if isinstance(node, DirectoryNode):
        if await castore.directories.get(node.digest) is None:
            raise NotFoundError("directory", node.digest)
    elif isinstance(node, FileNode):
        if node.digest != blob_digest(b"") and await castore.blobs.stat(node.digest) is None:
            raise NotFoundError("blob", node.digest)


def _describe(node) -> tuple[str, str, str]:
    from stages.castore.nodes import DirectoryNode, FileNode

    if isinstance(node, DirectoryNode):
        return "directory", node.digest.hex(), f"size={node.size}"
    if isinstance(node, FileNode):
        kind = "executable" if node.executable else "file"
        return kind, node.digest.hex(), f"size={node.size}"
    return "symlink", "-", "target=" + os.fsdecode(node.target)


# --- import ------------------------------------------------------------------

def _run_import(args: argparse.Namespace) -> int:
    for path in args.paths:
        try:
            os.lstat(path)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file or directory") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot be read: {exc.strerror}") from None
    return asyncio.run(_import(args))


async def _import(args: argparse.Namespace) -> int:
    from stages.castore.ingest import ingest_path
    from stages.castore.nar import format_nar_hash, nar_hash_and_size
    from stages.castore.nodes import node_to_json

    castore = _open_castore(args)
    try:
        for path in args.paths:
            node = await ingest_path(castore, path)
            if args.json:
                line = node_to_json(node)
            else:
                digest, _size = await nar_hash_and_size(castore, node)
                kind, hexdigest, size = _describe(node)
                line = f"{path}  {kind}  {hexdigest}  {size}  nar={format_nar_hash(digest)}"
            print(line, flush=True)
    finally:
        await castore.aclose()
    return 0


# --- nar ---------------------------------------------------------------------

def _run_nar(args: argparse.Namespace) -> int:
    nodes = _read_node_lines(_read_stdin(), what="stdin")
    if len(nodes) != 1:
        raise UserError(f"stdin: expected exactly one proto-JSON node line, got {len(nodes)}")
    if sys.stdout.isatty():
        raise UserError("stdout is a terminal; redirect the NAR to a file or a pipe")
    return asyncio.run(_nar(args, nodes[0]))


async def _nar(args: argparse.Namespace, node) -> int:
    from stages.castore.nar import nar_chunks

    castore = _open_castore(args)
    try:
        await _check_root_present(castore, node)
        out = sys.stdout.buffer
        async for chunk in nar_chunks(castore, node):
            out.write(chunk)
        out.flush()
    finally:
        await castore.aclose()
    return 0


# --- mount -------------------------------------------------------------------

def _run_mount(args: argparse.Namespace) -> int:
    from stages.castore.nodes import validate_name

    mountpoint: Path = args.mountpoint
    if not mountpoint.is_dir():
        raise UserError(f"{mountpoint}: mountpoint is not an existing directory")
    nodes = _read_node_lines(_read_stdin(), what="stdin")
    if not nodes:
        raise UserError("stdin: no nodes to mount; pipe proto-JSON node lines in "
                        "(e.g. from ocibuild castore import --json)")
    seen: dict[bytes, int] = {}
    for number, node in enumerate(nodes, start=1):
        if not node.name:
            raise UserError(f"stdin, node {number}: a mounted node needs a name "
                            f"(it becomes the entry under {mountpoint})")
        validate_name(node.name)
        if node.name in seen:
            raise UserError(f"stdin, node {number}: name {node.name!r} already used by "
                            f"node {seen[node.name]}; names must be unique")
        seen[node.name] = number
    asyncio.run(_check_all_present(args, nodes))

    from stages.castore.fuse import serve_until_signal

    serve_until_signal(mountpoint, nodes, args.blob_service_addr, args.directory_service_addr)
    return 0


async def _check_all_present(args: argparse.Namespace, nodes: list) -> None:
    castore = _open_castore(args)
    try:
        for node in nodes:
            await _check_root_present(castore, node)
    finally:
        await castore.aclose()

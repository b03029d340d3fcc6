"""The second runtime: a bundle's config.json rendered as bubblewrap arguments.

The sandbox is described once, by the spec stage, as an OCI runtime spec
(config.json); runc reads it, and :func:`bwrap_argv` renders the same
description for ``bwrap`` (Debian's bubblewrap 0.8):

- namespaces: user, pid, ipc, uts, mount, cgroup (``--unshare-*``); a
  network namespace of its own unless the spec names one to join (the
  service's slirp4netns namespace: entered with ``nsenter`` before bwrap
  starts) or shares the host's (no ``network`` namespace in the spec);
- ids: bwrap runs as the build user's host uid and gid (the id map's,
  as runc maps them), which the new user namespace maps to the spec's
  ``process.user`` (1000/100): files of the build user look the same as
  under runc; the host's other ids are unmapped (nobody);
- mounts, in the spec's order, on the bundle's rootfs bound at ``/``
  (read-only at the end when ``root.readonly``): ``--proc``, ``--dev``
  (its own /dev/pts and /dev/shm), tmpfs with their mode and size, bind
  mounts read-only (what is mounted below a read-only source too) or not;
  ``maskedPaths`` covered (/dev/null over files,
  an empty read-only tmpfs over directories; those missing skipped, as
  runc skips them), ``readonlyPaths`` bound read-only onto themselves;
- the environment exactly the spec's (``--clearenv``), its cwd, hostname;
- seccomp: the spec's ``linux.seccomp`` compiled to BPF with libseccomp
  (:func:`compile_seccomp`, through pyseccomp) and passed as ``--seccomp
  FD``; bwrap sets no_new_privs and drops every capability;
- limits: the service's build cgroup (:mod:`stages.oci.cgroups`), which the
  launching shell joins before it execs bwrap, so nothing of the build ever
  runs outside it; rlimits are this process's own, inherited (the spec
  lists the same, :func:`stages.spec.own_rlimits`); umask 022.

:class:`BwrapSandbox` runs it with :class:`~stages.oci.process.SandboxProcess`'s
streaming and teardown. ``--die-with-parent`` and ``--as-pid-1``: the
builder is pid 1 of its pid namespace, and dies (with everything it
started) when bwrap or its owner dies; teardown SIGKILLs bwrap's process
group and whatever is left in the build's cgroup.

Caveats:

- The launcher is ``/bin/sh -c`` (joining the cgroup, opening the BPF
  file), then ``nsenter`` (a network namespace to join) and ``setpriv``
  (the build user's host ids): a few exec()s, ~1 ms, still far cheaper
  than runc's start.
- bwrap's /dev is its own (null, zero, full, random, urandom, tty, ptmx,
  pts, shm): Nix's, and a ``core`` link to the masked /proc/kcore.
- bwrap puts ``PWD`` (the working directory) into the builder's initial
  environment, always: a shell sets it anyway, a builder that is not a
  shell sees one variable more than under runc or Nix.
- ``--dev`` makes /dev without the spec's size (what is written there
  counts against the build's memory limit), and /dev/shm without noexec;
  on cgroup v1 only the memory and pids controllers are joined (nodev
  mounts and the user namespace keep devices out).
- ``readonlyPaths`` (/proc/sys, /proc/bus...) are bound read-only from the
  host's /proc (bwrap binds host paths only), not remounted from the
  sandbox's own: the same system-wide files, read-only either way.
- A shell (``ocibuild shell``) runs in a session of its own, so it has no
  controlling terminal: no job control, and no way to push input into the
  operator's terminal (runc gives it a pty of its own instead).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.errors import BundleError
from stages.oci.process import SandboxProcess
from stages.util.aio import Child
from stages.util.files import write_atomic

__all__ = ["BwrapSandbox", "bwrap_argv", "compile_seccomp"]

BWRAP = "bwrap"

#: The launcher: join the cgroups, set the umask, open the BPF program as fd 3, exec.
_LAUNCH = r"""
umask "$1"; bpf=$2; n=$3; shift 3
while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n - 1)); done
if [ -n "$bpf" ]; then exec 3< "$bpf" || exit 125; fi
exec "$@"
"""

_SECCOMP_ACTIONS = ("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                    "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP")
_SECCOMP_OPS = ("SCMP_CMP_EQ", "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_GT",
                "SCMP_CMP_GE", "SCMP_CMP_MASKED_EQ")
_compiled: dict[str, bytes] = {}


def compile_seccomp(profile: dict[str, Any]) -> bytes:
    """A runtime-spec ``linux.seccomp`` value as a BPF program (libseccomp),
    for this machine's architecture. Calls the kernel does not know here are
    left out, as runc leaves them out. Cached per profile."""
    key = hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest()
    if key in _compiled:
        return _compiled[key]
    import pyseccomp as sc

    def action(name: str, errno_ret: int | None) -> int:
        if name not in _SECCOMP_ACTIONS:
            raise BundleError("config.json", f"seccomp action {name} is not supported")
        if name == "SCMP_ACT_ERRNO":
            return int(sc.ERRNO(errno_ret if errno_ret is not None else 1))
        return int(getattr(sc, name.removeprefix("SCMP_ACT_")))

    ops = {op: getattr(sc, op.removeprefix("SCMP_CMP_")) for op in _SECCOMP_OPS}
    archs = profile.get("architectures") or []
    if archs not in ([], ["SCMP_ARCH_X86_64"]) or os.uname().machine != "x86_64":
        raise BundleError("config.json", f"seccomp architectures {archs} on "
                                         f"{os.uname().machine}: only x86_64 is supported")
    default = action(profile["defaultAction"], profile.get("defaultErrnoRet"))
    f = sc.SyscallFilter(default)
    for rule in profile.get("syscalls", []):
        act = action(rule["action"], rule.get("errnoRet"))
        if act == default:
            continue  # libseccomp refuses a rule that says what the default says
        args = []
        for a in rule.get("args") or []:
            if a["op"] not in ops:
                raise BundleError("config.json", f"seccomp operator {a['op']} is not supported")
            args.append(sc.Arg(a["index"], ops[a["op"]], a["value"], a.get("valueTwo", 0)))
        for name in rule["names"]:
            try:
                number = sc.resolve_syscall(sc.Arch.NATIVE, name)
            except (ValueError, OSError, RuntimeError):
                continue
            if number < 0:
                continue  # not a call of this architecture
            f.add_rule(act, name, *args)
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        program = out.read()
    _compiled[key] = program
    return program


def _program_file(profile: dict[str, Any], directory: Path) -> Path:
    """The compiled filter as a file in ``directory``, named by its content and
    written once (atomically) for every build that has the same profile."""
    program = compile_seccomp(profile)
    path = directory / f".seccomp-{hashlib.sha256(program).hexdigest()[:32]}.bpf"
    if not path.exists():
        write_atomic(path, program)
    return path


def _size(options: list[str]) -> int | None:
    for opt in options:
        if opt.startswith("size="):
            text = opt[5:].lower()
            scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
            return int(text.rstrip("kmg")) * scale
    return None


def _mode(options: list[str]) -> str | None:
    for opt in options:
        if opt.startswith("mode="):
            return opt[5:].zfill(4)
    return None


def bwrap_argv(config: dict[str, Any], bundle_dir: Path, *, seccomp_fd: int | None = 3,
               attached: bool = False, bwrap: str = BWRAP) -> list[str]:
    """The bwrap command that runs ``config`` (a bundle's config.json) as runc would.

    ``attached`` (a shell on the caller's terminal) changes nothing: the
    sandbox gets a session of its own either way (see the module caveats)."""
    proc = config["process"]
    linux = config.get("linux", {})
    kinds = {ns["type"]: ns.get("path") for ns in linux.get("namespaces", [])}
    for needed in ("user", "mount", "pid"):
        if needed not in kinds:
            raise BundleError(bundle_dir, f"the bwrap runtime needs a {needed} namespace")
    # --new-session even for a shell on the operator's terminal: the sandbox
    # must not have it as its controlling terminal, or it could push input
    # into the operator's own shell (TIOCSTI). (The shell gets no job control.)
    argv = [bwrap, "--die-with-parent", "--as-pid-1", "--unshare-user", "--disable-userns",
            "--unshare-pid", "--unshare-cgroup-try", "--new-session"]
    if "ipc" in kinds:
        argv.append("--unshare-ipc")
    if "uts" in kinds:
        argv.append("--unshare-uts")
    if "network" in kinds and kinds["network"] is None:
        argv.append("--unshare-net")
    user = proc.get("user", {})
    argv += ["--uid", str(user.get("uid", 0)), "--gid", str(user.get("gid", 0))]
    if config.get("hostname") and "uts" in kinds:
        argv += ["--hostname", config["hostname"]]
    root = config["root"]
    rootfs = Path(root["path"])
    argv += ["--bind", str(rootfs if rootfs.is_absolute() else bundle_dir / rootfs), "/"]
    mounts = _MountTable()
    for m in config.get("mounts", []):
        argv += _mount(m, bundle_dir, mounts)
    for path in linux.get("maskedPaths", []):
        # As runc: what does not exist (here: on the host, whose /proc the
        # sandbox's mirrors) is not masked.
        if not os.path.exists(path):
            continue
        if os.path.isdir(path):
            argv += ["--perms", "0555", "--tmpfs", path, "--remount-ro", path]
        else:
            argv += ["--ro-bind-try", "/dev/null", path]
    for path in linux.get("readonlyPaths", []):
        argv += ["--ro-bind-try", path, path]
    if root.get("readonly"):
        argv += ["--remount-ro", "/"]
    argv.append("--clearenv")
    for entry in proc.get("env", []):
        key, _, value = entry.partition("=")
        argv += ["--setenv", key, value]
    argv += ["--chdir", proc.get("cwd", "/")]
    if seccomp_fd is not None and linux.get("seccomp"):
        argv += ["--seccomp", str(seccomp_fd)]
    return [*argv, "--", *proc["args"]]


def _mount(m: dict[str, Any], bundle_dir: Path, mounts: _MountTable) -> list[str]:
    dest, kind = m["destination"], m.get("type", "")
    options = list(m.get("options", []))
    if dest in ("/dev/pts", "/dev/mqueue"):
        return []  # bwrap's /dev has its own pts; Nix's sandbox has no mqueue
    if kind == "proc":
        return ["--proc", dest]
    if dest == "/dev" and kind == "tmpfs":
        return ["--dev", dest]
    if kind == "tmpfs":
        out = []
        if (mode := _mode(options)) is not None:
            out += ["--perms", mode]
        if (size := _size(options)) is not None:
            out += ["--size", str(size)]
        return [*out, "--tmpfs", dest]
    if kind == "sysfs":
        return ["--ro-bind", "/sys", dest]
    if kind in ("bind", "none", "") and ("bind" in options or "rbind" in options):
        source = Path(m["source"])
        source = source if source.is_absolute() else bundle_dir / source
        if not {"ro", "rro"} & set(options):
            return ["--bind", str(source), dest]
        # bwrap binds recursively and makes only the top read-only: what is
        # mounted below the source is made read-only too, all the way down
        # (runc's plain "ro" leaves those as they are; read-only is safer).
        out = ["--ro-bind", str(source), dest]
        for below in mounts.below(str(source)):
            out += ["--remount-ro", os.path.join(dest, below)]
        return out
    raise BundleError(bundle_dir, f"mount {dest} of type {kind!r}: not supported by the "
                                  f"bwrap runtime")


class _MountTable:
    """This host's mount points (/proc/self/mountinfo), read once, when first asked."""

    def __init__(self) -> None:
        self._points: list[str] | None = None

    def below(self, path: str) -> list[str]:
        """The mount points strictly below ``path``, relative to it, parents first."""
        if self._points is None:
            self._points = []
            info = ""
            with contextlib.suppress(OSError):
                info = Path("/proc/self/mountinfo").read_text()
            for line in info.splitlines():
                fields = line.split(" ")
                if len(fields) > 4:
                    self._points.append(re.sub(
                        r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
            _mounts_now(info)
        real = _realpath(path).rstrip("/") + "/"
        found = {p[len(real):] for p in self._points if p.startswith(real)}
        return sorted(found, key=lambda p: (p.count("/"), p))


def _realpath(path: str, depth: int = 0) -> str:
    """``os.path.realpath(path)`` in fewer calls: the parent's through
    :func:`_real_dir`, then only the last component is looked at. (An input's
    source is a link into the FUSE mount, several per build.)"""
    if depth >= 40 or ".." in path.split("/"):
        # A link loop or a very deep path; or ".." (after a link: the link
        # target's parent): realpath's own answer.
        return os.path.realpath(path)
    path = os.path.abspath(path)
    if path == "/":
        return path
    parent, name = os.path.split(path)
    real_parent = _real_dir(parent, depth + 1)
    candidate = os.path.join(real_parent, name)
    try:
        target = os.readlink(candidate)
    except OSError:  # not a link, or not there: as realpath leaves it
        return candidate
    return _realpath(os.path.join(real_parent, target), depth + 1)


#: directory -> (its real path, st_dev, st_ino when resolved), while the
#: mount table is :data:`_REAL_DIRS_MOUNTS`.
_REAL_DIRS: dict[str, tuple[str, int, int]] = {}
_REAL_DIRS_MOUNTS = [""]


def _mounts_now(info: str) -> None:
    """Forget the remembered real paths when the mount table changed: two bind
    mounts of one directory are the same (st_dev, st_ino), yet a path may
    now lead through the other one, with other mounts below it."""
    if info != _REAL_DIRS_MOUNTS[0]:
        _REAL_DIRS.clear()
        _REAL_DIRS_MOUNTS[0] = info


def _real_dir(path: str, depth: int = 0) -> str:
    """:func:`_realpath` of a directory, remembered while both the path and
    the remembered real path lead to the same directory: two stats instead
    of an lstat per component (the builds' sources share their parents)."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    known = _REAL_DIRS.get(path)
    if known is not None and known[1:] == (st.st_dev, st.st_ino):
        with contextlib.suppress(OSError):
            there = os.stat(known[0])
            if (there.st_dev, there.st_ino) == known[1:]:
                return known[0]
    real = _realpath(path, depth)
    if len(_REAL_DIRS) > 1024:
        _REAL_DIRS.clear()
    _REAL_DIRS[path] = (real, st.st_dev, st.st_ino)
    return real


class BwrapSandbox(SandboxProcess):
    """One bwrap run of a bundle (its config.json), as the build user's host ids.

    ``cgroup_procs``: the cgroup.procs files the sandbox joins first. A
    network namespace the spec names is entered before bwrap starts.
    """

    tool = "bwrap"

    def __init__(self, bundle_dir: Path | str, container_id: str, *, uid: int, gid: int,
                 cgroup_procs: Sequence[Path] = (), bwrap: str = BWRAP,
                 stop_timeout: float = 5.0) -> None:
        super().__init__(container_id, stop_timeout=stop_timeout)
        self.bundle_dir = Path(bundle_dir)
        self.uid = uid
        self.gid = gid
        self.cgroup_procs = list(cgroup_procs)
        self.bwrap = bwrap

    def _config(self) -> dict[str, Any]:
        try:
            return json.loads((self.bundle_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(self.bundle_dir, f"unreadable config.json: {exc}") from exc

    def argv(self, *, attached: bool) -> list[str]:
        config = self._config()
        limits = config.get("linux", {}).get("resources", {})
        if (limits.get("pids") or limits.get("memory")) and not self.cgroup_procs:
            # runc applies linux.resources itself; bwrap has only the cgroup.
            raise BundleError(self.bundle_dir, "the bwrap runtime applies the limits through "
                                               "a cgroup, and this sandbox has none (a "
                                               "writable cgroup file system is needed)")
        bpf = ""
        if config.get("linux", {}).get("seccomp"):
            bpf = str(_program_file(config["linux"]["seccomp"], self.bundle_dir.parent))
        inner = bwrap_argv(config, self.bundle_dir, seccomp_fd=3 if bpf else None,
                           attached=attached, bwrap=self.bwrap)
        prefix: list[str] = []
        for ns in config.get("linux", {}).get("namespaces", []):
            if ns["type"] == "network" and ns.get("path"):
                prefix += ["nsenter", f"--net={ns['path']}", "--"]
        prefix += ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                   "--"]
        return ["/bin/sh", "-c", _LAUNCH, "ocibuild-bwrap", "022", bpf,
                str(len(self.cgroup_procs)), *map(str, self.cgroup_procs), *prefix, *inner]

    async def kill(self, proc: Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._kill_cgroup()

    def _kill_cgroup(self) -> bool:
        """SIGKILL whatever of the build is left in its cgroup; whether any was."""
        found = False
        for procs in self.cgroup_procs:
            with contextlib.suppress(OSError, ValueError):
                for pid in procs.read_text().split():
                    found = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        return found

    async def cleanup(self) -> None:
        # bwrap has exited; the sandbox's processes die with it (parent death
        # signal), a moment later: the cgroup is empty before anyone removes it.
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_timeout
        while self._kill_cgroup() and loop.time() < deadline:
            await asyncio.sleep(0.01)


"""The seccomp filter of every build: an allowlist, as Docker's default profile.

What a builder may call is what a process without capabilities may call in
Docker's default profile (moby ``profiles/seccomp/default.json``), less the
calls that open kernel attack surface a build never needs, plus Nix's own
two rules:

- io_uring (``io_uring_setup``/``_enter``/``_register``) is refused, as in
  Docker's profile before 2023 and in most hardened runtimes since: it is
  a large, often-exploited surface, and glibc never uses it on its own.
- Namespaces cannot be made: ``clone`` with any namespace flag, ``unshare``,
  ``setns`` and ``clone3`` are refused (``clone3`` with ENOSYS, so that
  glibc falls back to ``clone``, whose flags the filter can see).
- Nix's sandbox refuses setuid and setgid bits (``chmod`` family with
  S_ISUID or S_ISGID: EPERM) and extended attributes and ACLs
  (``setxattr`` family: ENOTSUP); neither is representable in a NAR.
- Anything not listed fails with ENOSYS, the answer of a kernel that lacks
  the call, which programs already handle; the listed dangerous calls
  (``mount``, ``bpf``, ``perf_event_open``, ``keyctl``, ``ptrace``...) fail
  with EPERM.

The profile is a runtime-spec ``linux.seccomp`` value for runc; it is data
only (runc compiles it with libseccomp).
"""

from __future__ import annotations

import errno
import stat
from typing import Any

__all__ = ["DENIED", "seccomp_profile"]

# System calls a capability-less process may make (Docker's default
# profile's unconditional allowlist, without io_uring).
_ALLOWED = """
accept accept4 access adjtimex alarm bind brk capget capset chdir chown chown32
clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime
clock_gettime64 clock_nanosleep clock_nanosleep_time64 close close_range connect
copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl
epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2
execve execveat exit exit_group faccessat faccessat2 fadvise64 fadvise64_64
fallocate fanotify_mark fchdir fchown fchown32 fchownat fcntl fcntl64 fdatasync
fgetxattr flistxattr flock fork fremovexattr fstat fstat64 fstatat64 fstatfs
fstatfs64 fsync ftruncate ftruncate64 futex futex_time64 futex_waitv futimesat
getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32 getgid
getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid
getppid getpriority getrandom getresgid getresgid32 getresuid getresuid32
getrlimit get_robust_list getrusage getsid getsockname getsockopt get_thread_area
gettid gettimeofday getuid getuid32 getxattr inotify_add_watch inotify_init
inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy io_getevents
io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit ipc
kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown
lchown32 lgetxattr link linkat listen listxattr llistxattr _llseek lremovexattr
lseek lstat lstat64 madvise membarrier memfd_create memfd_secret mincore mkdir
mkdirat mknod mknodat mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr
mq_notify mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend
mq_timedsend_time64 mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock
munlockall munmap name_to_handle_at nanosleep newfstatat _newselect open openat
openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free
pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv preadv2 prlimit64
process_mrelease pselect6 pselect6_time64 pwrite64 pwritev pwritev2 read readahead
readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg
remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq
rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn
rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo
sched_getaffinity sched_getattr sched_getparam sched_get_priority_max
sched_get_priority_min sched_getscheduler sched_rr_get_interval
sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam
sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop
semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid
setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer
setpgid setpriority setregid setregid32 setresgid setresgid32 setresuid
setresuid32 setreuid setreuid32 setrlimit set_robust_list setsid setsockopt
set_thread_area set_tid_address setuid setuid32 shmat shmctl shmdt shmget shutdown
sigaltstack signalfd signalfd4 sigprocmask sigreturn socketpair splice
stat stat64 statfs statfs64 statx symlink symlinkat sync sync_file_range syncfs
sysinfo tee tgkill time timer_create timer_delete timer_getoverrun timer_gettime
timer_gettime64 timer_settime timer_settime64 timerfd_create timerfd_gettime
timerfd_gettime64 timerfd_settime timerfd_settime64 times tkill truncate
truncate64 ugetrlimit umask uname unlink unlinkat utime utimensat
utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev
arch_prctl modify_ldt
""".split()

#: Refused with EPERM: what a build never needs and an attacker reaches for.
DENIED = tuple("""
acct add_key bpf chroot clock_settime clock_settime64 delete_module
fanotify_init finit_module fsconfig fsmount fsopen fspick init_module
io_uring_enter io_uring_register io_uring_setup ioperm iopl kcmp kexec_file_load
kexec_load keyctl lookup_dcookie mount mount_setattr move_mount open_by_handle_at
open_tree perf_event_open pidfd_getfd pivot_root process_madvise process_vm_readv
process_vm_writev ptrace quotactl quotactl_fd reboot request_key setdomainname
sethostname setns settimeofday stime swapoff swapon syslog umount umount2 unshare
uselib userfaultfd vhangup
""".split())

# AF_UNIX, AF_INET, AF_INET6, AF_NETLINK.
_SOCKET_FAMILIES = (1, 2, 10, 16)
# Namespace flags of clone(2): CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC |
# NEWUSER | NEWPID | NEWNET (Docker's mask).
_CLONE_NEW = 0x7E020000
_SET_ID_BITS = stat.S_ISUID | stat.S_ISGID

# (name, index of the mode argument): allowed only without set-id bits.
_CHMODS = (("chmod", 1), ("fchmod", 1), ("fchmodat", 2))
# personality(2) values Docker allows: PER_LINUX, UNAME26, PER_LINUX32,
# UNAME26|PER_LINUX32, and the query 0xffffffff.
_PERSONALITIES = (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)


def _masked_eq(index: int, mask: int, value: int) -> dict[str, Any]:
    return {"index": index, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"}


def seccomp_profile() -> dict[str, Any]:
    """The ``linux.seccomp`` value of every build's config.json."""
    rules: list[dict[str, Any]] = [
        {"names": list(_ALLOWED), "action": "SCMP_ACT_ALLOW"},
        # Only the socket families builds use (unix, IPv4, IPv6, netlink): not
        # AF_VSOCK, which reaches the hypervisor whatever the network
        # namespace, nor the rarer families whose modules the kernel would
        # load. Masked to 32 bits, as the kernel reads the int: a family
        # with high bits set must not slip past the comparison.
        *({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
           "args": [_masked_eq(0, 0xFFFFFFFF, family)]} for family in _SOCKET_FAMILIES),
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [_masked_eq(0, _CLONE_NEW, 0)]},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
        {"names": list(DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM},
        {"names": ["setxattr", "lsetxattr", "fsetxattr"], "action": "SCMP_ACT_ERRNO",
         "errnoRet": errno.ENOTSUP},
    ]
    for value in _PERSONALITIES:
        rules.append({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                      "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}]})
    for name, index in _CHMODS:
        rules.append({"names": [name], "action": "SCMP_ACT_ALLOW",
                      "args": [_masked_eq(index, _SET_ID_BITS, 0)]})
        rules.append({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM,
                      "args": [_masked_eq(index, _SET_ID_BITS, _SET_ID_BITS)]})
        for bit in (stat.S_ISUID, stat.S_ISGID):
            rules.append({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM,
                          "args": [_masked_eq(index, _SET_ID_BITS, bit)]})
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.ENOSYS,
        # x86-64 only: the 32-bit ABI's socketcall(2) passes its arguments in
        # memory, where no filter can check the socket family (so i686
        # builds are not offered, stages.policy.DEFAULT_SYSTEMS).
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": rules,
    }

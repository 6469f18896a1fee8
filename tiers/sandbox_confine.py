"""Confinement without namespaces: Landlock for the file system, a seccomp filter for sockets and processes.

Called by the sandbox's child side (tiers/sandbox_child.py: the zygote and each validation runner) and by the
sandboxed trainer (tiers/trainer.py) when the isolation level is `landlock`: where namespaces are refused (a
Kubernetes pod under the `restricted` Pod Security level cannot create user namespaces, so bubblewrap cannot
run), a process can still take rights away from itself and from everything it will ever fork. Both steps run
while the process is single-threaded and before TensorFlow or any model code loads: Landlock and seccomp
apply to the calling thread and are inherited by every thread and process created afterwards, never undone.

* **Landlock** (`restrict_files`): the process may read and execute only the system folders, the Python
  installation and tierflow's code, read its *own* /proc/<pid> (TensorFlow reads /proc/self/cmdline and names
  its threads; every other process's /proc entry, hence its environment, stays out of reach), and write only
  its scratch directory. Not the home, not the repository, not /var/run/secrets (a service-account token).
  The `landlock` package (PyPI, pure Python over the three Landlock syscalls) does the calls.
* **seccomp** (`deny_network_and_escapes`): creating a socket fails with EPERM (a pod's containers share one
  network namespace, so no socket is the only way to have no network; the sandbox's channel to its pool is an
  inherited descriptor), and so do io_uring (which can open sockets without the socket syscall), ptrace,
  reading another process's memory, BPF, perf, userfaultfd, keyrings, new namespaces and mounts.
  `no_new_processes` adds, for the process that runs model code: threads but no new process (so nothing it
  starts outlives it, and no fork bomb), and no signals to any process but itself.
  `pyseccomp` (PyPI, ctypes over the system's libseccomp.so.2, which Debian and the python:3.11-slim image
  ship) builds and loads the BPF programs: libseccomp resolves syscall numbers per architecture and makes the
  filter kill a process that calls through another ABI (x32, i386) instead of letting it slip past.

What Landlock and seccomp do not give (bubblewrap does): a pid namespace (model code can list other
processes' ids, not read them), a user of its own (run as root, the confined process stays uid 0 without any
capability: it cannot become another user without losing the root-owned installation it runs from), and
forking (model code may start threads, not processes). docs/cluster.md says what holds in cluster mode.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: What to do when Landlock or seccomp is missing (appended to every such error).
HOW_TO_GET_IT = (
    "TIERFLOW_SANDBOX_ISOLATION=landlock needs Linux >= 5.13 with Landlock enabled (CONFIG_SECURITY_LANDLOCK, "
    "`landlock` in the kernel's lsm= list), libseccomp.so.2 (`apt-get install libseccomp2`) and the `landlock` "
    "and `pyseccomp` packages (part of `pip install -e '.[server]'`)"
)

_CLONE_THREAD = 0x00010000
_CLONE_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
#: Syscalls model code never needs and that reach past the sandbox (or, for io_uring, past this filter).
_DENIED = ("socket", "ptrace", "open_by_handle_at", "process_vm_readv", "process_vm_writev", "bpf",
           "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "unshare", "setns", "mount",
           "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsmount", "fspick", "kcmp", "pidfd_getfd")
_NOT_IMPLEMENTED = ("io_uring_setup", "io_uring_enter", "io_uring_register",
                    # ENOSYS makes glibc fall back to clone(2), whose namespace flags the filter can see.
                    "clone3")


class ConfinementError(Exception):
    """Landlock or seccomp could not be applied: the process refuses to run model code."""


def prepare() -> None:
    """Import the two packages while the file system is still open: finding libseccomp.so.2 runs `ldconfig`
    (and may want a temporary file), which a confined process could not."""
    _seccomp()
    try:
        import landlock  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        raise ConfinementError(f"the landlock package is missing ({exc}); {HOW_TO_GET_IT}") from None


# -- Landlock ---------------------------------------------------------------------------------------------


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    try:
        import landlock
    except ImportError:
        return 0
    ctypes.set_errno(0)  # the package reads errno to spot a failure; a stale one would look like one
    try:
        return int(landlock.landlock_abi_version())
    except OSError:
        return 0


def _rights(abi: int) -> tuple[int, int, int]:
    """(every right this ABI handles, the read rights of a directory, the read rights of a file)."""
    from landlock import FSAccess

    handled = (FSAccess.EXECUTE | FSAccess.WRITE_FILE | FSAccess.READ_FILE | FSAccess.READ_DIR
               | FSAccess.REMOVE_DIR | FSAccess.REMOVE_FILE | FSAccess.MAKE_CHAR | FSAccess.MAKE_DIR
               | FSAccess.MAKE_REG | FSAccess.MAKE_SOCK | FSAccess.MAKE_FIFO | FSAccess.MAKE_BLOCK
               | FSAccess.MAKE_SYM)
    if abi >= 2:
        handled |= FSAccess.REFER
    if abi >= 3:
        handled |= FSAccess.TRUNCATE
    if abi >= 5:
        handled |= FSAccess.IOCTL_DEV
    read_file = FSAccess.READ_FILE | FSAccess.EXECUTE
    return int(handled), int(read_file | FSAccess.READ_DIR), int(read_file)


def restrict_files(*, read: Iterable[str], write: Iterable[str], devices: Iterable[str] = ("/dev/null",),
                   own_proc: bool = True) -> dict[str, str]:
    """Landlock this process (and all it forks) to reading `read`, writing under `write`, reading and
    writing the `devices`, and (`own_proc`) its own /proc/<pid>; returns what holds, for the isolation report.

    Paths that do not exist are skipped (a system without /lib64). Must run single-threaded: the restriction
    applies to the calling thread and what it creates from then on. Raises ConfinementError.
    """
    abi = landlock_abi()
    if abi < 1:
        raise ConfinementError(f"Landlock is not available on this kernel ({os.uname().release}); {HOW_TO_GET_IT}")
    from landlock import FSAccess, Ruleset

    handled, read_dir, read_file = _rights(abi)
    ctypes.set_errno(0)
    try:
        ruleset = Ruleset(FSAccess(handled))
        for path in read:
            if os.path.exists(path):
                ctypes.set_errno(0)
                ruleset.allow(path, rules=FSAccess(read_dir if os.path.isdir(path) else read_file))
        for path in write:
            ctypes.set_errno(0)
            ruleset.allow(path, rules=FSAccess(handled))
        for path in devices:
            if os.path.exists(path):
                ctypes.set_errno(0)
                ruleset.allow(path, rules=FSAccess(read_file | int(FSAccess.WRITE_FILE)))
        if own_proc:
            _allow_own_proc(ruleset, FSAccess(read_dir | int(FSAccess.WRITE_FILE)))
        ctypes.set_errno(0)
        ruleset.apply()
    except OSError as exc:
        raise ConfinementError(f"cannot apply Landlock: {exc}; {HOW_TO_GET_IT}") from exc
    return {"filesystem": f"Landlock ABI {abi}: read-only system and installation, its own /proc entry, "
                          "writes only to its scratch"}


#: Kept open for the life of the process: it pins /proc/<pid>'s dentry, so the Landlock rule on its inode
#: keeps matching (procfs makes a new inode when an unpinned /proc/<pid> entry is looked up again).
_OWN_PROC_FD: list[int] = []


def _allow_own_proc(ruleset: Any, rights: Any) -> None:
    fd = os.open(f"/proc/{os.getpid()}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    _OWN_PROC_FD.append(fd)
    ctypes.set_errno(0)
    ruleset.allow(f"/proc/{os.getpid()}", rules=rights)


# -- seccomp ----------------------------------------------------------------------------------------------


def _seccomp() -> Any:
    try:
        import pyseccomp  # type: ignore[import-untyped]
    except (ImportError, RuntimeError) as exc:  # RuntimeError: the package found no libseccomp.so.2
        raise ConfinementError(f"seccomp is not available ({exc}); {HOW_TO_GET_IT}") from None
    return pyseccomp


def deny_network_and_escapes() -> dict[str, str]:
    """Load the seccomp filter that forbids new sockets and the syscalls in `_DENIED` (EPERM) and
    `_NOT_IMPLEMENTED` (ENOSYS); for this process and all it forks. Raises ConfinementError."""
    sc = _seccomp()
    try:
        flt = sc.SyscallFilter(sc.ALLOW)
        for name in _DENIED:
            flt.add_rule(sc.ERRNO(errno.EPERM), name)
        for name in _NOT_IMPLEMENTED:
            flt.add_rule(sc.ERRNO(errno.ENOSYS), name)
        for flag in _CLONE_NAMESPACES:
            flt.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        flt.load()
    except OSError as exc:
        raise ConfinementError(f"cannot load the seccomp filter: {exc}; {HOW_TO_GET_IT}") from exc
    return {"network": "none (seccomp: no new sockets, no io_uring)"}


def no_new_processes() -> dict[str, str]:
    """For the process about to run model code: it may start threads but no process (fork, vfork and clone
    without CLONE_THREAD fail with EPERM), so its whole tree dies with it, and it may signal no process but
    itself (not the pool, a sibling sandbox, the training driver). RLIMIT_NPROC is moot then, which matters
    where it cannot hold (the user's other processes count too; root is exempt from it)."""
    sc = _seccomp()
    me = os.getpid()
    try:
        flt = sc.SyscallFilter(sc.ALLOW)
        for name in ("fork", "vfork", "tkill", "pidfd_open", "pidfd_send_signal"):
            flt.add_rule(sc.ERRNO(errno.EPERM), name)
        flt.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, 0))
        for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            # glibc passes the pid sign-extended: our own pid compares equal, anything else (another pid, 0,
            # a negative group id) is refused.
            flt.add_rule(sc.ERRNO(errno.EPERM), name, sc.Arg(0, sc.NE, me))
        flt.load()
    except OSError as exc:
        raise ConfinementError(f"cannot load the seccomp filter: {exc}; {HOW_TO_GET_IT}") from exc
    return {"processes": "threads only (seccomp: no fork, no clone of a process); no signals to other processes"}


def readable_roots(installation: Iterable[str]) -> list[str]:
    """What a confined Python needs to read: the system folders, the linker's cache, /sys (CPU topology for
    TensorFlow's thread pools) and `installation` (sandbox_bwrap.installation_paths())."""
    roots = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/sys",
             "/dev/urandom", "/dev/random"]
    return roots + [str(Path(p)) for p in installation]



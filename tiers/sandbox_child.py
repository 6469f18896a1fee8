"""The sandbox's child side: the only code that runs beside untrusted model code (security-critical).

Started by `SandboxPool` (tiers/sandbox.py) as `python -m tierflow.tiers.sandbox_child`, inside bubblewrap
(tiers/sandbox_bwrap.py: its own pid, network, IPC, UTS and mount namespaces, a read-only view of the system and
the installation and nothing else, a scrubbed environment). Three kinds of process run this file:

* the **zygote**, one per pool: drops to an unprivileged user (when bwrap ran as root), checks the isolation it
  was promised (fails closed), imports TensorFlow WITHOUT running anything (no eager context, so no thread
  pools: it stays single-threaded, which is what makes `fork()` safe), then forks one child per request the
  pool sends on its control socket and reports each child's exit status. It never sees model code.
* a **keeper** (`_keeper`), the zygote's direct child, one per validation: enters fresh namespaces of its own
  (user, pid, mount, IPC, UTS: it is single-threaded, as unshare(CLONE_NEWUSER) requires; the network namespace
  stays the sandbox's, which has loopback only), mounts a private tmpfs scratch and /dev/shm, forks the runner
  as PID 1 of its new pid namespace, drops its own capabilities and relays the runner's exit status.
  Killing the keeper (the pool's timeout) kills the runner (parent-death signal), and the runner's death, as
  PID 1, makes the kernel kill every process left in its pid namespace: a `setsid()` grandchild cannot outlive
  its validation.
* a **runner** (`_runner`), which drops every capability, turns itself non-dumpable (other sandboxes of the
  same user cannot read its memory or /proc), warms TensorFlow up, says ready, reads ONE request
  `{"code", "imports"}` from its own socket, lowers its resource limits, builds the model and answers one line.

The same steps serve a later sandboxed trainer: `enter_namespaces`, `drop_capabilities` and `apply_limits`
take no validation-specific argument.

With `--isolation landlock` (where namespaces are refused: a `restricted` Kubernetes pod) there is no bwrap
and no namespace: the zygote drops root if it has it, then, before TensorFlow loads, confines itself with
Landlock (read-only system and installation, writes only under the pool's scratch root) and a seccomp filter
(no new sockets, no ptrace, no namespaces; tiers/sandbox_confine.py). Each keeper makes the runner's scratch
`<scratch root>/<id>`, which the zygote removes when the validation ends; each runner adds a second Landlock
layer (writes only to its own scratch, reads only its own /proc entry) and a second filter (threads but no new
process, no signals to other processes), so nothing it starts outlives it. Other processes' /proc entries, the
stack's files and any network stay out of reach. Started as root (a workstation), the zygote keeps uid 0 but
drops every capability (nobody could not read a root-owned installation); a pod runs it as non-root.

With `--isolation none` (an explicit operator choice) the zygote, keeper and runner do the same work without
any namespace or user change: only the scrubbed environment and the resource limits remain.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import resource
import select
import selectors
import shutil
import signal
import socket
import stat
import sys
import tempfile
from typing import Any

import orjson

from tierflow.tiers import sandbox_confine
from tierflow.tiers.sandbox_bwrap import installation_paths

#: The runner's private scratch (a tmpfs of its own): its cwd, $HOME and $TMPDIR.
SCRATCH = "/tmp"
SCRATCH_MB = 64
#: POSIX shared memory (multiprocessing's semaphores), private to the runner too.
SHM = "/dev/shm"
SHM_MB = 16
#: Files the user's code may write (bytes); beyond it a write fails with EFBIG instead of filling the scratch.
FSIZE_LIMIT = 8 * 1024 * 1024
#: Tasks (processes and threads) the user's code may add to its runner.
NPROC_MARGIN = 32
#: Longest request line a runner accepts (the pool caps model code far below it).
MAX_LINE_BYTES = 16 * 1024 * 1024

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_BIND = 4096
_MS_REC = 16384
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_WARMUP_CODE = "warmup_in = keras.Input(shape=4)\nwarmup = keras.Model(warmup_in, keras.layers.Dense(2)(warmup_in))\n"


class IsolationError(Exception):
    """The isolation this process was promised is not there: it refuses to run model code."""


# -- kernel interfaces (ctypes: Python 3.11 has no unshare/mount/capset/prctl) ---------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> None:
    ulong = ctypes.c_ulong
    _check(_libc().prctl(option, ulong(arg), ulong(arg3), ulong(0), ulong(0)), f"prctl({option})")


def set_dumpable(dumpable: bool) -> None:
    """Non-dumpable: /proc/<pid>/{mem,environ,maps,root,...} and ptrace need CAP_SYS_PTRACE over this process."""
    _prctl(_PR_SET_DUMPABLE, int(dumpable))


def die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def under_scratch(paths: list[str]) -> list[str]:
    """Those of `paths` that the runner's scratch, mounted over /tmp, would hide."""
    return [path for path in paths if path == SCRATCH or path.startswith(SCRATCH + "/")]


def enter_namespaces() -> None:
    """New user, pid (for the children), mount, IPC and UTS namespaces, and a private tmpfs scratch and /dev/shm.

    Must run single-threaded (a forked child of the zygote is). The user namespace maps this process's own
    uid and gid only, so it stays the same unprivileged user; its capabilities inside the new namespaces serve
    to mount the scratch and are dropped by `drop_capabilities` before model code runs.
    """
    uid, gid = os.getuid(), os.getgid()
    # Writing our own uid_map needs /proc/self owned by us, i.e. dumpable, for these few syscalls.
    set_dumpable(True)
    try:
        # No network namespace of its own: the sandbox's (bwrap's) has no interface but loopback already, and
        # tearing one down per validation costs the kernel 50-100 ms of a 2-core machine's time.
        flags = _CLONE_NEWUSER | _CLONE_NEWPID | _CLONE_NEWNS | _CLONE_NEWIPC | _CLONE_NEWUTS
        _check(_libc().unshare(flags), "unshare(user, pid, mount, ipc, uts)")
        for name, text in (("uid_map", f"{uid} {uid} 1\n"), ("setgroups", "deny\n"), ("gid_map", f"{gid} {gid} 1\n")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    finally:
        set_dumpable(False)
    # An installation under /tmp (a clone in /tmp and its venv) would vanish under the scratch: each such folder
    # is held by a descriptor and bound back over the new tmpfs (a bind keeps its source's read-only flag).
    held = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in under_scratch(installation_paths())]
    mount_flags = ctypes.c_ulong(_MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    # The scratch, and a private /dev/shm: bwrap's one is shared by every sandbox of the zygote.
    for target, megabytes in ((SCRATCH, SCRATCH_MB), (SHM, SHM_MB)):
        options = f"size={megabytes}m,nr_inodes=4096,mode=0700".encode()
        _check(_libc().mount(b"tmpfs", target.encode(), b"tmpfs", mount_flags, options), f"mount tmpfs on {target}")
    for path, fd in held:
        os.makedirs(path, mode=0o755, exist_ok=True)
        _check(_libc().mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, ctypes.c_ulong(_MS_BIND | _MS_REC),
                             None), f"bind the installation back at {path}")
        os.close(fd)


def drop_capabilities() -> None:
    """Empty every capability set (bounding and ambient included) and forbid gaining any back."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        with contextlib.suppress(OSError):  # EPERM once CAP_SETPCAP is gone: then nothing is left to drop
            _prctl(_PR_CAPBSET_DROP, cap)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc().capset(ctypes.byref(header), (_CapData * 2)()), "capset(none)")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


# -- what the process can see about itself ----------------------------------------------------------------


def _status() -> dict[str, str]:
    status: dict[str, str] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, sep, value = line.partition(":")
            if sep:
                status[key] = value.strip()
    return status


def _interfaces() -> set[str]:
    with open("/proc/self/net/dev") as f:
        return {line.split(":", 1)[0].strip() for line in f.readlines()[2:]}


def _outer_uid() -> int:
    """This process's uid one user namespace up (the host's, when bwrap ran as root and made no user namespace)."""
    uid = os.getuid()
    with open("/proc/self/uid_map") as f:
        for line in f:
            inside, outside, count = (int(x) for x in line.split())
            if inside <= uid < inside + count:
                return outside + uid - inside
    return -1


def verify_isolation(*, own_namespaces: bool) -> dict[str, str]:
    """Check what model code would run with; raises IsolationError on the first thing missing.

    The checks are on facts the kernel reports, so a `bwrap` that silently did less than asked is caught.
    """
    status = _status()
    uid = _outer_uid()
    if os.getuid() == 0 or uid == 0:
        raise IsolationError(f"the sandbox runs as root (uid {os.getuid()}, {uid} outside its user namespace)")
    if int(status["CapEff"], 16) or int(status["CapPrm"], 16):
        raise IsolationError(f"the sandbox holds capabilities (CapEff {status['CapEff']})")
    if status.get("NoNewPrivs") != "1":
        raise IsolationError("the sandbox could gain privileges (no_new_privs is not set)")
    interfaces = _interfaces()
    if interfaces - {"lo"}:
        raise IsolationError(f"the sandbox has network interfaces {sorted(interfaces)}")
    if own_namespaces and os.getpid() != 1:
        raise IsolationError("the runner is not PID 1 of a pid namespace of its own")
    return {
        "user": f"uid {uid} (not root), no capabilities, no_new_privs",
        "network": "none (loopback only, in the sandbox's own network namespace)",
    }


def verify_confined() -> dict[str, str]:
    """The `landlock` level's checks, after `restrict_files` and the seccomp filter: not root, no capability,
    no_new_privs, and the confinement visibly in force (no socket can be made; the file system root cannot be
    listed). Raises IsolationError."""
    status = _status()
    if int(status["CapEff"], 16) or int(status["CapPrm"], 16) or int(status["CapBnd"], 16):
        raise IsolationError(f"the sandbox holds capabilities (CapEff {status['CapEff']})")
    if status.get("NoNewPrivs") != "1":
        raise IsolationError("the sandbox could gain privileges (no_new_privs is not set)")
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except PermissionError:
        pass
    else:
        raise IsolationError("the seccomp filter is not in force: a socket could be made")
    try:
        os.listdir("/")
    except PermissionError:
        pass
    else:
        raise IsolationError("Landlock is not in force: the file system root could be listed")
    who = "uid 0 (tierflow runs as root)" if os.getuid() == 0 else f"uid {os.getuid()} (not root)"
    return {"user": f"{who}, no capabilities, no_new_privs"}


def confine_zygote(scratch_root: str) -> dict[str, str]:
    """The landlock level's first layer, before TensorFlow loads: what the zygote and every runner may ever do.

    /proc stays readable here (a runner's own entry does not exist yet); each runner's second layer narrows it
    to its own entry (`confine_runner`)."""
    sandbox_confine.prepare()
    os.environ.update(HOME=scratch_root, TMPDIR=scratch_root)
    tempfile.tempdir = None  # read TMPDIR again
    if os.getuid() == 0:
        drop_capabilities()  # uid 0 stays (the root-owned installation); what makes root powerful goes
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    report = sandbox_confine.restrict_files(
        read=[*sandbox_confine.readable_roots(installation_paths()), "/proc"], write=[scratch_root],
        devices=("/dev/null",), own_proc=False)
    report.update(sandbox_confine.deny_network_and_escapes())
    return report


def confine_runner(scratch: str) -> dict[str, str]:
    """The landlock level's second layer, in a runner before it warms up: writes only to its scratch, reads
    only its own /proc entry, starts no process and signals no one else."""
    report = sandbox_confine.restrict_files(read=sandbox_confine.readable_roots(installation_paths()),
                                            write=[scratch], own_proc=True)
    report.update(sandbox_confine.no_new_processes())
    report.update(verify_confined())
    report["network"] = "none (seccomp: no new sockets, no io_uring)"
    return report


def remove_tree(path: str) -> None:
    """Remove a runner's scratch whatever the code left in it (folders it made unwritable included)."""

    def retry(function: Any, name: str, excinfo: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(name), stat.S_IRWXU)
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, stat.S_IRWXU)
            function(name)

    shutil.rmtree(path, onerror=retry)


# -- the runner: one validation --------------------------------------------------------------------------


class _Channel:
    """The runner's end of its socket to the pool: one request line in, JSON lines out."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._reader = self._sock.makefile("rb")

    def send(self, message: dict[str, Any]) -> None:
        self._sock.sendall(orjson.dumps(message) + b"\n")

    def receive(self) -> bytes:
        return self._reader.readline(MAX_LINE_BYTES)


def _lower_limit(kind: int, value: int) -> int:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))
    return value


def apply_limits(memory_mb: int | None, timeout_s: float | None, *, own_user_namespace: bool,
                 nproc: bool = True, file_bytes: int = FSIZE_LIMIT,
                 nproc_margin: int = NPROC_MARGIN) -> dict[str, str]:
    """Resource limits for the user's code, measured from what the process holds now; returns what was set.

    `memory_mb`: address space on top of what the process holds (None: no limit, e.g. where a container's
    memory limit holds); `timeout_s`: the CPU time it may use, on every core (None: no limit, a training
    runs as long as it takes); `file_bytes`: the largest file it may write.

    RLIMIT_NPROC holds because the process is not root; in a user namespace of its own it counts only this
    runner's tasks (and its keeper), so one runner's fork bomb does not starve the others. `nproc=False`
    where a seccomp filter forbids new processes altogether (the landlock level).
    """
    notes: dict[str, str] = {}
    status = _status()
    vm_bytes = int(status["VmSize"].split()[0]) * 1024
    usage = resource.getrusage(resource.RUSAGE_SELF)
    limits: list[tuple[str, int, int]] = [
        ("RLIMIT_FSIZE", resource.RLIMIT_FSIZE, file_bytes),
        ("RLIMIT_CORE", resource.RLIMIT_CORE, 0),
    ]
    if memory_mb is not None:
        # TensorFlow already reserved its address space (imported and warmed up): only the user's code's
        # growth counts against memory_mb.
        limits.append(("RLIMIT_AS", resource.RLIMIT_AS, vm_bytes + memory_mb * 1024 * 1024))
    if timeout_s is not None:
        cpu_budget = math.ceil(usage.ru_utime + usage.ru_stime + timeout_s * (os.cpu_count() or 1)) + 5
        limits.append(("RLIMIT_CPU", resource.RLIMIT_CPU, cpu_budget))
    if not nproc:
        pass
    elif os.geteuid() == 0:
        notes["RLIMIT_NPROC"] = "not enforced for root"
    else:
        tasks = int(status["Threads"]) + 1 if own_user_namespace else tasks_of_user(os.getuid())
        limits.append(("RLIMIT_NPROC", resource.RLIMIT_NPROC, tasks + nproc_margin))
    # A write past RLIMIT_FSIZE then fails with EFBIG (an exception in the user's code), not a signal.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    for name, kind, value in limits:
        try:
            notes[name] = str(_lower_limit(kind, value))
        except (ValueError, OSError) as exc:
            notes[name] = f"not set: {exc}"
    return notes


def tasks_of_user(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # the process ended while we looked
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


def _build(request: bytes, memory_mb: int) -> dict[str, Any]:
    from tierflow.tiers import keras_code

    try:
        parsed = orjson.loads(request)
    except orjson.JSONDecodeError as exc:
        return {"ok": False, "error": f"unreadable request: {exc}"}
    code = parsed.get("code") if isinstance(parsed, dict) else None
    imports = parsed.get("imports", "") if isinstance(parsed, dict) else None
    if not isinstance(code, str) or not isinstance(imports, str):
        return {"ok": False, "error": 'a request is {"code": str, "imports": str}'}
    try:
        return {"ok": True, "summary": keras_code.summarize(keras_code.build_model(code, imports))}
    except keras_code.ModelCodeError as exc:
        message = exc.message
        if exc.cause in ("MemoryError", "ResourceExhaustedError"):
            message += f" (out of memory: model code may use {memory_mb} MB on top of TensorFlow)"
        return {"ok": False, "error": message}
    except MemoryError:
        return {"ok": False, "error": f"MemoryError: the model needs more than the {memory_mb} MB the sandbox "
                                      "allows on top of TensorFlow"}
    except Exception as exc:  # Keras failing on the built model (e.g. while summarizing): the code's fault
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[: keras_code.MAX_MESSAGE_CHARS]}


def _runner(channel_fd: int, keeper_alive: int, args: argparse.Namespace, scratch: str) -> None:
    """PID 1 of its own namespaces (bwrap level), or its keeper's group member (landlock level): warm up,
    take one request, answer, exit."""
    die_with_parent()
    # The keeper holds the other end of `keeper_alive` open until it exits: readable now means it is gone.
    if select.select([keeper_alive], [], [], 0)[0]:
        os._exit(1)
    os.close(keeper_alive)
    channel = _Channel(channel_fd)
    os.chdir(scratch)
    report: dict[str, str] = {}
    try:
        if args.isolation == "bwrap":
            drop_capabilities()
            report.update(verify_isolation(own_namespaces=True))
            report["processes"] = "a pid namespace per validation (its whole tree is killed with it)"
            report["filesystem"] = f"read-only system and installation, a private {SCRATCH_MB} MB tmpfs scratch"
        elif args.isolation == "landlock":
            os.environ.update(HOME=scratch, TMPDIR=scratch)
            tempfile.tempdir = None
            report.update(confine_runner(scratch))
        else:
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        set_dumpable(False)
    except (IsolationError, sandbox_confine.ConfinementError, OSError) as exc:
        channel.send({"error": f"isolation check failed: {exc}"})
        os._exit(3)

    from tierflow.tiers import keras_code

    tf, _ = keras_code.load_keras()
    # Building a model needs little compute; one thread each keeps the runners light on small machines.
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    # Warm Keras up (eager context, layer code paths) before measuring the address space.
    keras_code.summarize(keras_code.build_model(_WARMUP_CODE))
    channel.send({"ready": True, "isolation": report})

    request = channel.receive()
    if not request:
        os._exit(0)  # the pool closed before using this runner
    channel.send({"accepted": True})
    report.update(apply_limits(args.memory_mb, args.timeout_s, own_user_namespace=args.isolation == "bwrap",
                               nproc=args.isolation != "landlock"))
    response = _build(request, args.memory_mb)
    response["isolation"] = report
    channel.send(response)
    sys.stderr.flush()
    # Skip interpreter shutdown: it would wait for threads and atexit hooks the user's code may have left.
    os._exit(0)


def _keeper(channel_fd: int, args: argparse.Namespace, request_id: int) -> None:
    """The zygote's child for one validation: new namespaces (bwrap level) or a process group and scratch
    directory of its own (landlock level), then the runner; relay its end."""
    scratch = SCRATCH
    try:
        if args.isolation == "bwrap":
            enter_namespaces()
        else:
            set_dumpable(False)
            if args.isolation == "landlock":
                scratch = scratch_of(args.scratch_root, request_id)
                os.mkdir(scratch, 0o700)
    except OSError as exc:  # e.g. user namespaces refused (a sysctl, an LSM, a restricted container)
        os.write(channel_fd, orjson.dumps({"error": f"cannot isolate a sandbox: {exc}"}) + b"\n")
        os._exit(3)
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        try:
            _runner(channel_fd, alive_r, args, scratch)
        except BaseException as exc:  # a failed set-up: say why on stderr (the pool logs it) and exit non-zero
            print(f"sandbox runner failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(70)
    os.close(channel_fd)
    os.close(alive_r)
    if args.isolation == "bwrap":
        drop_capabilities()  # it only waits from here on: it needs none of what its namespaces gave it
    os._exit(end_alike(pid))


def end_alike(pid: int) -> int:
    """Wait for the child `pid` and end as it did: killed by its signal (so the parent can say "killed
    (SIGKILL): out of memory?" rather than "exited"), or the exit code to return (70 when neither)."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 70


# -- the zygote ------------------------------------------------------------------------------------------


def scratch_of(scratch_root: str, request_id: int) -> str:
    """The landlock level's scratch directory of one runner."""
    return os.path.join(scratch_root, str(request_id))


def drop_to(uid: int) -> None:
    """bwrap ran as root (no user namespace, so the host's root could traverse a 0700 home to bind the
    installation); become an unprivileged user for good before anything else runs."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def thread_count() -> int:
    """Threads of this process, as the kernel counts them (native ones too): a fork is safe with one."""
    return int(_status()["Threads"])


class _Zygote:
    def __init__(self, control: socket.socket, args: argparse.Namespace) -> None:
        self.control = control
        self.args = args
        self.children: dict[int, tuple[int, int]] = {}  # pidfd -> (request id, pid)
        self.by_id: dict[int, int] = {}  # request id -> pid
        self.selector = selectors.DefaultSelector()

    def send(self, message: dict[str, Any]) -> None:
        self.control.send(orjson.dumps(message))

    def serve(self) -> None:
        self.selector.register(self.control, selectors.EVENT_READ)
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.control:
                    if not self.on_request():
                        return
                else:
                    self.on_exit(int(key.fd))

    def on_request(self) -> bool:
        message, fds, _, _ = socket.recv_fds(self.control, 65536, 1)
        if not message:
            return False  # the pool is gone: the keepers die with us (parent-death signal)
        request = orjson.loads(message)
        if "fork" in request:
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                self.send({"exited": request["fork"], "returncode": 70, "error": "fork request without a socket"})
                return True
            self.fork(int(request["fork"]), fds[0])
        elif "kill" in request:
            pid = self.by_id.get(int(request["kill"]))
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return True

    def fork(self, request_id: int, channel_fd: int) -> None:
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(channel_fd)
            self.send({"exited": request_id, "returncode": 70, "error": f"fork: {exc}"})
            return
        if pid == 0:
            try:
                die_with_parent()
                if os.getppid() != parent:
                    os._exit(1)
                # Keep only stdio and this validation's socket: nothing of the zygote's other children.
                channel = os.dup2(channel_fd, 3) if channel_fd != 3 else 3
                os.closerange(4, 1 << 16)
                _keeper(channel, self.args, request_id)
            except BaseException as exc:
                print(f"sandbox keeper failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            os._exit(70)
        os.close(channel_fd)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (request_id, pid)
        self.by_id[request_id] = pid
        self.selector.register(pidfd, selectors.EVENT_READ)

    def on_exit(self, pidfd: int) -> None:
        request_id, pid = self.children.pop(pidfd)
        self.by_id.pop(request_id, None)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        if self.args.isolation == "landlock":
            remove_tree(scratch_of(self.args.scratch_root, request_id))
        self.send({"exited": request_id, "returncode": os.waitstatus_to_exitcode(status)})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tierflow.tiers.sandbox_child",
                                     description="model-code sandbox zygote (see tierflow.tiers.sandbox)")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--isolation", choices=("bwrap", "landlock", "none"), required=True)
    parser.add_argument("--scratch-root", default="", help="landlock level: where each runner's scratch goes")
    parser.add_argument("--drop-to", type=int, default=None, help="uid (and gid) to become when started as root")
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--timeout-s", type=float, required=True)
    args = parser.parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    report: dict[str, str] = {}
    try:
        if args.isolation == "bwrap":
            if args.drop_to is not None and os.getuid() == 0:
                drop_to(args.drop_to)
            verify_isolation(own_namespaces=False)
        elif args.isolation == "landlock":
            report.update(confine_zygote(args.scratch_root))
            report.update(verify_confined())
        set_dumpable(False)
        from tierflow.tiers import keras_code

        keras_code.load_keras()  # imports only: no eager context, no thread pool
        # Park what the import made in the permanent generation: a runner's collections then skip those millions
        # of objects (a build costs ~0.03 s instead of ~0.17 s) and leave their pages shared with the zygote.
        gc.collect()
        gc.freeze()
        if thread_count() != 1:
            # fork() copies only the calling thread: with others running, a child could inherit a held lock.
            raise IsolationError(f"the zygote runs {thread_count()} threads after importing TensorFlow; forking it "
                                 "is unsafe (is OPENBLAS_NUM_THREADS=1 set?)")
    except (IsolationError, sandbox_confine.ConfinementError, OSError) as exc:
        control.send(orjson.dumps({"error": f"isolation check failed: {exc}"}))
        return 3
    report["python"] = sys.version.split()[0]
    control.send(orjson.dumps({"ready": True, "pid": os.getpid(), "isolation": report}))
    _Zygote(control, args).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

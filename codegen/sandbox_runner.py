"""The rlimits sandbox's runner: installs the audit-hook guard, then runs the program as __main__.

codegen/execution.py copies this file into each run's working directory (as _sandbox_main.py, so
the sandbox uid can read it wherever the repository lives) and starts it there, instead of the
program itself, with

    python -I -B -u WORKDIR/_sandbox_main.py WORKDIR PROGRAM FORK_BUDGET

WORKDIR is the only directory the program may write to, PROGRAM the program's path, FORK_BUDGET
the number of forks the main process may make (its children may not fork again). The arguments
are read before any of the program's code runs; the program then sees sys.argv == [PROGRAM] and
__file__ == PROGRAM, and it runs in this module's namespace (which is sys.modules["__main__"])
with only `sys`, `SandboxViolation`, `_sbx_path` and `_sbx_code` left in it.

The guard is a tripwire, not a security boundary: see codegen/execution.py. Importing this
module (for tests) installs nothing.
"""
import sys


class SandboxViolation(PermissionError):
    """Raised by the sandbox guard for a refused operation."""


def _sbx_deny(what):
    raise SandboxViolation("sandbox: " + what + " is not allowed")


def _sbx_inside_check(WORKDIR):
    """The path test the guard uses: does a path land inside WORKDIR (or on a harmless device)?"""
    import os

    OK_DEVICES = ("/dev/null", "/dev/stdout", "/dev/stderr")
    realpath, join, fspath, readlink = os.path.realpath, os.path.join, os.fspath, os.readlink

    def inside(path, dir_fd=None):
        """Does `path` (relative to the cwd, or to the directory open as `dir_fd`) resolve
        to somewhere inside WORKDIR?"""
        if isinstance(path, int):
            return True               # an already open descriptor
        try:
            p = os.fsdecode(fspath(path))
            if dir_fd is not None and dir_fd >= 0:   # audit events say -1 for "no dir_fd"
                p = join(readlink("/proc/self/fd/%d" % dir_fd), p)
        except (TypeError, OSError):
            return False
        full = realpath(p)
        return full == WORKDIR or full.startswith(WORKDIR + os.sep) or full in OK_DEVICES

    return inside


def _sbx_audit_hook(state, inside, deny, WRITE_FLAGS):
    """The sys.addaudithook callback: refuses the events listed in codegen/execution.py."""
    import os

    def own_child(pid):
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                data = f.read()
            return int(data[data.rindex(b")") + 2:].split()[1]) == os.getpid()
        except (OSError, ValueError, IndexError):
            return False

    def hook(event, args):
        if event == "open":
            flags = args[2] if len(args) > 2 else 0
            if isinstance(flags, int) and flags & WRITE_FLAGS and not inside(args[0]):
                deny("writing %r" % (args[0],))
        elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime"):
            if not inside(args[0], args[-1]):
                deny("%s(%r)" % (event, args[0]))
        elif event in ("os.truncate", "os.chflags", "os.lchflags", "os.setxattr",
                       "os.removexattr"):
            if not inside(args[0]):
                deny("%s(%r)" % (event, args[0]))
        elif event in ("os.rename", "os.link"):
            if not (inside(args[0], args[2]) and inside(args[1], args[3])):
                deny("%s(%r, %r)" % (event, args[0], args[1]))
        elif event == "os.symlink":
            if not inside(args[1], args[2]):
                deny("os.symlink(%r)" % (args[1],))
        elif event in ("os.kill", "os.killpg"):
            pid = args[0]
            if event == "os.killpg" or pid <= 0 or (pid != os.getpid() and not own_child(pid)):
                deny("%s(%r)" % (event, pid))
        elif event in ("os.fork", "os.forkpty"):
            if state["forks"] <= 0:
                deny("fork (limit reached)")
            state["forks"] -= 1
        elif event in ("os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
                       "subprocess.Popen", "pty.spawn"):
            deny("starting programs (%s)" % event)
        elif event.startswith("socket."):
            deny("network access (%s)" % event)
        elif event.startswith("ctypes."):
            raise ImportError("sandbox: ctypes is not allowed")

    return hook


def _sbx_wrap_unaudited(inside, deny, WRITE_FLAGS):
    """Replace the primitives that raise no (useful) audit event with checking wrappers."""
    import os
    import posix

    def no_new_session(*args, **kwargs):
        deny("changing session / process group")

    os.setsid = os.setpgid = os.setpgrp = posix.setsid = posix.setpgid = posix.setpgrp = \
        no_new_session

    real_open = posix.open

    def checked_open(path, flags, mode=0o777, *, dir_fd=None):
        # the "open" audit event does not say relative to which directory
        if dir_fd is not None and flags & WRITE_FLAGS and not inside(path, dir_fd):
            deny("writing %r" % (path,))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    os.open = posix.open = checked_open

    def checked_node(real):  # mkfifo / mknod raise no audit event
        def make(path, *args, dir_fd=None, **kwargs):
            if not inside(path, dir_fd):
                deny("%s(%r)" % (real.__name__, path))
            return real(path, *args, dir_fd=dir_fd, **kwargs)
        return make

    os.mkfifo = posix.mkfifo = checked_node(posix.mkfifo)
    os.mknod = posix.mknod = checked_node(posix.mknod)

    import _posixsubprocess  # subprocess's fork + exec primitive raises no audit event either

    def no_fork_exec(*args, **kwargs):
        deny("starting programs (_posixsubprocess.fork_exec)")

    _posixsubprocess.fork_exec = no_fork_exec


def _sbx_install(WORKDIR, FORK_BUDGET):
    """Install the guard in this interpreter: for good, there is no way to remove an audit hook."""
    import os

    state = {"forks": FORK_BUDGET}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def after_fork_child():
        state["forks"] = 0            # children may not fork again

    os.register_at_fork(after_in_child=after_fork_child)
    inside = _sbx_inside_check(WORKDIR)
    _sbx_wrap_unaudited(inside, _sbx_deny, WRITE_FLAGS)
    sys.addaudithook(_sbx_audit_hook(state, inside, _sbx_deny, WRITE_FLAGS))


if __name__ == "__main__":
    _sbx_wd, _sbx_path, _sbx_budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(_sbx_path, encoding="utf-8") as _f:
        _sbx_src = _f.read()
    _sbx_code = compile(_sbx_src, _sbx_path, "exec")
    _sbx_install(_sbx_wd, _sbx_budget)
    del _sbx_install, _sbx_inside_check, _sbx_audit_hook, _sbx_wrap_unaudited, _sbx_deny
    del _sbx_wd, _sbx_budget, _f, _sbx_src
    sys.argv = [_sbx_path]
    __file__ = _sbx_path
    __doc__ = None
    exec(_sbx_code)

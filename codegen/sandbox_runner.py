"""The rlimits sandbox's runner: installs the audit-hook guard, then runs the program as __main__.

codegen/execution.py copies this file into each run's working directory (as _sandbox_main.py, so
the sandbox uid can read it wherever the repository lives) and starts it there, instead of the
program itself, with

    python -I -B -u WORKDIR/_sandbox_main.py WORKDIR PROGRAM FORK_BUDGET [ENTRY_POINT SECRET_FD]

(bwrap runs it too, with FORK_BUDGET -1, for run_tests checks: then only the introspection
rules are installed). With ENTRY_POINT SECRET_FD (run_tests) it reads the pass secret from the
pipe SECRET_FD and closes it before any of the program's code runs, keeps it only in the audit
hook's private globals, runs the program (program + test code) and check(ENTRY_POINT), then
raises the audit event "sandbox.check_returned", which makes the hook print the secret only
when this module's top-level frame raised it (see run_tests in codegen/execution.py).

WORKDIR is the only directory the program may write to, PROGRAM the program's path, FORK_BUDGET
the number of forks the main process may make (its children may not fork again). The arguments
are read before any of the program's code runs; the program then sees sys.argv == [PROGRAM] and
__file__ == PROGRAM, and it runs in this module's namespace (which is sys.modules["__main__"])
with only `sys`, `SandboxViolation`, `_sbx_path` and `_sbx_code` (and, for a check, `_sbx_check`:
the entry point) left in it.

The guard's functions are "private" copies (see _sbx_private): no closure cells to rebind,
globals and builtins in a dict of their own that the hook keeps the program from reaching. The
guard is still a tripwire, not a security boundary: see codegen/execution.py. Importing this
module (for tests) installs nothing.
"""
import sys


class SandboxViolation(PermissionError):
    """Raised by the sandbox guard for a refused operation."""


def _sbx_deny(what):
    raise SandboxViolation("sandbox: " + what + " is not allowed")


def _sbx_private(fn, **env):
    """A copy of the closure-free function `fn` whose globals are a private dict (`env` and a
    snapshot of the builtins): the program cannot rebind what it uses (no __closure__ cells,
    and the guard refuses reading __globals__/__code__/__defaults__ of such functions)."""
    import builtins
    import types

    g = dict(env, __builtins__=dict(vars(builtins)), __name__="_sbx_private")
    f = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__)
    f.__kwdefaults__ = dict(fn.__kwdefaults__ or {}) or None
    return f


def _sbx_path_checks(WORKDIR):
    """The path tests the guard uses: (inside, is_memory). inside(path, dir_fd=None): does a path
    land inside WORKDIR (or on a harmless device)? is_memory: does it name a process's memory?"""
    import os
    import re

    resolve = _sbx_private(_sbx_resolve, realpath=os.path.realpath, join=os.path.join,
                           fspath=os.fspath, readlink=os.readlink, fsdecode=os.fsdecode)
    inside = _sbx_private(_sbx_inside, WORKDIR=WORKDIR, SEP=os.sep, resolve=resolve,
                          OK_DEVICES=("/dev/null", "/dev/stdout", "/dev/stderr"))
    mem = re.compile(r"/proc/(self|thread-self|\d+)(/task/\d+)?/(mem|pagemap)")
    return inside, _sbx_private(_sbx_is_memory, resolve=resolve, MEM=mem), resolve


def _sbx_resolve(path, dir_fd=None):
    """The real path `path` names (relative to the cwd, or to the directory open as `dir_fd`),
    None for an already open descriptor, False if it cannot be told."""
    if isinstance(path, int):
        return None
    try:
        p = fsdecode(fspath(path))
        if dir_fd is not None and dir_fd >= 0:   # audit events say -1 for "no dir_fd"
            p = join(readlink("/proc/self/fd/%d" % dir_fd), p)
    except (TypeError, OSError):
        return False
    return realpath(p)


def _sbx_inside(path, dir_fd=None):
    """Does `path` resolve to somewhere inside WORKDIR?"""
    full = resolve(path, dir_fd)
    if full is None:
        return True               # an already open descriptor
    return bool(full) and (full == WORKDIR or full.startswith(WORKDIR + SEP) or full in OK_DEVICES)


def _sbx_is_memory(path, dir_fd=None):
    """Does `path` name a process's memory (/proc/PID/mem and the like)?"""
    full = resolve(path, dir_fd)
    if full is False:
        return True
    return full is not None and MEM.fullmatch(full) is not None


FRAME_ATTRS = ("tb_frame", "gi_frame", "cr_frame", "ag_frame")   # audited frame getters
INTROSPECTION = ("sys._current_frames", "sys.settrace", "sys.setprofile",
                 "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook")
BLOCKED_MODULES = ("posix", "_posixsubprocess", "_imp", "_ctypes")


def _sbx_own_memory(path):
    """The hook's test (its own copy, with C functions only, so that nothing the program can
    reach changes it): does `path` (relative to the cwd or any open directory) name this
    process's memory (/proc/self/mem, .../pagemap, /proc/self/task/*/mem)?"""
    if isinstance(path, int):
        return False
    found = set()
    dirs = [None]
    if not (path.startswith("/") if isinstance(path, str) else path.startswith(b"/")):
        dirs += [int(fd) for fd in listdir("/proc/self/fd")]
    for fd in dirs:
        try:
            st = stat(path, dir_fd=fd)
        except (OSError, TypeError, ValueError):
            continue
        if st.st_dev == PROC_DEV:
            found.add(st.st_ino)
    if not found:
        return False
    mine = ["/proc/self/mem", "/proc/self/pagemap"]
    mine += ["/proc/self/task/%s/%s" % (t, n) for t in listdir("/proc/self/task")
             for n in ("mem", "pagemap")]
    for p in mine:
        try:
            if stat(p).st_ino in found:
                return True
        except OSError:
            pass
    return False


def _sbx_audit_hook(state, inside, is_memory, deny, write_flags, protected, full, check):
    """The sys.addaudithook callback (a private function, see _sbx_private): refuses the events
    listed in codegen/execution.py. Not `full` (bwrap runs a check): only the rules that keep
    the run_tests secret out of reach."""
    import os

    import posix

    own_child = _sbx_private(_sbx_own_child, getpid=os.getpid)
    is_memory = _sbx_private(_sbx_own_memory, stat=posix.stat, listdir=posix.listdir,
                             PROC_DEV=posix.stat("/proc/self").st_dev)
    rules = _sbx_private(_sbx_file_rules, state=state, inside=inside, deny=deny,
                         WRITE_FLAGS=write_flags, getpid=os.getpid, own_child=own_child,
                         BLOCKED_MODULES=BLOCKED_MODULES)
    hook = _sbx_private(_sbx_hook, INTROSPECTION=INTROSPECTION, FRAME_ATTRS=FRAME_ATTRS,
                        protected=protected, deny=deny, is_memory=is_memory, full=full,
                        file_rules=rules, getframe=sys._getframe, write=os.write, check=check)
    for f in (own_child, rules, hook, is_memory):
        protected.update((id(f), id(f.__globals__)))
    return hook


def _sbx_own_child(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[1]) == getpid()
    except (OSError, ValueError, IndexError):
        return False


def _sbx_hook(event, args):
    if event in INTROSPECTION:
        deny("introspection (%s)" % event)
    elif event == "sys._getframe":
        frame = args[0]
        while frame is not None:  # no frames of the guard's functions
            if id(frame.f_globals) in protected:
                deny("introspection (sys._getframe) of the sandbox guard")
            frame = frame.f_back
    elif event == "sandbox.check_returned":
        # run_tests: only the runner's own top-level code may say so, after check() returned
        if check is not None and getframe(1) is check[0]:
            write(1, b"\n" + check[1] + b"\n")
    elif event in ("object.__getattr__", "object.__setattr__", "object.__delattr__"):
        if args[1] in FRAME_ATTRS or id(args[0]) in protected:
            deny("%s(%r)" % (event, args[1]))
    elif event.startswith("ctypes."):
        raise ImportError("sandbox: ctypes is not allowed")
    elif event == "open" and is_memory(args[0]):
        deny("reading process memory (%r)" % (args[0],))
    elif full:
        file_rules(event, args)


def _sbx_file_rules(event, args):
    if event == "open":
        flags = args[2] if len(args) > 2 else 0
        if isinstance(flags, int) and flags & WRITE_FLAGS and not inside(args[0]):
            deny("writing %r" % (args[0],))
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime"):
        if not inside(args[0], args[-1]):
            deny("%s(%r)" % (event, args[0]))
    elif event in ("os.truncate", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr"):
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
        if event == "os.killpg" or pid <= 0 or (pid != getpid() and not own_child(pid)):
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
    elif event == "import" and args[0] in BLOCKED_MODULES:
        deny("importing %s again" % args[0])


def _sbx_no_new_session(*args, **kwargs):
    deny("changing session / process group")


def _sbx_no_fork_exec(*args, **kwargs):
    deny("starting programs (_posixsubprocess.fork_exec)")


def _sbx_checked_open(path, flags, mode=0o777, *, dir_fd=None):
    # the "open" audit event does not say relative to which directory
    if dir_fd is not None and (flags & WRITE_FLAGS and not inside(path, dir_fd)
                               or is_memory(path, dir_fd)):
        deny("opening %r" % (path,))
    return real(path, flags, mode, dir_fd=dir_fd)


def _sbx_checked_node(path, *args, dir_fd=None, **kwargs):  # mkfifo / mknod: no audit event
    if not inside(path, dir_fd):
        deny("%s(%r)" % (real.__name__, path))
    return real(path, *args, dir_fd=dir_fd, **kwargs)


def _sbx_checked_create(spec, *args):
    """_imp.create_builtin / create_dynamic: no fresh copy of a module the guard patched."""
    name = spec.name
    if type(name) is not str or name.rpartition(".")[2] in BLOCKED:
        deny("importing %r again" % (name,))
    module = real(spec, *args)
    if getattr(module, "__name__", None) != name:
        deny("importing %r again" % (name,))
    return module


def _sbx_checked_exec(module):
    """_imp.exec_builtin / exec_dynamic (importlib.reload): not for a module the guard patched."""
    if id(module) in patched or getattr(module, "__name__", None) in BLOCKED:
        deny("reloading %r" % (module,))
    return real(module)


def _sbx_wrap_unaudited(inside, is_memory, deny, write_flags, protected):
    """Replace the primitives that raise no (useful) audit event with checking wrappers, and
    keep the program from getting fresh, unwrapped copies of their modules."""
    import os
    import posix
    import _imp
    import _posixsubprocess  # subprocess's fork + exec primitive raises no audit event either

    def private(fn, **env):
        f = _sbx_private(fn, deny=deny, inside=inside, is_memory=is_memory, **env)
        protected.update((id(f), id(f.__globals__)))
        return f

    no_new_session = private(_sbx_no_new_session)
    os.setsid = os.setpgid = os.setpgrp = posix.setsid = posix.setpgid = posix.setpgrp = \
        no_new_session
    os.open = posix.open = private(_sbx_checked_open, real=posix.open, WRITE_FLAGS=write_flags)
    os.mkfifo = posix.mkfifo = private(_sbx_checked_node, real=posix.mkfifo)
    os.mknod = posix.mknod = private(_sbx_checked_node, real=posix.mknod)
    _posixsubprocess.fork_exec = private(_sbx_no_fork_exec)
    blocked = frozenset(BLOCKED_MODULES)
    patched = frozenset(id(m) for m in (os, posix, _imp, _posixsubprocess))
    for name in ("create_builtin", "create_dynamic"):
        setattr(_imp, name, private(_sbx_checked_create, real=getattr(_imp, name),
                                    BLOCKED=blocked))
    for name in ("exec_builtin", "exec_dynamic"):
        setattr(_imp, name, private(_sbx_checked_exec, real=getattr(_imp, name),
                                    BLOCKED=blocked, patched=patched))


def _sbx_after_fork_child():
    state["forks"] = 0            # children may not fork again


def _sbx_install(WORKDIR, FORK_BUDGET, SECRET_FD=None):
    """Install the guard in this interpreter: for good, there is no way to remove an audit hook.
    FORK_BUDGET < 0 (bwrap, for a run_tests check): only the introspection rules. SECRET_FD:
    a run_tests check; the secret read from it is kept only in the hook's private globals."""
    import os

    check = None
    if SECRET_FD is not None:
        check = (sys._getframe(1), os.read(SECRET_FD, 256))   # (the runner's top-level frame,
        os.close(SECRET_FD)                                    #  the secret)

    full = FORK_BUDGET >= 0
    state = {"forks": FORK_BUDGET}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    protected = set()
    deny = _sbx_private(_sbx_deny, SandboxViolation=SandboxViolation)
    inside, is_memory, resolve = _sbx_path_checks(WORKDIR)
    for f in (deny, inside, is_memory, resolve):
        protected.update((id(f), id(f.__globals__)))
    if full:
        after_fork = _sbx_private(_sbx_after_fork_child, state=state)
        protected.update((id(after_fork), id(after_fork.__globals__)))
        os.register_at_fork(after_in_child=after_fork)
        _sbx_wrap_unaudited(inside, is_memory, deny, write_flags, protected)
    sys.addaudithook(_sbx_audit_hook(state, inside, is_memory, deny, write_flags, protected,
                                     full, check))


def _sbx_not_dumpable():
    """PR_SET_DUMPABLE = 0: no other process of this uid may read our memory (run_tests)."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)
    except Exception:
        pass


if __name__ == "__main__":
    _sbx_wd, _sbx_path, _sbx_budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    _sbx_check, _sbx_fd = (sys.argv[4], int(sys.argv[5])) if len(sys.argv) > 5 else (None, None)
    with open(_sbx_path, encoding="utf-8") as _f:
        _sbx_src = _f.read()
    _sbx_code = compile(_sbx_src, _sbx_path, "exec")
    if _sbx_check is not None:
        _sbx_not_dumpable()
    _sbx_install(_sbx_wd, _sbx_budget, _sbx_fd)
    for _n in [_n for _n in globals() if _n.startswith("_sbx_")]:
        if _n not in ("_sbx_path", "_sbx_code", "_sbx_check"):
            del globals()[_n]
    del _n, _f, FRAME_ATTRS, INTROSPECTION, BLOCKED_MODULES
    sys.argv = [_sbx_path]
    __file__ = _sbx_path
    __doc__ = None
    if _sbx_check is None:
        del _sbx_check
        exec(_sbx_code)
    else:   # a run_tests check (ENTRY_POINT SECRET_FD): see _sbx_hook and execution.run_tests
        exec(_sbx_code)
        check(globals()[_sbx_check])
        sys.stdout.flush()
        sys.audit("sandbox.check_returned")

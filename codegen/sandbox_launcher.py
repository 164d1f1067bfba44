"""The first process of every sandboxed run (both backends): limits, uid drop, seccomp, then the program.

codegen/execution.py starts it as `python -I -S -c <this file's text> CPU AS FSIZE NPROC UID PPID WORKDIR CMD...`:

1. resource limits: no core dumps, CPU seconds, largest file, processes of the uid (RLIMIT_NPROC);
2. PR_SET_NO_NEW_PRIVS, then (as root) a switch to UID, the fresh unprivileged uid of this run;
3. a seccomp filter that refuses new user namespaces (unshare/clone with CLONE_NEWUSER fail with EPERM;
   clone3, whose flags a filter cannot read, fails with ENOSYS, and the C library falls back to clone):
   inside a user namespace a process is "root" again, for which the kernel lifts RLIMIT_NPROC;
4. PPID > 0 (the rlimits backend, which has no pid namespace to die with): the launcher stays as a small
   supervisor. It is a child subreaper (orphans of the run are re-parented to it, so the whole run stays
   one process tree), it gets SIGTERM when the caller dies (PR_SET_PDEATHSIG) and then kills every
   process of the run (all of UID's processes; without a uid, its process group), and it exits as the
   program did. The program, forked from it, dies with it (PR_SET_PDEATHSIG, SIGKILL);
5. the program: chdir WORKDIR, the address-space limit AS, exec CMD.
Any step that cannot be done ends the launch with a message on stderr and nothing run.
"""
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER = 1, 38, 22, 36
SECCOMP_MODE_FILTER, CLONE_NEWUSER = 2, 0x10000000
# arch -> (AUDIT_ARCH_*, unshare, clone, clone3): the syscall numbers a filter has to know
SYSCALLS = {"x86_64": (0xC000003E, 272, 56, 435), "aarch64": (0xC00000B7, 97, 220, 435)}


def refuse(why):
    sys.exit("sandbox launcher: " + why + "; refusing to run")


def libc_prctl():
    try:
        import ctypes
        return ctypes, ctypes.CDLL(None, use_errno=True).prctl
    except Exception:
        return None, None


def no_user_namespaces(ctypes, prctl):
    """Install the seccomp filter of step 3 (classic BPF: 8-byte instructions code, jt, jf, k).
    False where this architecture's syscall numbers are unknown (nothing installed)."""
    import platform
    import struct
    if platform.machine() not in SYSCALLS:
        return False
    audit_arch, unshare, clone, clone3 = SYSCALLS[platform.machine()]
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06     # BPF_LD|W|ABS, jumps, BPF_RET|K
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    program = [
        (LD, 0, 0, 4),              # 0: seccomp_data.arch
        (JEQ, 1, 0, audit_arch),    # 1: our ABI -> 3
        (RET, 0, 0, ENOSYS),        # 2: any other ABI (e.g. i386 calls on x86_64): nothing
        (LD, 0, 0, 0),              # 3: seccomp_data.nr
        (JGE, 8, 0, 0x40000000),    # 4: x32 ABI -> 13
        (JEQ, 7, 0, clone3),        # 5: -> 13
        (JEQ, 2, 0, unshare),       # 6: -> 9
        (JEQ, 1, 0, clone),         # 7: -> 9
        (RET, 0, 0, ALLOW),         # 8
        (LD, 0, 0, 16),             # 9: low 32 bits of args[0]: the flags
        (JSET, 0, 1, CLONE_NEWUSER),  # 10: CLONE_NEWUSER set -> 11, else -> 12
        (RET, 0, 0, EPERM),         # 11
        (RET, 0, 0, ALLOW),         # 12
        (RET, 0, 0, ENOSYS),        # 13
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *ins) for ins in program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = SockFprog(len(program), ctypes.addressof(code))
    if prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        refuse("the seccomp filter could not be installed")
    return True


def supervise(child, uid, prctl, ppid):
    """Step 4, in the launcher: wait for the program; end the whole run if the caller dies."""
    def caller_died(signum, frame):
        if uid >= 0:
            os.kill(-1, signal.SIGKILL)     # every process this uid may signal: the run's, no others
        else:
            os.killpg(0, signal.SIGKILL)
        os._exit(137)
    signal.signal(signal.SIGTERM, caller_died)
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != ppid:
        caller_died(0, None)
    status = os.waitpid(child, 0)[1]
    if os.WIFSIGNALED(status):                  # die the same way, so the caller sees the signal
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def main():
    cpu, mem, fsize, nproc, uid, ppid = (int(x) for x in sys.argv[1:7])
    workdir, cmd = sys.argv[7], sys.argv[8:]
    for lim, val in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NPROC, nproc)):
        hard = resource.getrlimit(lim)[1]
        resource.setrlimit(lim, (val, val) if hard == resource.RLIM_INFINITY else (min(val, hard),) * 2)
    ctypes, prctl = libc_prctl()
    if prctl is None or prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        refuse("PR_SET_NO_NEW_PRIVS failed")
    if uid >= 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if 0 in os.getresuid() + os.getresgid():
            refuse("could not drop root privileges")
    no_user_namespaces(ctypes, prctl)
    if ppid > 0:
        if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            refuse("PR_SET_CHILD_SUBREAPER failed")
        supervisor = os.getpid()
        child = os.fork()
        if child:
            supervise(child, uid, prctl, ppid)
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != supervisor:
            os._exit(126)
    os.chdir(workdir)
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()

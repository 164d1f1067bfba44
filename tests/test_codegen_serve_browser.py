"""codegen.serve's page (codegen/static/) in a real headless browser: typing a prompt, the completion
streaming in while the server still generates, Stop ending generation on the server, the suffix box;
and the page's Python highlighter checked against Python's own tokenize.

The browser is Debian's `chromium` (or chromium-browser / google-chrome on PATH); with none, or one
that does not start, these tests skip and say why. It is driven over the DevTools protocol through
--remote-debugging-pipe: JSON messages ended by a NUL byte, written to its fd 3 and read from its
fd 4. No websocket, no driver package."""
import builtins
import fcntl
import io
import json
import keyword
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from pathlib import Path

import pytest

from codegen.serve import make_server
from helpers import lively_model
from test_codegen_serve import Pacer, request, serving, wait_until

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Run by sys.executable: moves the pipes to fds 3 and 4, then becomes the browser.
TRAMPOLINE = ("import os, sys\n"
              "for source, target in ((int(sys.argv[1]), 3), (int(sys.argv[2]), 4)):\n"
              "    os.dup2(source, target)\n"
              "    os.close(source)\n"
              "os.execvp(sys.argv[3], sys.argv[3:])\n")


class Browser:
    """A headless Chromium and the DevTools protocol over its pipe. call() sends one command and
    waits for its answer; events that arrive meanwhile are kept in `events`."""

    def __init__(self, executable: str):
        self.profile = tempfile.mkdtemp(prefix="minillama-chromium-")
        to_browser, self.from_browser = os.pipe(), os.pipe()
        # fds >= 10 for the trampoline, so moving one onto 3 or 4 cannot overwrite the other
        theirs = [fcntl.fcntl(to_browser[0], fcntl.F_DUPFD, 10), fcntl.fcntl(self.from_browser[1], fcntl.F_DUPFD, 10)]
        flags = ["--headless", "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "--disable-gpu",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
        self.process = subprocess.Popen([sys.executable, "-c", TRAMPOLINE, *map(str, theirs), executable, *flags,
                                         "about:blank"], pass_fds=theirs, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for fd in (*theirs, to_browser[0], self.from_browser[1]):
            os.close(fd)
        self.to_browser, self.buffer, self.next_id, self.events = to_browser[1], b"", 0, []

    def call(self, method: str, session: str = None, timeout: float = 10, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser[0]], [], [], left)[0]:
                raise TimeoutError("the browser did not answer in time")
            chunk = os.read(self.from_browser[0], 1 << 20)
            if not chunk:
                raise RuntimeError(f"the browser exited: {self.process.stderr.read().decode(errors='replace')[-2000:]}")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self):
        os.close(self.to_browser)  # the browser exits when its pipe closes
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()
        os.close(self.from_browser[0])
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab, attached to its own protocol session."""

    def __init__(self, browser: Browser, url: str):
        self.browser = browser
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && typeof pythonTokens === 'function'")

    def call(self, method: str, **params) -> dict:
        return self.browser.call(method, self.session, **params)

    def js(self, expression: str):
        """The value of a JavaScript expression evaluated in the page."""
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression[:80]}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait(self, expression: str, timeout: float = 10):
        wait_until(lambda: self.js(expression), timeout)

    def click(self, element_id: str):
        """A real mouse click (pressed, released) at the middle of the element."""
        x, y = self.js(f"(() => {{ const r = document.getElementById('{element_id}').getBoundingClientRect(); "
                       "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type(self, element_id: str, text: str):
        """Replace the field's content by typing `text` (focus, select all, insert as the keyboard would)."""
        self.js(f"document.getElementById('{element_id}').focus(); document.getElementById('{element_id}').select()")
        self.call("Input.insertText", text=text)
        assert self.js(f"document.getElementById('{element_id}').value") == text

    def text(self, element_id: str) -> str:
        return self.js(f"document.getElementById('{element_id}').textContent")

    def problems(self) -> list:
        """Uncaught exceptions and Content-Security-Policy refusals seen in this tab."""
        return [event for event in self.browser.events if event.get("sessionId") == self.session and (
            event["method"] == "Runtime.exceptionThrown" or (
                event["method"] == "Log.entryAdded" and "Content Security Policy" in event["params"]["entry"]["text"]))]


def browser_or_skip() -> Browser:
    executable = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if executable is None:
        pytest.skip(f"no headless browser: none of {', '.join(BROWSERS)} is on PATH (Debian: apt-get install chromium)")
    browser = Browser(executable)
    try:
        browser.call("Browser.getVersion", timeout=30)
    except (RuntimeError, TimeoutError, OSError) as e:
        browser.close()
        pytest.skip(f"{executable} did not start: {e}")
    return browser


@pytest.fixture(scope="module")
def browser():
    browser = browser_or_skip()
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def server():
    """A tiny model behind the page; its Pacer is set per test (pace, forced token)."""
    from codegen.common import CodeTokenizer
    from conftest import asset_path

    tokenizer = CodeTokenizer(str(asset_path("tokenizer.model")))
    model = lively_model(vocab_size=32000, max_seq_len=512)
    srv = make_server(model, tokenizer, "127.0.0.1", 0, max_new_tokens_limit=400, quiet=True)
    srv.pacer = Pacer(model, 0.0)
    yield from serving(srv)


PROMPT = 'def mean(xs):\n    """The average of xs."""\n    return sum(xs) / '


def test_page_streams_the_completion_and_stop_ends_generation_on_the_server(browser, server):
    pacer = server.pacer
    pacer.delay, pacer.token = 0.02, server.tokenizer.encode("x", bos=False, eos=False)[-1]  # 400 tokens: 8 s
    page = Page(browser, server.url)
    page.type("prompt", PROMPT)
    page.type("max_new_tokens", "400")
    page.click("generate")
    page.wait("document.getElementById('completion').textContent.length > 0")
    assert server.model_lock.locked()  # the first tokens are on the page while the server still generates
    shown = len(page.text("completion"))
    time.sleep(0.3)
    assert len(page.text("completion")) > shown and server.model_lock.locked()  # more keep coming
    assert page.js("document.getElementById('generate').disabled") is True

    page.click("stop")
    clicked_at = pacer.calls
    wait_until(lambda: not server.model_lock.locked(), timeout=3)  # generation has ended on the server
    stopped_at = pacer.calls
    time.sleep(0.2)
    assert pacer.calls == stopped_at < clicked_at + 10 < 400  # no token computed since, and it stopped early
    page.wait("document.getElementById('status').textContent.startsWith('stopped after')")
    assert page.js("[document.getElementById('generate').disabled, document.getElementById('stop').disabled]") \
        == [False, True]
    completion = page.text("completion")
    assert completion.replace("x", "").strip() == "" and 0 < completion.count("x") <= stopped_at
    assert page.text("echo") == PROMPT  # the prompt, highlighted as Python:
    spans = page.js("[...document.querySelectorAll('#echo span')].map(s => [s.className, s.textContent])")
    assert spans == [["py-kw", "def"], ["py-def", "mean"], ["py-str", '"""The average of xs."""'],
                     ["py-kw", "return"], ["py-builtin", "sum"]]
    assert not page.problems()


def test_page_shows_what_generate_answers_and_sends_the_suffix(browser, server):
    pacer = server.pacer
    pacer.delay, pacer.token = 0.0, None
    page = Page(browser, server.url)
    page.type("prompt", PROMPT)
    page.type("max_new_tokens", "12")
    page.click("generate")
    page.wait("document.getElementById('status').textContent.includes(' tokens in ')")
    answer = json.loads(request(server, "/generate", json.dumps({"prompt": PROMPT, "max_new_tokens": 12}).encode())[2])
    assert page.text("completion") == answer["completion"] and answer["completion"]
    assert f"{answer['tokens']} tokens in " in page.text("status")

    page.type("suffix", "    return total\n")  # this model has no FIM sentinels: the server's 400, shown
    page.click("generate")
    page.wait("document.getElementById('status').textContent.startsWith('error:')")
    assert "fill-in-the-middle" in page.text("status") or "sentinels" in page.text("status")
    assert not page.problems()


# ----------------------------------------------------------------------------------------------
# The highlighter (page.js's pythonTokens) against Python's tokenize


def python_tokens(source: str, builtin_names: set) -> list:
    """[(kind, text)] of what page.js colours, found with tokenize: strings (an f-string whole, as
    Python < 3.12 gives it), comments, numbers, keywords, the name after def/class, and builtins not
    after a dot."""
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    out, previous, fstring_depth, fstring_start = [], "", 0, None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        name = tokenize.tok_name[token.type]
        if name in ("FSTRING_START", "FSTRING_END"):  # Python >= 3.12 splits f-strings up
            fstring_depth += 1 if name == "FSTRING_START" else -1
            if name == "FSTRING_START" and fstring_depth == 1:
                fstring_start = offsets[token.start[0] - 1] + token.start[1]
            if fstring_depth == 0:
                previous = source[fstring_start:offsets[token.end[0] - 1] + token.end[1]]
                out.append(("str", previous))
            continue
        if fstring_depth:
            continue
        kind = {"STRING": "str", "COMMENT": "comment", "NUMBER": "num"}.get(name)
        if name == "NAME":
            if keyword.iskeyword(token.string):
                kind = "kw"
            elif previous in ("def", "class"):
                kind = "def"
            elif token.string in builtin_names and previous != ".":
                kind = "builtin"
        if kind:
            out.append((kind, token.string))
        if name not in ("COMMENT", "NL", "NEWLINE", "INDENT", "DEDENT", "ENDMARKER"):
            previous = token.string
    return out


SNIPPETS = '''\
x = rb'\\x00' + Rb"\\"" + u'é' + f"{a!r:>{w}}" + fR'{b}' + br"""\\
multi""" + 'a\\
b' # a comment with 'quotes' and def
n = [0, 00, 0x_1F, 0B1_0, 0o7_7, 1_000, 1., .5, 1.5e-3, 1E+9j, 12J, 3.14_15]
print(len(x)); x.print(); obj.len = type
class Ünïcode(object): pass
async def gen(*args): yield from range(3); await something
λ = lambda: None if True else False
@decorator
def f(a, /, b, *, c): return a @ b
'''


def test_highlighter_matches_pythons_tokenize(browser, server):
    page = Page(browser, server.url)
    names = page.js("[...BUILTINS]")
    assert set(names) <= set(dir(builtins)) and set(page.js("[...KEYWORDS]")) == set(keyword.kwlist)
    sources = {"snippets": SNIPPETS, **{str(path.relative_to(ROOT)): path.read_text(encoding="utf-8") for path in
                                        [*sorted(ROOT.glob("*.py")), *sorted((ROOT / "codegen").glob("*.py"))]}}
    for module in (tokenize, json.decoder, shutil):  # some of the standard library's too
        sources[module.__name__] = Path(module.__file__).read_text(encoding="utf-8")
    found = page.js(f"(() => {{ const sources = {json.dumps(sources)}; const out = {{}};"
                    "for (const [name, text] of Object.entries(sources))"
                    "  out[name] = pythonTokens(text).map(([start, end, kind]) => [kind, text.slice(start, end)]);"
                    "return out; })()")
    for name, source in sources.items():
        assert [tuple(token) for token in found[name]] == python_tokens(source, set(names)), name


def test_highlighting_a_text_as_it_streams_in_only_recolours_its_last_token(browser, server):
    """Cut anywhere (a completion arriving piece by piece), the text's coloured tokens but the last
    are exactly the whole text's tokens up to there: what is shown never changes colour later."""
    page = Page(browser, server.url)
    text = SNIPPETS + (ROOT / "codegen" / "serve.py").read_text(encoding="utf-8")[:3000]
    bad = page.js(f"(() => {{ const text = {json.dumps(text)}; const whole = pythonTokens(text), bad = [];"
                  "for (let cut = 0; cut <= text.length; cut += 1) {"
                  "  const part = pythonTokens(text.slice(0, cut)), last = part.pop();"
                  "  const before = whole.filter((token) => token[1] <= (last === undefined ? cut : last[0]));"
                  "  if (part.join('|') !== before.join('|')) bad.push(cut);"
                  "}"
                  "return bad; })()")
    assert bad == []

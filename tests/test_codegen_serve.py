"""codegen.serve: the local web server, run in a thread and spoken to over real HTTP with urllib."""
import ast
import base64
import hashlib
import json
import shutil
import socket
import threading
import time
import types
from typing import Tuple
import urllib.error
import urllib.request

import pytest
import torch

import codegen.serve as serve_module
from codegen.serve import (accepted_hosts, host_allowed, is_loopback_host, make_server, origin_allowed,
                           parse_request, render_page, RequestError, split_host)
from config import LlamaConfig
from conftest import asset_path
from llama import Llama

LIMIT = 8


@pytest.fixture(scope="module")
def server():
    from codegen.common import CodeTokenizer

    tokenizer = CodeTokenizer(str(asset_path("tokenizer.model")))
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=8,
                              max_seq_len=512)).eval()
    yield from serving(make_server(model, tokenizer, "127.0.0.1", 0, max_new_tokens_limit=LIMIT,
                                   max_request_bytes=4096, quiet=True))


def serving(srv):
    """Serve srv in a thread for the fixture's lifetime; shut it down cleanly afterwards."""
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def request(srv, path, body=None, headers=None, method=None):
    """(status, headers, body bytes) of one request; HTTP errors are returned, not raised."""
    headers = {"Content-Type": "application/json", **(headers or {})} if body is not None else dict(headers or {})
    req = urllib.request.Request(srv.url.rstrip("/") + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post(srv, payload, **kwargs):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return request(srv, "/generate", body, **kwargs)


def test_url_uses_the_picked_port(server):
    assert server.url.startswith("http://127.0.0.1:") and server.server_address[1] != 0


def test_page_has_the_form(server):
    status, headers, body = request(server, "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    for needle in ("<textarea", 'id="max_new_tokens"', 'id="temperature"', 'id="top_p"', "Generate", "<pre",
                   '<button id="stop"', "/generate/stream", "<script>"):
        assert needle in page
    assert "innerHTML" not in page  # results are set with textContent: HTML in them stays escaped
    assert "&quot;&quot;&quot;" in page.split("<textarea")[1].split("</textarea>")[0]  # the default prompt, escaped
    assert "script-src 'sha256-" in headers["Content-Security-Policy"]
    assert request(server, "/health")[:3:2] == (200, b'{"ok": true}')
    assert request(server, "/nope")[0] == 404


def test_generate_returns_json(server):
    status, headers, body = post(server, {"prompt": 'def add(a, b):\n    """Add."""', "max_new_tokens": 5,
                                          "temperature": 0.0, "top_p": None})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    data = json.loads(body)
    assert isinstance(data["completion"], str) and 1 <= data["tokens"] <= 5 and data["seconds"] >= 0
    # greedy is deterministic; sampling with top_p works too
    assert json.loads(post(server, {"prompt": 'def add(a, b):\n    """Add."""', "max_new_tokens": 5})[2]) \
        ["completion"] == data["completion"]
    status, _, body = post(server, {"prompt": "def f():", "max_new_tokens": 3, "temperature": 0.8, "top_p": 0.9})
    assert status == 200 and json.loads(body)["tokens"] <= 3


def test_generation_length_is_clamped(server):
    status, _, body = post(server, {"prompt": "def f(x):", "max_new_tokens": 10_000})
    data = json.loads(body)
    assert status == 200 and data["max_new_tokens"] == LIMIT and data["tokens"] <= LIMIT


def test_oversized_body_is_413(server):
    status, _, body = post(server, {"prompt": "x" * 5000})
    assert status == 413 and "limit" in json.loads(body)["error"]


def test_body_of_exactly_max_request_bytes_is_accepted(server):
    """The size limit is inclusive: max_request_bytes bytes pass, one byte more is 413."""
    body = b'{"prompt": "def f():", "max_new_tokens": 1}'.ljust(server.max_request_bytes)
    assert post(server, body)[0] == 200
    assert post(server, body + b" ")[0] == 413


@pytest.mark.parametrize("payload", [
    b"{not json",
    b"\xff\xfe",
    b"[1, 2]",
    {"max_new_tokens": 5},
    {"prompt": 42},
    {"prompt": ""},
    {"prompt": "def f():", "max_new_tokens": "5"},
    {"prompt": "def f():", "max_new_tokens": True},
    {"prompt": "def f():", "max_new_tokens": 0},
    {"prompt": "def f():", "temperature": "hot"},
    {"prompt": "def f():", "temperature": -1},
    {"prompt": "def f():", "top_p": 1.5},
    {"prompt": "def f():", "extra": 1},
    b'{"prompt": "def f(): \\ud800"}',  # a lone surrogate: valid JSON, not text the tokenizer takes
    {"prompt": "def f():", "suffix": 3},
    {"prompt": "def f():", "suffix": ["return 1"]},
    b'{"prompt": "def f():", "suffix": "x\\ud800"}',
])
def test_bad_requests_are_400_with_a_json_error(server, payload):
    status, headers, body = post(server, payload)
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"]


def test_other_request_errors(server):
    assert post(server, {"prompt": "def f():"}, headers={"Content-Type": "text/plain"})[0] == 415
    assert post(server, {"prompt": "def f():"}, headers={"Host": "attacker.example:8000"})[0] == 403  # DNS rebinding
    port = server.server_address[1]
    assert request(server, "/", headers={"Host": f"localhost:{port}"})[0] == 200
    assert request(server, "/", headers={"Host": "localhost"})[0] == 200
    assert request(server, "/", headers={"Host": "localhost:1234"})[0] == 403  # another port: another origin
    assert request(server, "/health", headers={"Host": f"evil.localhost:{port}"})[0] == 403


def test_concurrent_requests_are_serialised(server, monkeypatch):
    results, inside, most = [], [0], [0]
    forward = server.model.forward

    def counting_forward(*args, **kwargs):  # how many requests are in the model at once
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            return forward(*args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(server.model, "forward", counting_forward)

    def worker():
        results.append(post(server, {"prompt": "def g(y):", "max_new_tokens": 4})[0])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [200] * 4 and most[0] == 1


def test_parse_request_defaults():
    settings = parse_request(b'{"prompt": "def f():"}', limit=16, default_tokens=8)
    assert settings == {"prompt": "def f():", "max_new_tokens": 8, "temperature": 0.0, "top_p": None}
    with pytest.raises(RequestError):
        parse_request(b'{"prompt": "x", "temperature": NaN}', 16, 8)


def test_non_loopback_hosts_are_refused():
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    for host in ("0.0.0.0", "", "192.168.1.10", "::", "example.invalid"):
        assert not is_loopback_host(host)
    with pytest.raises(ValueError, match="allow-remote"):
        make_server(None, None, "0.0.0.0", 0)
    loopback = accepted_hosts("127.0.0.1")
    assert host_allowed("127.0.0.1:80", loopback, 80) and host_allowed("[::1]:80", loopback, 80)
    assert not host_allowed("evil.example", loopback, 80) and not host_allowed("10.0.0.1:80", loopback, 80)


def test_serve_cli_refuses_a_public_host(capsys):
    from codegen.cli import main

    assert main(["--option", "serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--allow-remote" in err and len(err.strip().splitlines()) == 1


def test_host_header_localhost_means_exactly_the_name():
    """Only `localhost` itself: not `*.localhost`, not a name merely ending in it."""
    loopback = accepted_hosts("127.0.0.1")
    assert host_allowed("localhost:8000", loopback, 8000) and host_allowed("LOCALHOST", loopback, 8000)
    for value in ("evil.localhost", "sub.localhost:8000", "evillocalhost:8000", "evillocalhost", "localhost.:8000",
                  "localhost:8000:8000", "localhost:80x", "user@localhost", ""):
        assert not host_allowed(value, loopback, 8000), value


def test_host_header_ipv6_loopback_with_and_without_port():
    """IPv6 literals come in brackets: `[::1]:8000` and `[::1]` pass; bare `::1` is not a Host value."""
    loopback = accepted_hosts("::1")
    assert split_host("[::1]:8000") == ("[::1]", 8000) and split_host("::1") is None
    for value in ("[::1]:8000", "[::1]", "localhost", "127.0.0.1:8000"):
        assert host_allowed(value, loopback, 8000), value
    for value in ("::1", "[::2]", "[fe80::1]:8000", "[::1]:8001"):
        assert not host_allowed(value, loopback, 8000), value


def test_a_name_resolving_to_any_non_loopback_address_is_not_loopback(monkeypatch):
    """is_loopback_host needs every resolved address to be loopback, not just one."""
    answers = {"mixed.example": ["127.0.0.1", "10.1.2.3"], "local.example": ["127.0.0.2", "::1"]}

    def fake_getaddrinfo(host, port, *args, **kwargs):
        return [(2, 1, 6, "", (addr, 0)) for addr in answers[host]]

    monkeypatch.setattr(serve_module.socket, "getaddrinfo", fake_getaddrinfo)
    assert not is_loopback_host("mixed.example")
    assert is_loopback_host("local.example")


def test_default_generation_length_is_clamped_to_the_limit(server):
    """make_server clamps default_max_new_tokens to max_new_tokens_limit."""
    srv = make_server(server.model, None, "127.0.0.1", 0, max_new_tokens_limit=10, default_max_new_tokens=1000,
                      quiet=True)
    try:
        assert srv.default_max_new_tokens == 10
    finally:
        srv.server_close()


# ----------------------------------------------------------------------------------------------
# The page's files (codegen/static/) and its Content-Security-Policy


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def test_page_has_the_suffix_box_and_the_csp_allows_exactly_its_inline_script_and_style(server):
    status, headers, body = request(server, "/")
    page, csp = body.decode(), headers["Content-Security-Policy"]
    assert status == 200
    assert '<textarea id="suffix"' in page and "the model fills the middle" in page and 'id="suffix_echo"' in page
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    style = page.split("<style>", 1)[1].split("</style>", 1)[0]
    assert script == (serve_module.STATIC_DIR / "page.js").read_text(encoding="utf-8")
    assert style == (serve_module.STATIC_DIR / "page.css").read_text(encoding="utf-8")
    assert f"script-src {_sha256_source(script)};" in csp and f"style-src {_sha256_source(style)};" in csp
    assert csp.startswith("default-src 'none';") and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "{{" not in page  # every placeholder filled in
    for path in ("/page.js", "/page.css", "/index.html", "/static/page.js", "/../serve.py", "/%2e%2e/serve.py"):
        assert request(server, path)[0] == 404  # nothing is served from disk


def test_render_page_escapes_and_fills_placeholders_in_one_pass():
    page, _ = render_page(16, 8, model_name='<img src=x onerror="a()"> {{script}} & co')
    assert '&lt;img src=x onerror=&quot;a()&quot;&gt; {{script}} &amp; co' in page  # escaped, not re-filled
    assert page.count("<script>") == 1 and page.count("<style>") == 1
    assert 'max="16"' in page and 'value="8"' in page


def test_render_page_rejects_broken_static_files(tmp_path):
    def copy(name, replace=None):
        folder = tmp_path / name
        shutil.copytree(serve_module.STATIC_DIR, folder)
        if replace:
            file, old, new = replace
            text = (folder / file).read_text(encoding="utf-8")
            assert old in text
            (folder / file).write_text(text.replace(old, new, 1), encoding="utf-8")
        return folder

    render_page(4, 2, static_dir=copy("intact"))
    for name, replace in [("missing", ("index.html", "{{model}}", "")),
                          ("unknown", ("index.html", "{{model}}", "{{model}}{{secret}}")),
                          ("twice", ("index.html", "{{model}}", "{{model}}{{model}}")),
                          ("closes", ("page.js", "const $", "// </SCRIPT>\nconst $"))]:
        with pytest.raises(ValueError):
            render_page(4, 2, static_dir=copy(name, replace))
    gone = copy("gone")
    (gone / "page.css").unlink()
    with pytest.raises(FileNotFoundError):
        render_page(4, 2, static_dir=gone)


def test_no_string_literal_in_serve_py_spans_more_than_60_lines():
    """Pages and programs live in files (codegen/static/), not in long Python strings."""
    source = open(serve_module.__file__, encoding="utf-8").read()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.end_lineno - node.lineno <= 60, f"string at line {node.lineno} is too long"


# ----------------------------------------------------------------------------------------------
# Infilling: the optional "suffix" field


def fake_generation(calls, error=None):
    def fake_generate_completions(*args, **kwargs):
        calls.append((args, kwargs))
        if error is not None:
            raise error
        return [types.SimpleNamespace(text="MIDDLE", tokens=2, seconds=0.01, stop_reason="eos")]
    return fake_generate_completions


def test_suffix_reaches_generate_completions(server, monkeypatch):
    calls = []
    monkeypatch.setattr(serve_module, "generate_completions", fake_generation(calls))
    status, _, body = post(server, {"prompt": "def f(x):\n", "suffix": "    return y\n", "max_new_tokens": 3,
                                    "temperature": 0.5, "top_p": 0.9})
    assert status == 200 and json.loads(body)["completion"] == "MIDDLE"
    args, kwargs = calls[-1]
    assert args == (server.model, server.tokenizer, "def f(x):\n", 1, 3, 0.5, 0.9)
    assert kwargs == {"generator": server.generator, "suffix": "    return y\n", "compile": False, "on_text": None}
    for suffix in ({}, {"suffix": None}, {"suffix": ""}):
        payload = {"prompt": "def f():", **suffix}
        assert post(server, payload)[0] == 200
        assert calls[-1][1] == {"generator": server.generator, "suffix": None, "compile": False,
                                "on_text": None}  # plain completion


def test_suffix_value_error_is_400_with_its_message(server, monkeypatch):
    message = "this model has no fill-in-the-middle sentinels"
    monkeypatch.setattr(serve_module, "generate_completions", fake_generation([], ValueError(message)))
    status, headers, body = post(server, {"prompt": "def f():", "suffix": "    return 1"})
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {"error": message}
    status, _, body = post(server, {"prompt": "def f():"})  # without a suffix a ValueError stays a server error
    assert status == 500 and message in json.loads(body)["error"]


def test_suffix_counts_towards_the_body_limit(server):
    status, _, body = post(server, {"prompt": "def f():", "suffix": "x" * 5000})
    assert status == 413 and "limit" in json.loads(body)["error"]


def test_parse_request_suffix():
    assert parse_request(b'{"prompt": "a", "suffix": "b"}', 16, 8)["suffix"] == "b"
    for body in (b'{"prompt": "a"}', b'{"prompt": "a", "suffix": null}', b'{"prompt": "a", "suffix": ""}'):
        assert "suffix" not in parse_request(body, 16, 8)
    for body in (b'{"prompt": "a", "suffix": 1}', b'{"prompt": "a", "suffix": true}', b'{"prompt": "a", "suffix": {}}',
                 b'{"prompt": "a", "suffix": "\\ud800"}'):
        with pytest.raises(RequestError) as info:
            parse_request(body, 16, 8)
        assert info.value.status == 400 and "suffix" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Hardening: listen backlog, numeric ranges, Host/Origin, the read deadline


@pytest.fixture(scope="module")
def strict(server):
    """A second server: --allow-remote on a loopback bind, one extra allowed host, a 1 s read deadline
    and room for bodies larger than the 4300-digit integer limit."""
    yield from serving(make_server(server.model, server.tokenizer, "127.0.0.1", 0, allow_remote=True,
                                   allowed_hosts=["Code.Example"], max_new_tokens_limit=LIMIT,
                                   max_request_bytes=64 * 1024, quiet=True, read_deadline_s=1))


def raw_request(srv, data: bytes, timeout: float = 5) -> bytes:
    """What the server answers to `data` sent as is, read until it closes (or `timeout`)."""
    with socket.create_connection(srv.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        return recv_all(sock)


def recv_all(sock) -> bytes:
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:  # a timeout: return what came
        pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer (0 when there is none)."""
    parts = answer.split(b"\r\n", 1)[0].split()
    return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") else 0


def test_listen_backlog_is_128(server):
    assert server.request_queue_size == 128 and serve_module.CodeServer.request_queue_size == 128


def test_huge_and_tiny_numbers_are_400_not_a_dropped_connection_or_500(strict):
    huge = b'{"prompt": "def f():", "max_new_tokens": ' + b"9" * 5000 + b"}"  # over Python's int-str limit
    status, headers, body = post(strict, huge)
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, _, body = post(strict, {"prompt": "def f():", "temperature": 1e-300})
    assert status == 400 and "0 (greedy)" in json.loads(body)["error"]
    assert post(strict, {"prompt": "def f():", "temperature": 1e-3, "max_new_tokens": 2})[0] == 200
    assert post(strict, b'{"prompt": "def f():", "suffix": ' + b"[" * 5000 + b"]" * 5000 + b"}")[0] == 400


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", "0", "max_new_tokens"), ("max_new_tokens", str(10 ** 6 + 1), "[1, 1000000]"),
    ("max_new_tokens", "HUGE", "max_new_tokens"), ("max_new_tokens", "2.0", "integer"),
    ("temperature", "1e-300", "0 (greedy)"), ("temperature", "0.0009", "[0.001, 100]"), ("temperature", "100.5", "100"),
    ("temperature", "1e999", "temperature"), ("temperature", "HUGE", "temperature"),
    ("top_p", "-0.0001", "top_p"), ("top_p", "1e999", "top_p"), ("top_p", "HUGE", "top_p"),
])
def test_parse_request_range_checks_every_number(field, value, message):
    value = "9" * 4000 if value == "HUGE" else value  # under the 4300-digit limit: parses, then out of range
    body = ('{"prompt": "def f():", "%s": %s}' % (field, value)).encode()
    with pytest.raises(RequestError) as info:
        parse_request(body, 16, 8)
    assert info.value.status == 400 and message in str(info.value)


def test_parse_request_accepts_the_range_ends():
    settings = parse_request(b'{"prompt": "a", "max_new_tokens": 1000000, "temperature": 100, "top_p": 0}', 16, 8)
    assert settings["max_new_tokens"] == 16 and settings["temperature"] == 100.0 and settings["top_p"] == 0.0
    assert parse_request(b'{"prompt": "a", "temperature": 0.001, "top_p": 1}', 16, 8)["temperature"] == 0.001
    assert parse_request(b'{"prompt": "a", "temperature": 0}', 16, 8)["temperature"] == 0.0


def test_allow_remote_on_loopback_still_checks_host_and_origin(strict):
    port = strict.server_address[1]
    assert post(strict, {"prompt": "def f():"}, headers={"Host": "attacker.example"})[0] == 403
    assert request(strict, "/health", headers={"Host": f"evil.localhost:{port}"})[0] == 403
    for host in (f"127.0.0.1:{port}", "localhost", f"[::1]:{port}", f"code.example:{port}", "CODE.example"):
        assert request(strict, "/health", headers={"Host": host})[0] == 200, host
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null", f"https://127.0.0.1:{port}",
                   "http://127.0.0.1", f"http://localhost:{port + 1}", f"http://127.0.0.1:{port}/x"):
        status, _, body = post(strict, {"prompt": "def f():", "max_new_tokens": 1}, headers={"Origin": origin})
        assert status == 403 and "Origin" in json.loads(body)["error"], origin
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://code.example:{port}"):
        assert post(strict, {"prompt": "def f():", "max_new_tokens": 1}, headers={"Origin": origin})[0] == 200


def test_a_duplicated_host_header_is_400(strict):
    port = strict.server_address[1]
    answer = raw_request(strict, (f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example\r\n"
                                  "Connection: close\r\n\r\n").encode())
    assert status_of(answer) == 400 and b"more than one Host" in answer
    answer = raw_request(strict, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    assert status_of(answer) == 200


def test_accepted_hosts_for_a_remote_bind_are_the_bound_address_and_the_allowed_hosts():
    assert accepted_hosts("10.0.0.5") == {"10.0.0.5"}
    assert accepted_hosts("10.0.0.5", ["a.example", " B.example ", ""]) == {"10.0.0.5", "a.example", "b.example"}
    assert accepted_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "[::1]"}
    assert accepted_hosts("::1", ["0:0::2"]) == {"[::1]", "[::2]", "localhost", "127.0.0.1"}
    for bad in ("a.example:80", "a b", "http://a.example", "a/b"):
        with pytest.raises(ValueError):
            accepted_hosts("127.0.0.1", [bad])
    remote = accepted_hosts("10.0.0.5", ["a.example"])
    assert host_allowed("a.example:80", remote, 80) and not host_allowed("localhost:80", remote, 80)
    assert origin_allowed("http://10.0.0.5", remote, 80) and not origin_allowed("http://10.0.0.5", remote, 8000)


def test_serve_cli_refuses_a_bad_allowed_host(capsys):
    from codegen.cli import main

    assert main(["--option", "serve", "--port", "0", "--allowed-hosts", "a.example:80"]) == 2
    assert "--allowed-hosts" in capsys.readouterr().err


def trickle(srv, head: bytes, rest: bytes) -> Tuple[bytes, float]:
    """(the answer, seconds until it came) when `head` is sent at once and `rest` one byte every 0.2 s
    by a second thread."""
    sock = socket.create_connection(srv.server_address[:2], timeout=5)
    stop = threading.Event()

    def sender():
        for byte in rest:
            if stop.wait(0.2):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    sock.sendall(head)
    thread = threading.Thread(target=sender, daemon=True)
    started = time.monotonic()
    thread.start()
    answer = recv_all(sock)
    seconds = time.monotonic() - started
    stop.set()
    thread.join(timeout=5)
    sock.close()
    return answer, seconds


def test_a_trickling_request_gets_408_at_the_read_deadline(strict):
    port = strict.server_address[1]
    body = json.dumps({"prompt": "def f():", "max_new_tokens": 1}).encode().ljust(100)
    head = (f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    for first, rest in ((head, body), (head[:20], head[20:] + body)):  # a slow body; slow headers
        answer, seconds = trickle(strict, first, rest)
        assert status_of(answer) == 408 and b"within 1 s" in answer, answer[:200]
        assert seconds < 3
    assert post(strict, {"prompt": "def f():", "max_new_tokens": 1})[0] == 200  # the server still answers


# ----------------------------------------------------------------------------------------------
# Streaming: POST /generate/stream


def stream_lines(srv, payload) -> Tuple[int, dict, list]:
    """(status, headers, the NDJSON lines parsed) of a /generate/stream request read to its end."""
    status, headers, body = request(srv, "/generate/stream", json.dumps(payload).encode())
    if not headers["Content-Type"].startswith("application/x-ndjson"):
        return status, headers, [json.loads(body)]
    assert body.endswith(b"\n")
    return status, headers, [json.loads(line) for line in body.decode("utf-8").splitlines()]


def test_stream_sends_the_text_in_pieces_then_what_generate_answers(server, monkeypatch):
    prompt = {"prompt": 'def add(a, b):\n    """Add."""', "max_new_tokens": LIMIT}
    pieces = []
    monkeypatch.setattr(serve_module, "generate_completions", recording(pieces))
    status, headers, lines = stream_lines(server, prompt)
    assert status == 200 and headers["Cache-Control"] == "no-store" and "Content-Length" not in headers
    texts, last = [line["text"] for line in lines[:-1]], lines[-1]
    assert texts == pieces and len(texts) >= 2 and all(texts)  # one line per piece on_text received
    assert last.pop("done") is True and "".join(texts) == last["completion"]
    answer = json.loads(post(server, prompt)[2])
    assert {**last, "seconds": 0} == {**answer, "seconds": 0}  # the same fields and values as /generate


def recording(pieces):
    """generate_completions, with each piece handed to on_text also appended to `pieces`."""
    generate = serve_module.generate_completions

    def generate_and_record(*args, on_text=None, **kwargs):
        def record(text):
            pieces.append(text)
            if on_text is not None:
                on_text(text)
        return generate(*args, on_text=record, **kwargs)
    return generate_and_record


def test_stream_errors_before_the_first_line_have_their_status(server, monkeypatch):
    status, headers, lines = stream_lines(server, {"prompt": ""})
    assert status == 400 and headers["Content-Type"].startswith("application/json") and "prompt" in lines[0]["error"]
    message = "this model has no fill-in-the-middle sentinels"
    monkeypatch.setattr(serve_module, "generate_completions", fake_generation([], ValueError(message)))
    assert stream_lines(server, {"prompt": "def f():", "suffix": "    return 1"})[::2] == (400, [{"error": message}])
    assert stream_lines(server, {"prompt": "def f():"})[0] == 500


def test_stream_error_after_the_first_line_is_its_last_line(server, monkeypatch):
    def fails_midway(*args, on_text, **kwargs):
        on_text("    return")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(serve_module, "generate_completions", fails_midway)
    status, _, lines = stream_lines(server, {"prompt": "def f():"})
    assert status == 200
    assert lines == [{"text": "    return"}, {"error": "generation failed: RuntimeError: out of memory"}]


class Pacer:
    """Stands in for model.forward: counts the calls, sleeps `delay` s in each, and while `token` is
    set makes that token win every step, so a completion runs on to max_new_tokens at a known pace."""

    def __init__(self, model, delay: float, token=None):
        self.forward, self.delay, self.token, self.calls = model.forward, delay, token, 0
        model.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        time.sleep(self.delay)
        logits, hidden = self.forward(*args, **kwargs)
        if self.token is not None:
            logits = logits.clone()
            logits[..., self.token] += 1e4
        return logits, hidden


PACED_LIMIT = 300


@pytest.fixture(scope="module")
def paced(server):
    """A server whose generations take 20 ms a token and run to the end (a 300-token limit): 6 s."""
    from llama import Llama

    model = Llama(server.model.config).eval()
    pacer = Pacer(model, 0.02, token=server.tokenizer.encode("x", bos=False, eos=False)[-1])
    srv = make_server(model, server.tokenizer, "127.0.0.1", 0, max_new_tokens_limit=PACED_LIMIT, quiet=True)
    srv.pacer = pacer
    yield from serving(srv)


def wait_until(condition, timeout: float) -> float:
    """Seconds until condition() held; AssertionError after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - started


def test_closing_the_stream_stops_generation_on_the_server(paced):
    port = paced.server_address[1]
    body = json.dumps({"prompt": "def f(x):\n    return", "max_new_tokens": PACED_LIMIT}).encode()
    head = (f"POST /generate/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection(paced.server_address[:2], timeout=10)
    sock.sendall(head + body)
    received = b""
    while received.count(b'{"text"') < 3:  # three pieces have come: generation is under way
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.0 200") and b"application/x-ndjson" in received
    assert paced.model_lock.locked()  # still generating
    sock.close()
    closed_at = paced.pacer.calls
    wait_until(lambda: not paced.model_lock.locked(), timeout=2)
    stopped_at = paced.pacer.calls
    time.sleep(0.2)
    assert paced.pacer.calls == stopped_at  # no token is computed any more
    assert stopped_at - closed_at <= 4 and stopped_at < PACED_LIMIT // 2  # within a few tokens of the close
    assert post(paced, {"prompt": "def f():", "max_new_tokens": 2})[0] == 200  # the model is free again

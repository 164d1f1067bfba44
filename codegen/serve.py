"""A local web page for code completion with a Mini-Llama. Standard library http.server only.

    python run_llama.py --option serve --pretrained-model-path code.pt [--port 8000] [--host 127.0.0.1]
        [--allow-remote] [--allowed-hosts h1,h2]

    GET  /          one self-contained HTML page: prompt, optional suffix, max tokens, temperature,
                    top_p, Generate and Stop; the text streams in, Python syntax highlighted
    POST /generate  JSON {prompt, max_new_tokens?, temperature?, top_p?, suffix?}
                    -> 200 {completion, tokens, seconds, max_new_tokens, stop_reason}
                    a non-empty suffix asks for infilling: the completion is the middle between
                    prompt and suffix (needs a model with fill-in-the-middle sentinels, else 400)
                    errors: 400 bad JSON or field (a number out of range too), 403 foreign Host or
                    Origin, 408 request not sent within the read deadline, 411 no Content-Length,
                    413 body over the limit, 415 not application/json, 500 generation failed;
                    always a JSON {"error": ...}
    POST /generate/stream  the same request, answered as it is generated: 200 with an NDJSON body
                    (application/x-ndjson, one JSON object a line, ended by the server closing the
                    connection): {"text": delta} as each piece of the completion becomes final, then
                    {"done": true, completion, tokens, seconds, max_new_tokens, stop_reason} (the
                    /generate answer), or {"error": ...} when generation fails midway. An error found
                    before the first line is the status and JSON error /generate answers. To stop
                    it, close the connection (the page's Stop button aborts its fetch): the next
                    write fails, and generation ends within a token or two, freeing the model.
    GET  /health    {"ok": true}

The page lives in codegen/static/: index.html (with {{name}} placeholders), page.js and page.css,
read when the server starts (make_server). Script and style are inlined into the one page, and its
Content-Security-Policy allows exactly them by sha256 hash of the files' contents; no file is
served from disk, so there is no path to traverse.

The server binds to loopback only unless --allow-remote is given (there is no authentication). Every
request's Host header (at most one; several are 400) must name an accepted host, with the server's
port or none, else 403 (DNS rebinding): for a loopback bind, the bound host, localhost, 127.0.0.1
and [::1]; for a non-loopback bind, only the bound address. --allowed-hosts h1,h2 adds names. An
Origin header, when present, must be http://<accepted host> with the server's port, else 403 (a
cross-site page's requests). Reading a request (headers and body) must finish within
read_deadline_s (10 s) of its start, else 408; an idle keep-alive connection is closed then.
Requests are bounded in size (--max_request_bytes) and generation length (--max_new_tokens_limit);
every numeric field is range-checked (400); one lock serialises access to the model, so concurrent
requests queue (the listen backlog is 128).
"""
import base64
import hashlib
import html
import io
import ipaddress
import json
import re
import signal
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch

from codegen.generate import check_prompt, generate_completions
from utils import UsageError

DEFAULT_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
MAX_DRAIN_BYTES = 1 << 20  # an oversized body up to this size is read and dropped, so the client sees the 413
FIELDS = ("prompt", "max_new_tokens", "temperature", "top_p", "suffix")
MAX_NEW_TOKENS_FIELD = 10 ** 6  # a larger max_new_tokens is a 400 (a smaller one is clamped to the server's limit)
MIN_TEMPERATURE = 1e-3  # temperature is 0 (greedy) or in [MIN_TEMPERATURE, 100]: smaller overflows the softmax
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
READ_DEADLINE_S = 10.0  # the whole request (request line, headers, body) must arrive within this

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page's files: a fixed list, read at server start. Nothing else on disk is ever read or served.
PAGE_FILES = {"html": "index.html", "script": "page.js", "style": "page.css"}
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy(script: str, style: str) -> str:
    """Only this page's own inline script and style (by hash) may run; fetch() only to this server."""
    return (f"default-src 'none'; script-src {_csp_hash(script)}; style-src {_csp_hash(style)}; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def load_page_files(static_dir: Path = STATIC_DIR) -> Dict[str, str]:
    """The texts of PAGE_FILES ({"html", "script", "style"}), checked to be inlinable."""
    files = {key: (Path(static_dir) / name).read_text(encoding="utf-8") for key, name in PAGE_FILES.items()}
    for key, tag in (("script", "</script"), ("style", "</style")):
        if tag in files[key].lower():
            raise ValueError(f"{PAGE_FILES[key]} contains {tag!r}: it could not be inlined into the page")
    return files


def render_page(limit: int, default_tokens: int, model_name: str = "",
                static_dir: Path = STATIC_DIR) -> Tuple[str, str]:
    """(the HTML page, its Content-Security-Policy). The HTML file's {{name}} placeholders are filled
    in one pass (a filled-in value is never scanned again); the default prompt and model name are
    HTML-escaped; the script and style go in verbatim and are allowed by their sha256 hashes."""
    files = load_page_files(static_dir)
    values = {"style": files["style"], "script": files["script"], "prompt": html.escape(DEFAULT_PROMPT),
              "limit": str(limit), "default_tokens": str(default_tokens), "model": html.escape(model_name)}
    found = _PLACEHOLDER.findall(files["html"])
    if sorted(found) != sorted(values):
        raise ValueError(f"{PAGE_FILES['html']} must hold each of {sorted(values)} once, found {sorted(found)}")
    page = _PLACEHOLDER.sub(lambda m: values[m.group(1)], files["html"])
    return page, content_security_policy(files["script"], files["style"])


def is_loopback_host(host: str) -> bool:
    """True when every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    host = (host or "").strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError, OSError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_HOST_VALUE = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_-]+(?:\.[a-z0-9_-]+)*)(?::([0-9]{1,5}))?")


def _host_name(host: str) -> str:
    """`host` as a Host header names it: lower-case, an IPv6 literal compressed and in brackets."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if ":" in name:  # only an IPv6 literal may hold a colon (no port here)
        return f"[{ipaddress.IPv6Address(name).compressed}]"
    if not _HOST_NAME.fullmatch(name):
        raise ValueError(f"{host!r} is not a host name or address")
    return name


def accepted_hosts(bind_host: str, allowed_hosts: Iterable[str] = ()) -> frozenset:
    """The host names a request's Host (and Origin) may name: the bound host, plus localhost,
    127.0.0.1 and [::1] for a loopback bind, plus `allowed_hosts`. ValueError for a bad name."""
    names = {_host_name(bind_host)} | {_host_name(h) for h in allowed_hosts if h.strip()}
    if is_loopback_host(bind_host):
        names.update(LOOPBACK_NAMES)
    return frozenset(names)


def split_host(value: str) -> Optional[Tuple[str, Optional[int]]]:
    """(name, port or None) of a Host header value (name lower-case), or None when malformed."""
    match = _HOST_VALUE.fullmatch((value or "").strip().lower())
    if not match:
        return None
    return match.group(1), (int(match.group(2)) if match.group(2) else None)


def host_allowed(value: str, accepted: frozenset, port: int) -> bool:
    """A Host header naming exactly an accepted host, with `port` or no port."""
    parts = split_host(value)
    return parts is not None and parts[0] in accepted and parts[1] in (None, port)


def origin_allowed(value: str, accepted: frozenset, port: int) -> bool:
    """An Origin header `http://<accepted host>[:port]` whose port (80 when absent) is `port`."""
    value = (value or "").strip().lower()
    parts = split_host(value[len("http://"):]) if value.startswith("http://") else None
    return parts is not None and parts[0] in accepted and (parts[1] or 80) == port


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, limit: int, default_tokens: int) -> dict:
    """The validated generation settings of a /generate body; raises RequestError(400, ...)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an integer over 4300 digits, deep nesting
        raise RequestError(400, f"body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "body must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; expected {list(FIELDS)}")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "prompt must be a non-empty string")
    try:
        check_prompt(prompt)
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    max_new_tokens, temperature, top_p = _parse_numbers(data, default_tokens)
    settings = {"prompt": prompt, "max_new_tokens": min(max_new_tokens, limit), "temperature": float(temperature),
                "top_p": None if top_p is None else float(top_p)}
    suffix = _parse_suffix(data.get("suffix"))
    if suffix:
        settings["suffix"] = suffix  # present only for infilling: absent, null or "" is a plain completion
    return settings


def _is_number(value, low, high, integer: bool = False) -> bool:
    """`value` is a JSON number (an int if `integer`; not a bool) in [low, high]. No float() conversion,
    so a huge int is simply out of range; NaN and infinities fail the comparison."""
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and low <= value <= high


def _parse_numbers(data: dict, default_tokens: int) -> Tuple[int, float, Optional[float]]:
    """(max_new_tokens, temperature, top_p), each range-checked; RequestError(400, ...) if not."""
    max_new_tokens = data.get("max_new_tokens")
    max_new_tokens = default_tokens if max_new_tokens is None else max_new_tokens
    if not _is_number(max_new_tokens, 1, MAX_NEW_TOKENS_FIELD, integer=True):
        raise RequestError(400, f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_FIELD}] "
                                "(larger than the server's limit is clamped to it)")
    temperature = data.get("temperature")
    temperature = 0.0 if temperature is None else temperature
    if not (_is_number(temperature, 0, 0) or _is_number(temperature, MIN_TEMPERATURE, 100)):
        raise RequestError(400, f"temperature must be 0 (greedy) or a number in [{MIN_TEMPERATURE}, 100]")
    top_p = data.get("top_p")
    if top_p is not None and not _is_number(top_p, 0, 1):
        raise RequestError(400, "top_p must be null or a number in [0, 1]")
    return max_new_tokens, float(temperature), None if top_p is None else float(top_p)


def _parse_suffix(suffix) -> str:
    if suffix is None:
        return ""
    if not isinstance(suffix, str):
        raise RequestError(400, "suffix must be a string or null")
    try:
        check_prompt(suffix)
    except ValueError as e:
        raise RequestError(400, f"bad suffix: {e}") from None
    return suffix


class ReadDeadlineExceeded(Exception):
    """The client took longer than the read deadline to send its request (not a TimeoutError, so
    http.server does not swallow it: the handler answers 408)."""


class DeadlineReader(io.RawIOBase):
    """A socket's read side whose reads fail with ReadDeadlineExceeded once `deadline` (a
    time.monotonic() value, or None for none) has passed: a trickling client cannot stretch one
    request past it, however often each recv returns a byte."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self.sock, self.deadline, self.received = sock, None, 0

    def start(self, seconds: float):
        self.deadline, self.received = time.monotonic() + seconds, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise ReadDeadlineExceeded()
            self.sock.settimeout(left)
        try:
            count = self.sock.recv_into(buffer)
        except socket.timeout:
            if self.deadline is not None:
                raise ReadDeadlineExceeded() from None
            raise
        self.received += count
        return count


class CodeRequestHandler(BaseHTTPRequestHandler):
    server_version = "MiniLlamaCode/1.0"
    timeout = 30  # socket timeout for writes, and for reads while no read deadline runs

    # -- reading: one deadline for the whole request
    def setup(self):
        super().setup()
        self.rfile.close()  # replaced by a reader that enforces the read deadline
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        self.command, self.request_version, self.requestline = None, "HTTP/1.1", ""  # until parsed
        self.reader.start(self.server.read_deadline_s)
        try:
            super().handle_one_request()
        except ReadDeadlineExceeded:
            self.close_connection = True
            if self.reader.received and not self._responded():  # an idle keep-alive connection just closes
                try:
                    self._error(408, f"request not received within {self.server.read_deadline_s:g} s")
                    self.wfile.flush()
                except OSError:
                    pass

    def _responded(self) -> bool:
        return self.reader.deadline is None  # _send stops the deadline

    def _stop_read_deadline(self):
        self.reader.deadline = None
        self.connection.settimeout(self.timeout)

    # -- responses
    def _begin(self, status: int, content_type: str, length: Optional[int], extra_headers=()):
        """The status line and headers. length None: a streamed body, ended by closing the connection."""
        self._stop_read_deadline()  # the request has been read (or given up on): writes get the plain timeout
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is None:
            self.close_connection = True
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str, extra_headers=()):
        self._begin(status, content_type, len(body), extra_headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json; charset=utf-8")

    def _error(self, status: int, message: str):
        self._json(status, {"error": message})

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)

    def _host_ok(self) -> bool:
        """One Host header naming an accepted host (or none: HTTP/1.0), and no foreign Origin."""
        hosts, origins = self.headers.get_all("Host") or [], self.headers.get_all("Origin") or []
        port, accepted = self.server.server_address[1], self.server.accepted_hosts
        if len(hosts) > 1 or len(origins) > 1:
            status, message = 400, "more than one Host or Origin header"
        elif hosts and not host_allowed(hosts[0], accepted, port):
            status, message = 403, (f"Host {hosts[0][:100]!r} is not a name this server answers to "
                                    "(DNS rebinding?); see --allowed-hosts")
        elif origins and not origin_allowed(origins[0], accepted, port):
            status, message = 403, f"Origin {origins[0][:100]!r} is not this server's page (cross-site request)"
        else:
            return True
        self._drain_and_close()
        self._error(status, message)
        return False

    # -- routes
    def do_GET(self):
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(200, self.server.page, "text/html; charset=utf-8",
                       [("Content-Security-Policy", self.server.content_security_policy), ("X-Frame-Options", "DENY"),
                        ("Referrer-Policy", "no-referrer")])
        elif path == "/health":
            self._json(200, {"ok": True})
        else:
            self._error(404, f"no such page: {path}")

    def do_HEAD(self):
        self.do_GET()

    def do_POST(self):
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        if path not in ("/generate", "/generate/stream"):
            self._drain_and_close()
            self._error(404, f"no such endpoint: {self.path}")
            return
        try:
            settings = self._read_settings()
        except RequestError as e:
            self._error(e.status, str(e))
            return
        stream = TextStream(self) if path == "/generate/stream" else None
        try:
            result = self._generate(settings, stream)
        except ClientGone:
            self.log_message("%s", "stream stopped: the client closed the connection")
            return
        except RequestError as e:
            self._fail(e.status, str(e), stream)
            return
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            self._fail(500, f"generation failed: {type(e).__name__}: {e}", stream)
            return
        answer = {"completion": result.text, "tokens": result.tokens, "seconds": round(result.seconds, 4),
                  "max_new_tokens": settings["max_new_tokens"], "stop_reason": result.stop_reason}
        if stream is None:
            self._json(200, answer)
        else:
            stream.last({"done": True, **answer})

    def _fail(self, status: int, message: str, stream: Optional["TextStream"]):
        """An error answer; once a stream has begun (its 200 is sent), its last line instead."""
        if stream is not None and stream.started:
            stream.last({"error": message})
        else:
            self._error(status, message)

    def _read_settings(self) -> dict:
        """The request's validated generation settings (parse_request); RequestError if not."""
        body = self._read_body()
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise RequestError(415, "Content-Type must be application/json")
        return parse_request(body, self.server.max_new_tokens_limit, self.server.default_max_new_tokens)

    def _generate(self, settings: dict, stream: Optional["TextStream"] = None):
        """One completion under the model lock, its text streamed to `stream` when given. With a
        suffix, a ValueError (say, a model without fill-in-the-middle sentinels) is the request's
        fault: RequestError(400, its message)."""
        args = (self.server.model, self.server.tokenizer, settings["prompt"], 1, settings["max_new_tokens"],
                settings["temperature"], settings["top_p"])
        suffix = settings.get("suffix") or None  # absent, null or empty: a plain completion
        with self.server.model_lock:
            try:
                return generate_completions(*args, generator=self.server.generator, suffix=suffix,
                                            compile=self.server.compile,
                                            on_text=None if stream is None else stream.text)[0]
            except ValueError as e:
                if suffix is None:
                    raise
                raise RequestError(400, str(e)) from None

    def _content_length(self) -> int:
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise RequestError(411, "chunked bodies are not accepted: send a Content-Length")
        value = self.headers.get("Content-Length")
        if value is None:
            raise RequestError(411, "Content-Length required")
        try:
            length = int(value)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {value!r}")
        return length

    def _read_body(self) -> bytes:
        length = self._content_length()
        limit = self.server.max_request_bytes
        if length > limit:
            self.close_connection = True
            self._drain(length)
            raise RequestError(413, f"request body of {length} bytes is over the limit of {limit} bytes")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise RequestError(400, f"body ended after {len(body)} of {length} bytes")
        return body

    def _drain(self, length: int):
        """Read and drop up to MAX_DRAIN_BYTES of a rejected body, so the client is not reset mid-send."""
        left = min(length, MAX_DRAIN_BYTES)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except (OSError, ReadDeadlineExceeded):
            pass

    def _drain_and_close(self):
        self.close_connection = True
        try:
            self._drain(max(0, int(self.headers.get("Content-Length") or 0)))
        except ValueError:
            pass


class ClientGone(Exception):
    """The client of a streamed answer has closed its connection."""


class TextStream:
    """The NDJSON body of a /generate/stream answer, one JSON object a line. The 200 and its headers
    go out with the first line, so an error found before any text (a bad suffix, say) still gets its
    own status. A write that fails because the client closed the connection (the page's Stop button,
    a closed tab, Ctrl-C on curl) raises ClientGone, out of generation's on_text callback: that
    leaves the decoding loop, so no further token is computed and the model lock is released. The
    first write after the close may still succeed (the client's system answers it with a reset), so
    generation stops one or two pieces of text later."""

    def __init__(self, handler: "CodeRequestHandler"):
        self.handler, self.started = handler, False

    def line(self, obj: dict):
        try:
            if not self.started:
                self.started = True
                self.handler._begin(200, "application/x-ndjson; charset=utf-8", None)
            self.handler.wfile.write(json.dumps(obj).encode("utf-8") + b"\n")
        except OSError:  # BrokenPipeError, ConnectionResetError, a write timeout
            raise ClientGone() from None

    def text(self, delta: str):
        """generate_completions' on_text: each piece of the completion as soon as it is final."""
        self.line({"text": delta})

    def last(self, obj: dict):
        """The closing line; a client gone by now misses nothing that matters."""
        try:
            self.line(obj)
        except ClientGone:
            pass


class CodeServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: bursts of concurrent clients queue instead of being reset

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class CodeServer6(CodeServer):
    address_family = socket.AF_INET6


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 8000, *, allow_remote: bool = False,
                max_new_tokens_limit: int = 512, max_request_bytes: int = 64 * 1024,
                default_max_new_tokens: Optional[int] = None, seed: int = 1337, quiet: bool = False,
                model_name: str = "", compile: bool = False, allowed_hosts: Iterable[str] = (),
                read_deadline_s: float = READ_DEADLINE_S) -> CodeServer:
    """A bound (not yet serving) server; call serve_forever() (e.g. in a thread), then shutdown()
    and server_close(). port 0 picks a free port: see server.url. A host that is not loopback
    raises ValueError unless allow_remote; so does a malformed name in allowed_hosts (the Host
    and Origin names accepted besides the bound host: see accepted_hosts)."""
    if not allow_remote and not is_loopback_host(host):
        raise ValueError(f"refusing to listen on {host!r}: not a loopback address. The server has no "
                         "authentication; pass --allow-remote (allow_remote=True) to expose it anyway")
    if max_new_tokens_limit < 1 or max_request_bytes < 1 or not read_deadline_s > 0:
        raise ValueError("max_new_tokens_limit and max_request_bytes must be >= 1, read_deadline_s > 0")
    hosts = accepted_hosts(host, allowed_hosts)
    default_max_new_tokens = min(default_max_new_tokens or 128, max_new_tokens_limit)
    page, csp = render_page(max_new_tokens_limit, default_max_new_tokens, model_name)  # reads codegen/static/
    bind_host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    cls = CodeServer6 if ":" in bind_host else CodeServer
    server = cls((bind_host, port), CodeRequestHandler)
    server.model, server.tokenizer = model, tokenizer
    server.model_lock = threading.Lock()
    server.allow_remote, server.accepted_hosts, server.read_deadline_s = allow_remote, hosts, read_deadline_s
    server.max_new_tokens_limit = max_new_tokens_limit
    server.max_request_bytes = max_request_bytes
    server.default_max_new_tokens = default_max_new_tokens
    server.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    server.quiet = quiet
    server.compile = compile  # decode through torch.compile (CUDA graphs on a GPU)
    server.page, server.content_security_policy = page.encode("utf-8"), csp
    return server


# ----------------------------------------------------------------------------------------------
# Command line: python run_llama.py --option serve


def add_arguments(parser):
    group = parser.add_argument_group("serve")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    group.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    group.add_argument("--allow-remote", "--allow_remote", dest="allow_remote", action="store_true",
                       help="allow a non-loopback --host: anyone who can reach it may use the model, unauthenticated")
    group.add_argument("--allowed-hosts", "--allowed_hosts", dest="allowed_hosts", default="",
                       help="comma-separated host names that Host and Origin headers may also name (default: "
                            "only the bound host, plus localhost/127.0.0.1/[::1] for a loopback bind)")
    group.add_argument("--max_new_tokens_limit", type=int, default=512,
                       help="requests asking for more new tokens are clamped to this (default 512)")
    group.add_argument("--max_request_bytes", type=int, default=64 * 1024,
                       help="larger request bodies get 413 (default 65536)")
    group.add_argument("--quiet", action="store_true", help="do not log requests")
    group.add_argument("--compile", action="store_true",
                       help="decode through torch.compile (CUDA graphs on a GPU): same tokens, faster steps")


def run(args) -> int:
    from codegen.common import start

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if not args.allow_remote and not is_loopback_host(args.host):
        raise UsageError(f"refusing to listen on {args.host!r}: not a loopback address (the server has no "
                         "authentication); pass --allow-remote to expose it anyway")
    allowed = (getattr(args, "allowed_hosts", "") or "").split(",")
    try:
        accepted_hosts(args.host, allowed)
    except ValueError as e:
        raise UsageError(f"bad --host or --allowed-hosts: {e}") from None
    _, model, tokenizer = start(args)
    try:
        server = make_server(model, tokenizer, args.host, args.port, allow_remote=args.allow_remote,
                             max_new_tokens_limit=args.max_new_tokens_limit, max_request_bytes=args.max_request_bytes,
                             seed=args.seed, quiet=args.quiet, model_name=str(args.pretrained_model_path),
                             compile=args.compile, allowed_hosts=allowed)
    except OSError as e:  # the port is taken, the address cannot be bound
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    if args.allow_remote and not is_loopback_host(args.host):
        print(f"WARNING: listening on {args.host} without authentication: anyone who can reach it can use the model",
              file=sys.stderr)
    print(f"serving {args.pretrained_model_path} on {server.url}  (Ctrl-C to stop)", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)  # `kill` stops it as cleanly as Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.server_close()
    return 0

"""A local web page for code completion with a Mini-Llama. Standard library http.server only.

    python run_llama.py --option serve --pretrained-model-path code.pt [--port 8000] [--host 127.0.0.1]

    GET  /          one self-contained HTML page: prompt, optional suffix, max tokens, temperature,
                    top_p, Generate
    POST /generate  JSON {prompt, max_new_tokens?, temperature?, top_p?, suffix?}
                    -> 200 {completion, tokens, seconds, max_new_tokens, stop_reason}
                    a non-empty suffix asks for infilling: the completion is the middle between
                    prompt and suffix (needs a model with fill-in-the-middle sentinels, else 400)
                    errors: 400 bad JSON or field, 411 no Content-Length, 413 body over the limit,
                    415 not application/json, 500 generation failed; always a JSON {"error": ...}
    GET  /health    {"ok": true}

The page lives in codegen/static/: index.html (with {{name}} placeholders), page.js and page.css,
read when the server starts (make_server). Script and style are inlined into the one page, and its
Content-Security-Policy allows exactly them by sha256 hash of the files' contents; no file is
served from disk, so there is no path to traverse.

The server binds to loopback only unless --allow-remote is given (there is no authentication), and
then also rejects requests whose Host header is not a loopback name (DNS rebinding). Requests are
bounded in size (--max_request_bytes) and generation length (--max_new_tokens_limit); one lock
serialises access to the model, so concurrent requests queue.
"""
import base64
import hashlib
import html
import ipaddress
import json
import math
import re
import signal
import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from codegen.generate import check_prompt, generate_completions
from utils import UsageError

DEFAULT_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
MAX_DRAIN_BYTES = 1 << 20  # an oversized body up to this size is read and dropped, so the client sees the 413
FIELDS = ("prompt", "max_new_tokens", "temperature", "top_p", "suffix")

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


def _host_header_is_loopback(value: Optional[str]) -> bool:
    if not value:
        return True  # HTTP/1.0 clients may send none
    value = value.strip()
    if value.startswith("["):  # [::1]:8000
        name = value[1:value.find("]")] if "]" in value else value
    else:
        name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, limit: int, default_tokens: int) -> dict:
    """The validated generation settings of a /generate body; raises RequestError(400, ...)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None
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
    max_new_tokens = data.get("max_new_tokens", default_tokens)
    if max_new_tokens is None:
        max_new_tokens = default_tokens
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise RequestError(400, "max_new_tokens must be an integer >= 1")
    temperature = data.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or not 0 <= temperature <= 100:
        raise RequestError(400, "temperature must be a number in [0, 100]")
    top_p = data.get("top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not math.isfinite(top_p) or not 0 <= top_p <= 1):
        raise RequestError(400, "top_p must be null or a number in [0, 1]")
    settings = {"prompt": prompt, "max_new_tokens": min(max_new_tokens, limit), "temperature": float(temperature),
                "top_p": None if top_p is None else float(top_p)}
    suffix = _parse_suffix(data.get("suffix"))
    if suffix:
        settings["suffix"] = suffix  # present only for infilling: absent, null or "" is a plain completion
    return settings


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


class CodeRequestHandler(BaseHTTPRequestHandler):
    server_version = "MiniLlamaCode/1.0"
    timeout = 30  # seconds a client may take to send its request (a stalled one does not hold a thread forever)

    # -- responses
    def _send(self, status: int, body: bytes, content_type: str, extra_headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()
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
        if self.server.allow_remote or _host_header_is_loopback(self.headers.get("Host")):
            return True
        self._error(403, "Host header is not a loopback name (this server only answers local pages)")
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
        if self.path.split("?", 1)[0] != "/generate":
            self._drain_and_close()
            self._error(404, f"no such endpoint: {self.path}")
            return
        try:
            body = self._read_body()
            content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            if content_type != "application/json":
                raise RequestError(415, "Content-Type must be application/json")
            settings = parse_request(body, self.server.max_new_tokens_limit, self.server.default_max_new_tokens)
        except RequestError as e:
            self._error(e.status, str(e))
            return
        try:
            result = self._generate(settings)
        except RequestError as e:
            self._error(e.status, str(e))
            return
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            self._error(500, f"generation failed: {type(e).__name__}: {e}")
            return
        self._json(200, {"completion": result.text, "tokens": result.tokens, "seconds": round(result.seconds, 4),
                         "max_new_tokens": settings["max_new_tokens"], "stop_reason": result.stop_reason})

    def _generate(self, settings: dict):
        """One completion under the model lock. With a suffix, a ValueError (say, a model without
        fill-in-the-middle sentinels) is the request's fault: RequestError(400, its message)."""
        args = (self.server.model, self.server.tokenizer, settings["prompt"], 1, settings["max_new_tokens"],
                settings["temperature"], settings["top_p"])
        suffix = settings.get("suffix") or None  # absent, null or empty: a plain completion
        with self.server.model_lock:
            try:
                return generate_completions(*args, generator=self.server.generator, suffix=suffix,
                                            compile=self.server.compile)[0]
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
        except OSError:
            pass

    def _drain_and_close(self):
        self.close_connection = True
        try:
            self._drain(max(0, int(self.headers.get("Content-Length") or 0)))
        except ValueError:
            pass


class CodeServer(ThreadingHTTPServer):
    daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class CodeServer6(CodeServer):
    address_family = socket.AF_INET6


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 8000, *, allow_remote: bool = False,
                max_new_tokens_limit: int = 512, max_request_bytes: int = 64 * 1024,
                default_max_new_tokens: Optional[int] = None, seed: int = 1337, quiet: bool = False,
                model_name: str = "", compile: bool = False) -> CodeServer:
    """A bound (not yet serving) server; call serve_forever() (e.g. in a thread), then shutdown()
    and server_close(). port 0 picks a free port: see server.url. A host that is not loopback
    raises ValueError unless allow_remote."""
    if not allow_remote and not is_loopback_host(host):
        raise ValueError(f"refusing to listen on {host!r}: not a loopback address. The server has no "
                         "authentication; pass --allow-remote (allow_remote=True) to expose it anyway")
    if max_new_tokens_limit < 1 or max_request_bytes < 1:
        raise ValueError("max_new_tokens_limit and max_request_bytes must be >= 1")
    default_max_new_tokens = min(default_max_new_tokens or 128, max_new_tokens_limit)
    page, csp = render_page(max_new_tokens_limit, default_max_new_tokens, model_name)  # reads codegen/static/
    bind_host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    cls = CodeServer6 if ":" in bind_host else CodeServer
    server = cls((bind_host, port), CodeRequestHandler)
    server.model, server.tokenizer = model, tokenizer
    server.model_lock = threading.Lock()
    server.allow_remote = allow_remote
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
    _, model, tokenizer = start(args)
    try:
        server = make_server(model, tokenizer, args.host, args.port, allow_remote=args.allow_remote,
                             max_new_tokens_limit=args.max_new_tokens_limit, max_request_bytes=args.max_request_bytes,
                             seed=args.seed, quiet=args.quiet, model_name=str(args.pretrained_model_path),
                             compile=args.compile)
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

"""A local stand-in for Anthropic's ``POST /v1/messages/count_tokens``, for tests without network.

The real ``anthropic`` SDK is pointed at it (``AsyncAnthropic(base_url=server.base_url)``), so
the SDK's own request building, retry loop, ``retry-after`` handling, timeouts and error
classes are exercised for real; only the tokenizer is fake. Faults are scripted per request
(FIFO); with an empty script every request gets a normal answer.

Counting is deterministic arithmetic rather than a real vocabulary, so tests need no vocab
files, but it has Claude's shape: a fixed framing cost per request, per message and for the
system prompt, on top of the text's pieces. A text's cost is therefore only recoverable by
subtracting a measured baseline, which is what the client under test must do.

``AnthropicServer(counting="bytes")`` counts with a tokenizer unlike any local one instead:
``ceil(UTF-8 bytes / 3.3)`` per text plus framing per request, message, block, tool, image
and document (``bytes_expected_tokens``), and accepts the richer block types (images,
documents, tool use/results, thinking) and ``tools``. A client that fits Claude payloads must
then learn how the server counts instead of working by coincidence.

>>> pieces("Hello, world!")
4
>>> expected_tokens(None, [{"role": "user", "content": "Hello, world!"}])
11
>>> turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
>>> expected_tokens("Be brief.", turns)
18
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PATH = "/v1/messages/count_tokens"

REQUEST_OVERHEAD = 3
MESSAGE_OVERHEAD = 4
SYSTEM_OVERHEAD = 2

# Top-level fields the SDK may send to count_tokens; anything else is rejected like the API does.
KNOWN_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "cache_control",
        "output_config",
        "speed",
        "mcp_servers",
        "context_management",
    }
)

DEFAULT_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "api_error",
    529: "overloaded_error",
}

# "bytes" counting mode: unlike any BPE, and framing costs unlike the "pieces" mode.
BYTES_PER_TOKEN = 3.3
B_REQUEST = 7
B_MESSAGE = 5
B_SYSTEM = 3
B_BLOCK = 1  # each content block of a block list, on top of its own cost
B_TOOLS_PROMPT = 290  # the hidden tool-use system prompt, once when `tools` is present
B_TOOL = 11
B_IMAGE = 1100  # flat per image block (the real API uses the patch grid)
B_PDF = 1900  # flat per base64 PDF document
B_DOCUMENT = 9
B_TOOL_USE = 8
B_TOOL_RESULT = 6
RICH_BLOCKS = frozenset(
    {"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking"}
)

_PIECE = re.compile(r"\w+|[^\w\s]")


def pieces(text: str) -> int:
    """Number of word / punctuation pieces: the fake tokenizer's token count for a text."""
    return len(_PIECE.findall(text))


# Fake costs of the non-text blocks: fixed, so a test can tell the server counted each block.
IMAGE_TOKENS = 1000
DOCUMENT_TOKENS = 1500
TOOL_USE_OVERHEAD = 5
TOOL_RESULT_OVERHEAD = 3
TOOLS_OVERHEAD = 300
"""The hidden tool-use system prompt Claude adds whenever `tools` is present."""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(block["text"] for block in content if block.get("type") == "text")


def content_tokens(content: Any) -> int:
    """Tokens of a message's content: text pieces plus each block's fixed fake cost."""
    if isinstance(content, str):
        return pieces(content)
    n = 0
    for block in content:
        kind = block.get("type")
        if kind == "text":
            n += pieces(block["text"])
        elif kind == "image":
            n += IMAGE_TOKENS
        elif kind == "document":
            n += DOCUMENT_TOKENS + pieces(block.get("title") or "")
        elif kind == "tool_use":
            n += TOOL_USE_OVERHEAD + pieces(block["name"]) + pieces(json.dumps(block["input"]))
        elif kind == "tool_result":
            n += TOOL_RESULT_OVERHEAD + content_tokens(block.get("content") or "")
    return n


def expected_tokens(
    system: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> int:
    """What the server answers for a valid request (system: None, a string or text blocks)."""
    n = REQUEST_OVERHEAD
    if system is not None:
        n += SYSTEM_OVERHEAD + pieces(_text_of(system))
    for m in messages:
        n += MESSAGE_OVERHEAD + content_tokens(m["content"])
    if tools:
        n += TOOLS_OVERHEAD + sum(pieces(json.dumps(t)) for t in tools)
    return n


def byte_tokens(text: str) -> int:
    """The "bytes" mode's count of one text.

    >>> byte_tokens("Hello, world!")
    4
    """
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN) if text else 0


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _block_tokens(block: dict[str, Any]) -> int:
    kind = block["type"]
    if kind == "text":
        return byte_tokens(block["text"])
    if kind == "image":
        return B_IMAGE
    if kind == "document":
        source = block["source"]
        body = byte_tokens(source["data"]) if source["type"] == "text" else B_PDF
        return B_DOCUMENT + body + byte_tokens(block.get("title") or "")
    if kind == "tool_use":
        return B_TOOL_USE + byte_tokens(block["name"]) + byte_tokens(_json(block["input"]))
    if kind == "tool_result":
        return B_TOOL_RESULT + _content_tokens(block.get("content") or "")
    if kind == "thinking":
        return byte_tokens(block["thinking"])
    return 0  # redacted_thinking


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return byte_tokens(content)
    return sum(B_BLOCK + _block_tokens(b) for b in content)


def bytes_expected_tokens(body: dict[str, Any]) -> int:
    """What a ``counting="bytes"`` server answers for a valid count_tokens body.

    >>> bytes_expected_tokens({"messages": [{"role": "user", "content": "Hello, world!"}]})
    16
    """
    n = B_REQUEST
    if body.get("system") is not None:
        n += B_SYSTEM + _content_tokens(body["system"])
    for m in body["messages"]:
        n += B_MESSAGE + _content_tokens(m["content"])
    tools = body.get("tools") or []
    if tools:
        n += B_TOOLS_PROMPT
    for t in tools:
        n += B_TOOL + byte_tokens(t["name"]) + byte_tokens(t.get("description") or "")
        n += byte_tokens(_json(t.get("input_schema") or {}))
    return n


class ApiError(Exception):
    """An error answer, in Anthropic's shape."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or DEFAULT_ERROR_TYPES.get(status, "api_error")


def _check_text(where: str, text: Any) -> None:
    if not isinstance(text, str):
        raise ApiError(400, f"{where}: Input should be a valid string")
    if not text:
        raise ApiError(400, f"{where}: text content blocks must be non-empty")
    if not text.strip():
        raise ApiError(400, f"{where}: text content blocks must contain non-whitespace text")


def _check_content(where: str, content: Any) -> None:
    if isinstance(content, str):
        _check_text(where, content)
        return
    if not isinstance(content, list) or not content:
        raise ApiError(400, f"{where}: Input should be a non-empty string or list of blocks")
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in _BLOCKS:
            raise ApiError(400, f"{where}.{i}.type: {kind!r} blocks are not supported here")
        if kind == "text":
            _check_text(f"{where}.{i}.text", block.get("text"))
        elif kind in ("image", "document") and block["source"].get("type") not in (
            "base64",
            "text",
        ):
            # count_tokens refuses url and file sources (send base64)
            raise ApiError(400, f"{where}.{i}.source: count_tokens takes base64 sources only")
        elif kind == "tool_result" and block.get("content") is not None:
            _check_content(f"{where}.{i}.content", block["content"])


_BLOCKS = frozenset({"text", "image", "document", "tool_use", "tool_result"})


def _check_rich_content(where: str, content: Any) -> None:
    if isinstance(content, str):
        _check_text(where, content)
        return
    if not isinstance(content, list) or not content:
        raise ApiError(400, f"{where}: Input should be a non-empty string or list of blocks")
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in RICH_BLOCKS:
            raise ApiError(400, f"{where}.{i}.type: unknown block type {kind!r}")
        assert isinstance(block, dict)
        if kind == "text":
            _check_text(f"{where}.{i}.text", block.get("text"))
        elif kind in ("image", "document"):
            source = block.get("source")
            if not isinstance(source, dict) or source.get("type") not in ("base64", "text"):
                raise ApiError(400, f"{where}.{i}.source: count_tokens needs a base64 source")
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input"), dict):
                raise ApiError(400, f"{where}.{i}: tool_use needs name and input")
        elif kind == "tool_result":
            if block.get("content") not in (None, ""):
                _check_rich_content(f"{where}.{i}.content", block["content"])
        elif kind == "thinking" and not isinstance(block.get("thinking"), str):
            raise ApiError(400, f"{where}.{i}.thinking: Input should be a valid string")


def validate(body: Any, *, rich: bool = False) -> None:
    """Raise ApiError the way the API would for a malformed count_tokens body.

    ``rich`` accepts every block type the "bytes" mode counts, and ``tools``."""
    check = _check_rich_content if rich else _check_content
    if not isinstance(body, dict):
        raise ApiError(400, "body: Input should be a valid dictionary")
    for key in body:
        if key not in KNOWN_FIELDS:
            raise ApiError(400, f"{key}: Extra inputs are not permitted")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError(400, "messages: Field required")
    if not messages:
        raise ApiError(400, "messages: at least one message is required")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages.{i}: Input should be a valid dictionary")
        if m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        check(f"messages.{i}.content", m.get("content"))
    if "system" in body:
        check("system", body["system"])
        if isinstance(body["system"], list) and any(b["type"] != "text" for b in body["system"]):
            raise ApiError(400, "system: only text blocks")
    tools = body.get("tools")
    if (
        rich
        and tools is not None
        and (
            not isinstance(tools, list)
            or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools)
        )
    ):
        raise ApiError(400, "tools: each tool needs a name")
    if model.startswith("claude-nope"):
        raise ApiError(404, f"model: {model}", "not_found_error")


@dataclass(frozen=True)
class Fault:
    """One scripted answer; build with the class methods."""

    kind: str
    code: int = 0  # HTTP status of a "status" fault
    error_type: str | None = None
    message: str | None = None
    retry_after: float | None = None
    retry_after_ms: float | None = None
    should_retry: bool | None = None
    seconds: float = 0.0

    @classmethod
    def status(
        cls,
        status: int,
        *,
        error_type: str | None = None,
        message: str | None = None,
        retry_after: float | None = None,
        retry_after_ms: float | None = None,
        should_retry: bool | None = None,
    ) -> Fault:
        """An error answer; ``retry_after`` / ``retry_after_ms`` set those headers."""
        return cls("status", status, error_type, message, retry_after, retry_after_ms, should_retry)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Sleep, then answer normally: longer than the client timeout means a timeout."""
        return cls("delay", seconds=seconds)

    @classmethod
    def disconnect(cls) -> Fault:
        """Close the connection without answering: a connection error for the client."""
        return cls("disconnect")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, or None when the body was not JSON
    fault: Fault | None = field(default=None)


class AnthropicServer:
    """``with AnthropicServer() as srv:`` serves on 127.0.0.1:<random port> until exit."""

    def __init__(self, *, latency: float = 0.0, counting: str = "pieces") -> None:
        if counting not in ("pieces", "bytes"):
            raise ValueError("counting must be 'pieces' or 'bytes'")
        self.latency = latency
        """Seconds every normal answer waits first, so concurrent requests overlap."""
        self.counting = counting
        """"pieces" (default: word/punctuation pieces) or "bytes" (see bytes_expected_tokens)."""
        self.calls = 0
        """count_tokens requests received (faulted ones included); reset() zeroes it."""
        self._lock = threading.Lock()
        self._script: collections.deque[Fault] = collections.deque()
        self._requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        self._in_flight = 0
        self.max_in_flight = 0
        self._closing = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self._hold_after: int | None = None
        self._held = 0
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every request received so far, faulted ones included."""
        with self._lock:
            return list(self._requests)

    @property
    def pending(self) -> int:
        """Scripted faults not yet consumed."""
        with self._lock:
            return len(self._script)

    def script(self, *faults: Fault) -> None:
        """Queue answers for the next requests, in order."""
        with self._lock:
            self._script.extend(faults)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self.max_in_flight = 0
            self.calls = 0

    def hold(self, *, after: int = 0) -> None:
        """Answer the next ``after`` count_tokens requests as usual, then keep every later one
        waiting until ``release()``: a test can then know that its client has requests in
        flight, instead of hoping a latency makes it so."""
        with self._lock:
            self._hold_after = self.calls + after
            self._gate.clear()

    def release(self) -> None:
        """Let held requests (and later ones) be answered."""
        with self._lock:
            self._hold_after = None
            self._gate.set()

    @property
    def held(self) -> int:
        """Requests waiting for ``release()`` right now."""
        with self._lock:
            return self._held

    def start(self) -> AnthropicServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()  # wakes delayed handlers
        self._gate.set()  # and held ones
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> AnthropicServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- called from handler threads --------------------------------------------------------

    def _receive(self, record: RecordedRequest) -> tuple[Fault | None, str, bool]:
        with self._lock:
            fault = self._script.popleft() if self._script else None
            self._requests.append(
                RecordedRequest(record.method, record.path, record.headers, record.body, fault)
            )
            self._in_flight += 1
            if record.path == PATH:
                self.calls += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            held = (
                record.path == PATH
                and self._hold_after is not None
                and self.calls > self._hold_after
            )
            return fault, f"req_test_{next(self._ids):06d}", held

    def _wait_gate(self) -> None:
        """Block a normal answer that came in under a hold until ``release()``."""
        with self._lock:
            self._held += 1
        try:
            self._gate.wait()
        finally:
            with self._lock:
                self._held -= 1

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def count(self, body: dict[str, Any]) -> int:
        """The answer for a valid body under this server's counting mode."""
        if self.counting == "bytes":
            return bytes_expected_tokens(body)
        return expected_tokens(body.get("system"), body["messages"], body.get("tools"))

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._closing.wait(seconds)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a client's idle keep-alive connection must not hold up close()
    owner: AnthropicServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out hang up mid-answer; that is the point of the test


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    timeout = 10  # idle keep-alive connections end on their own
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        owner = self.server.owner
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in self.headers.items()}
        fault, request_id, held = owner._receive(
            RecordedRequest(self.command, self.path, headers, body)
        )
        try:
            if held and fault is None:
                owner._wait_gate()
            self._answer(owner, fault, request_id, headers, raw, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            owner._done()

    def _answer(
        self,
        owner: AnthropicServer,
        fault: Fault | None,
        request_id: str,
        headers: dict[str, str],
        raw: bytes,
        body: Any,
    ) -> None:
        if fault is not None and fault.kind == "disconnect":
            self.close_connection = True
            return
        if fault is not None and fault.kind == "status":
            extra: dict[str, str] = {}
            if fault.retry_after is not None:
                extra["retry-after"] = f"{fault.retry_after:g}"
            if fault.retry_after_ms is not None:
                extra["retry-after-ms"] = f"{fault.retry_after_ms:g}"
            if fault.should_retry is not None:
                extra["x-should-retry"] = "true" if fault.should_retry else "false"
            err = ApiError(fault.code, fault.message or "scripted fault", fault.error_type)
            self._send_error(err, request_id, extra)
            return
        owner._sleep(fault.seconds if fault is not None else owner.latency)
        try:
            if self.command != "POST" or self.path != PATH:
                raise ApiError(404, f"Not found: {self.command} {self.path}", "not_found_error")
            if not headers.get("x-api-key") and not headers.get("authorization", "").startswith(
                "Bearer "
            ):
                raise ApiError(401, "x-api-key header is required")
            if not headers.get("anthropic-version"):
                raise ApiError(400, "anthropic-version: header is required")
            if body is None:
                raise ApiError(
                    400,
                    "There was an error parsing the body: expected JSON"
                    if raw
                    else "body: Field required",
                )
            validate(body, rich=owner.counting == "bytes")
            tokens = owner.count(body)
        except ApiError as err:
            self._send_error(err, request_id, {})
            return
        self._send(200, {"input_tokens": tokens}, request_id, {})

    def _send_error(self, err: ApiError, request_id: str, extra: dict[str, str]) -> None:
        payload = {"type": "error", "error": {"type": err.error_type, "message": err.message}}
        self._send(err.status, payload, request_id, extra)

    def _send(self, status: int, payload: Any, request_id: str, extra: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", request_id)
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

"""Bytes -> AssemblyRequest, with the limits that bound the work one request can cause."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from worker.engine.request import AssemblyRequest, Turn
from worker.errors import InvalidRequest, RequestTooLarge
from worker.values import value


@value
class Limits:
    """Counting cost grows with size (and worse than linearly for long unbroken runs of text),
    so every dimension a producer controls is capped."""

    max_request_bytes: int = 4 * 1024 * 1024
    max_history_turns: int = 2_000
    max_chunks: int = 2_000
    max_item_chars: int = 262_144
    """One history turn, chunk, system prompt or query."""


def decode_request(raw: bytes | str, limits: Limits = Limits()) -> AssemblyRequest:
    # an ASCII str is its own byte length (CPython keeps the flag: no copy to measure it)
    size = len(raw) if not isinstance(raw, str) or raw.isascii() else len(raw.encode("utf-8"))
    if size > limits.max_request_bytes:
        raise RequestTooLarge(
            f"request is {size} bytes, over the limit of {limits.max_request_bytes}; "
            "send fewer chunks or raise TOKENHEAP_MAX_REQUEST_BYTES"
        )
    try:
        req = AssemblyRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(_summarise(exc)) from None
    req._from_json = True
    _check_roles(req)
    check_limits(req, limits, size)
    return req


_ROLES = frozenset({"user", "assistant", "tool", "system", "developer"})


def _check_roles(req: AssemblyRequest) -> None:
    """A native message's shape is checked against its provider when the request is
    prepared; a role no provider has is refused here, like a plain turn's."""
    for i, turn in enumerate(req.history):
        if isinstance(turn, dict) and turn.get("role") not in _ROLES:
            raise InvalidRequest(
                f"history[{i}].role: Input should be one of {', '.join(sorted(_ROLES))}"
            )


def check_limits(req: AssemblyRequest, limits: Limits, size: int | None = None) -> None:
    """`size`: the UTF-8 bytes of the JSON the request was decoded from, when it was. No
    text in it can have more characters than that (a character is at least one byte, an
    escape more), so a request no bigger than the item limit skips the walk over its texts
    (~11 us of a resent 32 KB conversation's ~0.4 ms, timed alone)."""
    if len(req.history) > limits.max_history_turns:
        raise RequestTooLarge(
            f"{req.request_id}: {len(req.history)} history turns, limit {limits.max_history_turns}"
        )
    if len(req.chunks) > limits.max_chunks:
        raise RequestTooLarge(
            f"{req.request_id}: {len(req.chunks)} chunks, limit {limits.max_chunks}"
        )
    cap = limits.max_item_chars
    if size is not None and size <= cap:
        return
    if _longest(req) <= cap:  # the common case, without building a path per text
        return
    for where, text in _items(req):
        if len(text) > cap:
            raise RequestTooLarge(
                f"{req.request_id}: {where} has {len(text)} characters, limit {cap}; "
                "split it before sending"
            )


def _longest(req: AssemblyRequest) -> int:
    """The longest text of `_items`, measured the same way but without naming the texts
    (plain turns and string fields by `len` in one list: a generator per item cost as
    much as the rest of the decode past pydantic)."""
    lengths = [len(c.text) for c in req.chunks]
    for turn in req.history:
        if type(turn) is Turn:
            lengths.append(len(turn.content))
            continue
        content = turn.get("content") if isinstance(turn, dict) else turn.content
        if isinstance(content, str):
            lengths.append(len(content))
        else:
            lengths.extend(len(t) for _, t in _texts(content))
    for part in (req.system, req.query):
        if isinstance(part, str):
            lengths.append(len(part))
        else:
            lengths.extend(len(t) for _, t in _texts(part))
    return max(lengths, default=0)


def _items(req: AssemblyRequest) -> list[tuple[str, str]]:
    """Every text a producer sends; image and document bytes have their own limits
    (config `image_limits`, `document_rules`), so only text fields are measured here."""
    items = [(f"system{p}", t) for p, t in _texts(req.system)]
    items += [(f"query{p}", t) for p, t in _texts(req.query)]
    for i, turn in enumerate(req.history):
        content = turn.get("content") if isinstance(turn, dict) else turn.content
        items += [(f"history[{i}]{p}", t) for p, t in _texts(content)]
    items += [(f"chunk {c.id!r}", c.text) for c in req.chunks]
    return items


_TEXT_KEYS = ("text", "thinking", "arguments")


def _texts(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, text) of a string, or of the text fields of nested parts / blocks."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, list):
        for k, item in enumerate(value):
            yield from _texts(item, f"{path}[{k}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in _TEXT_KEYS and isinstance(item, str):
                yield f"{path}.{key}", item
            elif key == "content" or key == "function":
                yield from _texts(item, f"{path}.{key}")


def _summarise(exc: ValidationError) -> str:
    """Field paths and pydantic's reason, never the offending values (they may be prompt text)."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        where = _path(err["loc"])  # none for the document itself (JSON that does not parse)
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    more = exc.error_count() - len(parts)
    suffix = f" (+{more} more)" if more > 0 else ""
    return "; ".join(parts) + suffix


def _path(loc: tuple[int | str, ...]) -> str:
    """`history[0].role`: the form the provider rules name a refused part in, so every
    invalid_request message points at its field the same way."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out

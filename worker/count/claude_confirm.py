"""One count_tokens call per final Claude payload: digest-cached, rate-limited, retried.

The fit confirms the payload it is about to emit (``usage.total_tokens`` stays the API's
count, ``exact: true``). A payload whose exact bytes were confirmed before (a retry, a
replayed message, a conversation turn resent unchanged) costs no call: confirmed counts are
kept in a bounded LRU keyed by a digest of the payload's canonical JSON.

Calls go through the worker's shared ``RateLimiter``; the SDK's own retries are switched off
for them (``max_retries=0``) because an SDK retry would bypass the limiter and turn a burst
into a 429 storm. Retries are done here instead: 429 through the limiter (which honours
``retry-after``; up to ``rate_limit_attempts``), 408/409/5xx/connection errors/timeouts with
exponential backoff (up to ``attempts``); ``deadline_s`` bounds the whole count.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anthropic
from xxhash import xxh3_128_digest

from worker.count.cache import CountCache
from worker.count.limiter import RateLimiter, Throttled
from worker.errors import (
    CountingUnavailable,
    InvalidRequest,
    RequestTooLarge,
    TokenheapError,
    UnknownModel,
)

Payload = Mapping[str, Any]
"""A count_tokens body: ``model``, ``messages`` and optionally ``system``, ``tools``,
``tool_choice``, ``thinking``... exactly as it will be sent to messages.create."""

# Fields of a Messages request that count_tokens does not take (PAYLOADS.md 2.1).
_NOT_COUNTED = frozenset({"max_tokens", "stream", "temperature", "top_p", "top_k", "metadata"})
_NAMESPACE = "anthropic-payload"


def count_body(payload: Payload) -> dict[str, Any]:
    """The part of a request that count_tokens takes (and that decides the count)."""
    return {k: v for k, v in payload.items() if k not in _NOT_COUNTED and v is not None}


def payload_digest(payload: Payload) -> bytes:
    """16-byte digest of the payload's canonical JSON (compact separators, UTF-8).

    Key order is kept, not sorted: it is part of the bytes the API tokenizes (a tool_use
    ``input`` with its keys reordered is a different text), so only identical payloads share
    a digest.
    """
    text = json.dumps(count_body(payload), ensure_ascii=False, separators=(",", ":"))
    return xxh3_128_digest(text.encode("utf-8", "surrogatepass"))


class ConfirmedCounts:
    """Bounded LRU of confirmed payload counts; thread-safe (a ``CountCache`` underneath)."""

    def __init__(self, max_bytes: int = 8 * 1024 * 1024) -> None:
        self._cache = CountCache(max_bytes)

    def get(self, payload: Payload) -> int | None:
        return self.get_digest(payload_digest(payload))

    def put(self, payload: Payload, tokens: int) -> None:
        self.put_digest(payload_digest(payload), tokens)

    def get_digest(self, key: bytes) -> int | None:
        return self._cache.get(_NAMESPACE, key)

    def put_digest(self, key: bytes, tokens: int) -> None:
        self._cache.put(_NAMESPACE, key, tokens)

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The server's requested wait: ``retry-after-ms``, else ``retry-after`` (seconds or an
    HTTP date); None when absent or unparsable.

    >>> retry_after_s({"retry-after": "7"})
    7.0
    >>> retry_after_s({"retry-after-ms": "250", "retry-after": "7"})
    0.25
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def classify_anthropic(exc: Exception) -> Throttled | None:
    """The limiter's view of an SDK error: a 429 and its retry-after, else None."""
    if isinstance(exc, anthropic.APIStatusError) and exc.status_code == 429:
        return Throttled(retry_after_s(exc.response.headers))
    return None


def _transient(exc: Exception) -> bool:
    if isinstance(exc, anthropic.APIConnectionError | TimeoutError):  # timeouts included
        return True
    return isinstance(exc, anthropic.APIStatusError) and (
        exc.status_code in (408, 409) or exc.status_code >= 500
    )


class PayloadConfirmer:
    """``await confirmer.count(payload)``: the API's count of a whole payload.

    Counters for telemetry (plain attributes): ``calls`` (HTTP attempts), ``cache_hits``,
    ``failures`` (counts that raised); ``throttled`` and ``limiter_wait_s`` read the
    limiter's 429s and waits.
    """

    def __init__(
        self,
        client: anthropic.AsyncAnthropic,
        limiter: RateLimiter,
        *,
        cache: ConfirmedCounts | None = None,
        attempts: int = 3,
        rate_limit_attempts: int = 4,
        backoff_s: float = 0.5,
        deadline_s: float | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client.with_options(max_retries=0)
        self._limiter = limiter
        self.cache = cache or ConfirmedCounts()
        self._attempts = max(1, attempts)
        self._rate_limit_attempts = max(1, rate_limit_attempts)
        self._backoff_s = backoff_s
        self._deadline_s = deadline_s
        self._sleep = sleep
        self._inflight: dict[bytes, asyncio.Future[int]] = {}
        self.calls = 0
        self.cache_hits = 0
        self.failures = 0

    @property
    def limiter(self) -> RateLimiter:
        return self._limiter

    @property
    def throttled(self) -> int:
        """429 answers seen (the limiter's count; retried ones included)."""
        return self._limiter.throttled

    @property
    def limiter_wait_s(self) -> float:
        """Seconds callers spent waiting for a rate-limiter slot, in all."""
        return self._limiter.total_wait_s

    async def aclose(self) -> None:
        """Close the HTTP client; the confirmer is unusable afterwards."""
        await self._client.close()

    async def count(self, payload: Payload) -> int:
        """The confirmed count; identical payloads in flight at once share one call."""
        key = payload_digest(payload)
        cached = self.cache.get_digest(key)
        if cached is not None:
            self.cache_hits += 1
            return cached
        inflight = self._inflight.get(key)
        if inflight is not None:
            self.cache_hits += 1
            return await asyncio.shield(inflight)
        task = asyncio.ensure_future(self._count_new(payload, key))
        self._inflight[key] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._inflight.pop(key, None)
            else:  # this caller was cancelled: the call goes on for the others
                task.add_done_callback(lambda _t: self._inflight.pop(key, None))

    async def _count_new(self, payload: Payload, key: bytes) -> int:
        model = str(payload.get("model") or "")
        try:
            if self._deadline_s is None:
                tokens = await self._count_with_retries(payload)
            else:
                async with asyncio.timeout(self._deadline_s):
                    tokens = await self._count_with_retries(payload)
        except (anthropic.APIError, TimeoutError) as exc:
            self.failures += 1
            raise _translate(exc, model, self._attempts) from exc
        self.cache.put_digest(key, tokens)
        return tokens

    async def _count_with_retries(self, payload: Payload) -> int:
        body = count_body(payload)

        async def once() -> int:
            self.calls += 1
            result = await self._client.messages.count_tokens(**body)
            return result.input_tokens

        for attempt in range(self._attempts):
            try:
                return await self._limiter.run(
                    once, classify=classify_anthropic, attempts=self._rate_limit_attempts
                )
            except (anthropic.APIError, TimeoutError) as exc:
                if attempt == self._attempts - 1 or not _transient(exc):
                    raise
                await self._sleep(self._backoff_s * 2.0**attempt)
        raise AssertionError("unreachable")  # pragma: no cover


def _translate(exc: Exception, model: str, attempts: int) -> TokenheapError:
    """Onto the tokenheap error tree, without prompt content in the message."""
    if isinstance(exc, TimeoutError):
        return CountingUnavailable(f"count API for model {model!r} missed its deadline")
    if isinstance(exc, anthropic.APITimeoutError | anthropic.APIConnectionError):
        return CountingUnavailable(
            f"count API for model {model!r} unreachable or timing out after {attempts} "
            "attempt(s); retry later"
        )
    if not isinstance(exc, anthropic.APIStatusError):
        return CountingUnavailable(f"count API for model {model!r} failed ({type(exc).__name__})")
    status, kind = exc.status_code, exc.type or "unknown"
    where = f"model {model!r}: HTTP {status} {kind} (request-id {exc.request_id or 'none'})"
    mentions_model = "model" in (exc.api_message or "").lower()
    if status in (400, 404) and mentions_model:
        return UnknownModel(f"count API does not know {where}")
    if status == 400:
        return InvalidRequest(f"count API rejected the request, {where}")
    if status == 413:
        return RequestTooLarge(f"count API says the request is too large, {where}")
    if status == 429:
        return CountingUnavailable(f"count API still rate-limited, {where}; retry later")
    return CountingUnavailable(f"count API failing, {where}; retry later")

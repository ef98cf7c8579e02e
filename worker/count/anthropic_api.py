"""Exact Claude token counts of single texts from Anthropic's count_tokens endpoint.

The engine no longer counts pieces this way (it counts each final payload once:
``claude_confirm.PayloadConfirmer``); this client is the old design, kept for
``benchmarks/claude_count_bench.py`` to compare against, and for callers that need a
per-text count.

Claude's tokenizer is not public, so the only exact count is the API's. It counts whole
requests, framing included, so the cost of one text is its one-message count minus a per-model
baseline (a one-token message's count less that token). Counts are cached per model by content
digest: a conversation resent every turn pays only for what is new.

Retries are the SDK's own (``make_client`` sets how many and the per-attempt timeout): it
retries 408, 409, 429, 5xx (529 included) and connection errors, honours ``retry-after-ms`` /
``retry-after``, and otherwise backs off exponentially. What still fails after that is mapped
onto the tokenheap error tree here, without prompt content in any message.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import anthropic
from anthropic.types import AssistantMessageParam, MessageParam, UserMessageParam

from worker.count.cache import CountCache, digest
from worker.errors import (
    CountingUnavailable,
    InvalidRequest,
    RequestTooLarge,
    TokenheapError,
    UnknownModel,
)

# One token under any tokenizer: the baseline probe, and the anchor for whitespace-only texts.
_PROBE = "a"
_MENTIONS_MODEL = re.compile(r"\bmodel\b", re.IGNORECASE)
_T = TypeVar("_T")


def make_client(
    api_key: str | None, base_url: str | None, timeout_s: float, max_retries: int
) -> anthropic.AsyncAnthropic:
    """The client the counter expects: bounded per-attempt timeout and SDK-level retries.

    ``api_key=None`` lets the SDK resolve credentials from its environment / profile chain.
    """
    return anthropic.AsyncAnthropic(
        api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=max_retries
    )


class AnthropicCounter:
    """Token costs of texts under a Claude model, via the count API, cached and deduplicated.

    ``calls`` counts count_tokens calls made (SDK retries inside a call are not counted);
    ``failures`` counts calls that ended in an error.

    ``deadline_s`` bounds one call including the SDK's retries and waits. The SDK obeys any
    positive ``retry-after`` (capped only at ~49 days), so without it a server asking for a
    long wait stalls the caller that long.
    """

    def __init__(
        self,
        client: anthropic.AsyncAnthropic,
        *,
        cache: CountCache,
        max_concurrency: int = 8,
        deadline_s: float | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self._client = client
        self._cache = cache
        self._deadline_s = deadline_s
        self._sem = asyncio.Semaphore(max_concurrency)
        self._overheads: dict[str, int] = {}
        self._inflight: dict[tuple[str, bytes], asyncio.Future[int]] = {}
        self._overhead_locks: dict[str, asyncio.Lock] = {}
        self.calls = 0
        self.failures = 0

    @staticmethod
    def namespace(model: str) -> str:
        """Cache namespace: the same text has different counts under different models."""
        return f"anthropic:{model}"

    async def count_texts(self, model: str, texts: Sequence[str]) -> list[int]:
        """Token cost of each text as the content of one user message, in input order.

        Distinct texts are counted once, cached ones not at all; API calls run concurrently up
        to ``max_concurrency``. Each count is cached as soon as it arrives, so a retry after a
        partial failure pays only for what is still missing.
        """
        ns = self.namespace(model)
        keys = [digest(t) for t in texts]
        unique = dict(zip(keys, texts, strict=True))
        known = dict(zip(unique, self._cache.get_many(ns, unique), strict=True))
        todo = [(k, unique[k]) for k, v in known.items() if v is None]
        if todo:
            costs = await _gather([self._count_and_cache(model, ns, k, t) for k, t in todo])
            known.update(zip((k for k, _ in todo), costs, strict=True))
        return [known[k] or 0 for k in keys]

    async def aclose(self) -> None:
        """Close the HTTP client; the counter is unusable afterwards."""
        await self._client.close()

    async def count_payload(
        self,
        model: str,
        system: str | list[dict[str, Any]] | None,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: dict[str, Any] | None = None,
    ) -> int:
        """Whole-request count of the final payload (native blocks, system blocks, tools), to
        confirm the fit; never cached."""
        params = [_to_param(i, m) for i, m in enumerate(messages)]
        return await self._count_raw(model, system, params, tools, tool_choice)

    async def _count_and_cache(self, model: str, ns: str, key: bytes, text: str) -> int:
        """One API call per distinct text even when concurrent requests miss it together:
        later callers await the first caller's call instead of making their own."""
        inflight = self._inflight.get((ns, key))
        if inflight is not None:
            return await asyncio.shield(inflight)
        task = asyncio.ensure_future(self._text_cost(model, text))
        self._inflight[(ns, key)] = task
        try:
            cost = await asyncio.shield(task)
        finally:
            self._inflight.pop((ns, key), None)
        self._cache.put(ns, key, cost)
        return cost

    async def _text_cost(self, model: str, text: str) -> int:
        if not text:
            return 0
        overhead = await self._overhead(model)
        if text.strip():
            raw = await self._count_raw(model, None, [{"role": "user", "content": text}])
            return max(0, raw - overhead)
        # The API rejects whitespace-only content: count it anchored to the probe, minus the probe.
        raw = await self._count_raw(model, None, [{"role": "user", "content": text + _PROBE}])
        return max(0, raw - overhead - 1)

    async def _overhead(self, model: str) -> int:
        """Framing tokens of a one-user-message request; measured once per model."""
        if model in self._overheads:
            return self._overheads[model]
        lock = self._overhead_locks.setdefault(model, asyncio.Lock())
        async with lock:
            if model not in self._overheads:
                raw = await self._count_raw(model, None, [{"role": "user", "content": _PROBE}])
                self._overheads[model] = max(0, raw - 1)
            return self._overheads[model]

    async def _count_raw(
        self,
        model: str,
        system: str | list[dict[str, Any]] | None,
        messages: list[MessageParam],
        tools: list[dict[str, Any]] | None = None,
        tool_choice: dict[str, Any] | None = None,
    ) -> int:
        async with self._sem:
            self.calls += 1
            try:
                call = self._client.messages.count_tokens(
                    model=model,
                    messages=messages,
                    system=anthropic.omit if system is None else system,  # type: ignore[arg-type]
                    tools=anthropic.omit if tools is None else tools,  # type: ignore[arg-type]
                    tool_choice=anthropic.omit if tool_choice is None else tool_choice,  # type: ignore[arg-type]
                )
                if self._deadline_s is None:
                    result = await call
                else:
                    async with asyncio.timeout(self._deadline_s):
                        result = await call
            except (anthropic.APIError, TimeoutError) as exc:
                self.failures += 1
                raise self._translate(exc, model) from exc
            return result.input_tokens

    def _translate(self, exc: Exception, model: str) -> TokenheapError:
        attempts = self._client.max_retries + 1
        if isinstance(exc, TimeoutError):
            return CountingUnavailable(
                f"count API for model {model!r} did not finish within deadline_s="
                f"{self._deadline_s:g} (retries included); retry later or raise the deadline"
            )
        if isinstance(exc, anthropic.APITimeoutError):
            return CountingUnavailable(
                f"count API for model {model!r} timed out on all {attempts} attempt(s) "
                f"(timeout {self._client.timeout}); retry later or raise the timeout"
            )
        if isinstance(exc, anthropic.APIConnectionError):
            return CountingUnavailable(
                f"count API at {self._client.base_url} unreachable after {attempts} attempt(s); "
                "check network / base_url and retry later"
            )
        if not isinstance(exc, anthropic.APIStatusError):
            return CountingUnavailable(
                f"count API for model {model!r} gave an unusable answer "
                f"({type(exc).__name__}); retry later"
            )
        status, kind, rid = exc.status_code, exc.type or "unknown", exc.request_id or "none"
        where = f"model {model!r}: HTTP {status} {kind} (request-id {rid})"
        mentions_model = bool(exc.api_message and _MENTIONS_MODEL.search(exc.api_message))
        if status == 404 and mentions_model:
            return UnknownModel(f"count API does not know {where}; use a model it lists")
        if status == 400:
            if mentions_model:
                return UnknownModel(f"count API rejected the model, {where}")
            return InvalidRequest(f"count API rejected the request, {where}")
        if status == 413:
            return RequestTooLarge(f"count API says the request is too large, {where}")
        if status in (401, 403):
            return CountingUnavailable(
                f"count API refused the credentials, {where}; fix the API key, then retry"
            )
        if status == 404:
            return CountingUnavailable(
                f"count API endpoint not found, {where}; check base_url, then retry"
            )
        if status == 429:
            return CountingUnavailable(
                f"count API still rate-limited after {attempts} attempt(s), {where}; "
                "retry later or lower max_concurrency"
            )
        if status in (408, 409) or status >= 500:
            return CountingUnavailable(
                f"count API failing after {attempts} attempt(s), {where}; retry later"
            )
        return InvalidRequest(f"count API rejected the request, {where}")


def _to_param(index: int, message: dict[str, Any]) -> MessageParam:
    role = message.get("role")
    content = message.get("content")
    if role not in ("user", "assistant") or not isinstance(content, str | list):
        raise InvalidRequest(f"messages[{index}] needs role user|assistant and content")
    if role == "user":
        return UserMessageParam(role="user", content=content)
    return AssistantMessageParam(role="assistant", content=content)


async def _gather(aws: Sequence[Awaitable[_T]]) -> list[_T]:
    """gather() that cancels the siblings of the first failure instead of leaving them running."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise

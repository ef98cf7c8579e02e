"""AnthropicCounter against the real anthropic SDK talking to a local count_tokens server."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import pytest

from worker.count.anthropic_api import AnthropicCounter, make_client
from worker.count.cache import CountCache
from worker.errors import CountingUnavailable, InvalidRequest, UnknownModel

MODEL = "claude-test-1"
MakeCounter = Callable[..., AnthropicCounter]


@pytest.fixture
async def make_counter(anthropic_server: Any) -> AsyncIterator[MakeCounter]:
    """Builds counters on clients aimed at the local server; closes every client afterwards."""
    clients: list[anthropic.AsyncAnthropic] = []

    def make(
        *,
        timeout_s: float = 5.0,
        max_retries: int = 2,
        max_concurrency: int = 8,
        cache: CountCache | None = None,
        deadline_s: float | None = None,
    ) -> AnthropicCounter:
        client = make_client("sk-test", anthropic_server.base_url, timeout_s, max_retries)
        clients.append(client)
        return AnthropicCounter(
            client,
            cache=cache or CountCache(),
            max_concurrency=max_concurrency,
            deadline_s=deadline_s,
        )

    yield make
    for client in clients:
        await client.close()


def contents(server: Any) -> list[Any]:
    """The single user message content of each count_texts request, in arrival order."""
    out = []
    for r in server.requests:
        (message,) = r.body["messages"]
        assert message["role"] == "user"
        out.append(message["content"])
    return out


async def test_counts_match_server_arithmetic(
    make_counter: MakeCounter, anthropic_server: Any, anthropic_server_module: Any
) -> None:
    texts = ["Hello, world!", "one two three", "ünïcode — dash?"]
    counts = await make_counter().count_texts(MODEL, texts)
    # Hand-counted pieces: framing (request + message overhead) must be subtracted exactly.
    assert counts == [4, 3, 4]
    assert counts == [anthropic_server_module.pieces(t) for t in texts]
    # One baseline probe, then one call per text; every call is a proper SDK request.
    contents_seen = contents(anthropic_server)  # concurrent calls: arrival order varies
    assert contents_seen[0] == "a"  # the baseline probe comes first
    assert sorted(contents_seen[1:]) == sorted(texts)
    for r in anthropic_server.requests:
        assert (r.method, r.path) == ("POST", "/v1/messages/count_tokens")
        assert r.body["model"] == MODEL
        assert "system" not in r.body
        assert r.headers["anthropic-version"]
        assert r.headers["authorization"] == "Bearer sk-test"


async def test_duplicate_texts_are_counted_once(
    make_counter: MakeCounter, anthropic_server: Any
) -> None:
    texts = ["same text here", "other", "same text here", "same text here"]
    assert await make_counter().count_texts(MODEL, texts) == [3, 1, 3, 3]
    assert Counter(contents(anthropic_server)) == {"a": 1, "same text here": 1, "other": 1}


async def test_second_call_is_served_from_cache(
    make_counter: MakeCounter, anthropic_server: Any
) -> None:
    cache = CountCache()
    counter = make_counter(cache=cache)
    first = await counter.count_texts(MODEL, ["alpha beta", "gamma"])
    seen = len(anthropic_server.requests)
    assert await counter.count_texts(MODEL, ["gamma", "alpha beta"]) == first[::-1]
    assert len(anthropic_server.requests) == seen
    assert cache.stats().hits == 2
    # A shared cache serves a fresh counter too, and it needs no baseline for cached texts.
    assert await make_counter(cache=cache).count_texts(MODEL, ["gamma"]) == [1]
    assert len(anthropic_server.requests) == seen
    # Another model is another namespace: counted again, with its own baseline.
    await counter.count_texts("claude-test-2", ["gamma"])
    assert len(anthropic_server.requests) == seen + 2


async def test_baseline_is_measured_once_per_model(
    make_counter: MakeCounter, anthropic_server: Any
) -> None:
    counter = make_counter()
    await asyncio.gather(
        counter.count_texts(MODEL, ["x y"]),
        counter.count_texts(MODEL, ["z"]),
        counter.count_texts(MODEL, ["w v u"]),
    )
    await counter.count_texts(MODEL, ["later text"])
    assert contents(anthropic_server).count("a") == 1
    assert counter.calls == 5
    assert counter.failures == 0


async def test_empty_and_whitespace_texts(make_counter: MakeCounter, anthropic_server: Any) -> None:
    # The API rejects empty / whitespace-only content (the server does too, with a 400).
    assert await make_counter().count_texts(MODEL, ["", "   \n", "word"]) == [0, 0, 1]
    sent = contents(anthropic_server)
    assert "" not in sent
    assert all(c.strip() for c in sent)


async def test_concurrency_is_bounded(make_counter: MakeCounter, anthropic_server: Any) -> None:
    anthropic_server.latency = 0.05
    texts = [f"text number {i}" for i in range(12)]
    assert await make_counter(max_concurrency=3).count_texts(MODEL, texts) == [3] * 12
    assert 2 <= anthropic_server.max_in_flight <= 3


async def test_count_payload_sends_system_and_messages_in_one_call(
    make_counter: MakeCounter, anthropic_server: Any, anthropic_server_module: Any
) -> None:
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "Sure?"},
    ]
    counter = make_counter()
    total = await counter.count_payload(MODEL, "You are terse.", messages)
    # 3 request + (2 + 4) system + (4 + 6) + (4 + 2) + (4 + 2) messages
    assert total == 31 == anthropic_server_module.expected_tokens("You are terse.", messages)
    (request,) = anthropic_server.requests
    assert request.body == {"model": MODEL, "system": "You are terse.", "messages": messages}
    # Not cached: the same payload is counted again.
    assert await counter.count_payload(MODEL, None, messages[:1]) == 3 + 4 + 6
    assert "system" not in anthropic_server.requests[-1].body
    assert len(anthropic_server.requests) == 2


@pytest.mark.parametrize(
    ("headers", "wait"),
    [({"retry_after": 0.3}, 0.3), ({"retry_after_ms": 300, "retry_after": 0.001}, 0.3)],
    ids=["retry-after", "retry-after-ms-wins"],
)
async def test_429_is_retried_after_retry_after(
    make_counter: MakeCounter, anthropic_server: Any, fault: Any, headers: Any, wait: float
) -> None:
    anthropic_server.script(fault.status(429, **headers))
    messages = [{"role": "user", "content": "hi there"}]
    start = time.monotonic()
    assert await make_counter(max_retries=2).count_payload(MODEL, None, messages) == 3 + 4 + 2
    assert time.monotonic() - start >= wait
    first, second = anthropic_server.requests
    assert first.fault is not None and first.fault.code == 429
    assert second.fault is None
    assert first.body == second.body
    retry_counts = [r.headers["x-stainless-retry-count"] for r in (first, second)]
    assert retry_counts == ["0", "1"]


@pytest.mark.parametrize(
    ("status", "retry_after_ms"),
    [(500, 10), (503, 10), (529, 10), (429, 10), (529, None)],
    ids=["500", "503", "529", "429", "529-sdk-backoff"],
)
async def test_persistent_failure_gives_up_after_max_retries(
    make_counter: MakeCounter,
    anthropic_server: Any,
    fault: Any,
    status: int,
    retry_after_ms: float | None,
) -> None:
    max_retries = 2
    # One more fault than attempts: a 4th attempt would get a 5xx, not silently succeed.
    anthropic_server.script(
        *[fault.status(status, retry_after_ms=retry_after_ms)] * (max_retries + 2)
    )
    counter = make_counter(max_retries=max_retries)
    with pytest.raises(CountingUnavailable) as info:
        await counter.count_payload(MODEL, None, [{"role": "user", "content": "hi"}])
    assert len(anthropic_server.requests) == max_retries + 1
    assert anthropic_server.pending == 1
    assert f"HTTP {status}" in str(info.value)
    assert "3 attempt(s)" in str(info.value)
    assert info.value.retriable
    assert (counter.calls, counter.failures) == (1, 1)


async def test_timeout_on_every_attempt(
    make_counter: MakeCounter, anthropic_server: Any, fault: Any
) -> None:
    anthropic_server.script(fault.delay(5), fault.delay(5))
    counter = make_counter(timeout_s=0.2, max_retries=1)
    with pytest.raises(CountingUnavailable, match="timed out") as info:
        await counter.count_payload(MODEL, None, [{"role": "user", "content": "hi"}])
    assert isinstance(info.value.__cause__, anthropic.APITimeoutError)
    assert len(anthropic_server.requests) == 2


async def test_connection_dropped_on_every_attempt(
    make_counter: MakeCounter, anthropic_server: Any, fault: Any
) -> None:
    anthropic_server.script(*[fault.disconnect()] * 2)
    with pytest.raises(CountingUnavailable, match="unreachable"):
        await make_counter(max_retries=1).count_texts(MODEL, ["hi"])
    assert len(anthropic_server.requests) == 2


async def test_deadline_bounds_a_long_retry_after(
    make_counter: MakeCounter, anthropic_server: Any, fault: Any
) -> None:
    # The SDK would sleep the full 60 s before retrying; the deadline cuts that short.
    anthropic_server.script(fault.status(429, retry_after=60))
    counter = make_counter(max_retries=2, deadline_s=0.3)
    with pytest.raises(CountingUnavailable, match="deadline_s"):
        await counter.count_payload(MODEL, None, [{"role": "user", "content": "hi"}])
    assert len(anthropic_server.requests) == 1


async def test_unknown_model_from_404(make_counter: MakeCounter, anthropic_server: Any) -> None:
    counter = make_counter()
    with pytest.raises(UnknownModel, match="claude-nope-9"):
        await counter.count_texts("claude-nope-9", ["hi"])
    with pytest.raises(UnknownModel):
        await counter.count_payload("claude-nope-9", None, [{"role": "user", "content": "hi"}])
    assert len(anthropic_server.requests) == 2  # 404 is not retried
    assert all(r.headers["x-stainless-retry-count"] == "0" for r in anthropic_server.requests)


async def test_unknown_model_from_400_naming_the_model(
    make_counter: MakeCounter, anthropic_server: Any, fault: Any
) -> None:
    anthropic_server.script(fault.status(400, message="model: claude-old is not supported"))
    with pytest.raises(UnknownModel):
        await make_counter().count_texts("claude-old", ["hi"])
    assert len(anthropic_server.requests) == 1


async def test_other_400_is_invalid_request_without_prompt_content(
    make_counter: MakeCounter, anthropic_server: Any, fault: Any
) -> None:
    secret = "hunter2 the launch code"
    # A server that echoes content back must not get it into our error message.
    anthropic_server.script(fault.status(400, message=f"messages.0.content: bad text {secret!r}"))
    counter = make_counter()
    with pytest.raises(InvalidRequest) as info:
        await counter.count_payload(MODEL, "sys", [{"role": "user", "content": secret}])
    assert "hunter2" not in str(info.value)
    assert "request-id req_test_000001" in str(info.value)
    # The server's own validation: whitespace-only content is a 400, never retried.
    with pytest.raises(InvalidRequest):
        await counter.count_payload(MODEL, None, [{"role": "user", "content": "  "}])
    assert len(anthropic_server.requests) == 2


async def test_bad_role_is_rejected_before_any_call(
    make_counter: MakeCounter, anthropic_server: Any
) -> None:
    with pytest.raises(InvalidRequest):
        await make_counter().count_payload(MODEL, None, [{"role": "tool", "content": "x"}])
    assert anthropic_server.requests == []


async def test_counts_that_arrived_survive_a_failure(
    make_counter: MakeCounter, anthropic_server: Any, fault: Any
) -> None:
    # max_concurrency=1 makes the order deterministic: baseline, "first one", "second one".
    anthropic_server.script(fault.delay(0), fault.delay(0), fault.status(400))
    counter = make_counter(max_concurrency=1)
    with pytest.raises(InvalidRequest):
        await counter.count_texts(MODEL, ["first one", "second one"])
    assert await counter.count_texts(MODEL, ["first one", "second one"]) == [2, 2]
    assert contents(anthropic_server) == ["a", "first one", "second one", "second one"]

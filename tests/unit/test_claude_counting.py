"""Claude counting in about one count_tokens call per request (issue 11), end to end.

The real ``anthropic`` SDK talks to the local count_tokens server in its "bytes" mode, a
tokenizer unlike the local o200k estimate, so nothing here works by coincidence.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest

from worker.catalog import load_catalog
from worker.count.cache import CountCache
from worker.count.claude_confirm import ConfirmedCounts, PayloadConfirmer, payload_digest
from worker.count.claude_estimate import (
    ClaudeEstimate,
    Family,
    PayloadEstimator,
    RatioLearner,
    conversation_key,
    load_claude_tokenizers,
    o200k_text_counter,
)
from worker.count.claude_fit import fit_confirmed
from worker.count.limiter import RateLimiter
from worker.count.vocab import encoding
from worker.errors import CountingUnavailable, InvalidRequest

MODELS_YAML = Path(__file__).resolve().parents[2] / "config" / "models.yaml"
MODEL = "claude-sonnet-4-5"
TOKENIZERS = load_claude_tokenizers(MODELS_YAML)


@pytest.fixture
def bytes_server(anthropic_server_module: Any) -> Any:
    with anthropic_server_module.AnthropicServer(counting="bytes") as server:
        yield server


@pytest.fixture
async def make_confirmer(bytes_server: Any) -> AsyncIterator[Callable[..., PayloadConfirmer]]:
    clients: list[anthropic.AsyncAnthropic] = []

    def make(*, timeout_s: float = 5.0, rpm: float = 1e6, **kw: Any) -> PayloadConfirmer:
        client = anthropic.AsyncAnthropic(
            api_key="sk-test", base_url=bytes_server.base_url, timeout=timeout_s
        )
        clients.append(client)
        return PayloadConfirmer(client, RateLimiter(rpm, burst=8), backoff_s=0.01, **kw)

    yield make
    for c in clients:
        await c.close()


RICH: dict[str, Any] = {
    "model": MODEL,
    "system": [{"type": "text", "text": "You are terse."}],
    "tools": [
        {
            "name": "lookup",
            "description": "Find a record by id.",
            "input_schema": {"type": "object", "properties": {"id": {"type": "string"}}},
        }
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in record 7? Über-größe façade."},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"},
                },
                {
                    "type": "document",
                    "source": {"type": "text", "media_type": "text/plain", "data": "A plain doc."},
                    "title": "notes",
                },
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "tu_1", "name": "lookup", "input": {"id": "7"}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "tu_1", "content": "a teapot"}],
        },
    ],
    "max_tokens": 1024,  # a Messages field count_tokens does not take: dropped before sending
}


# -- config -----------------------------------------------------------------------------------


def test_every_claude_row_names_a_known_family() -> None:
    catalog = load_catalog()
    rows = [m for m in catalog.models.values() if m.provider == "anthropic"]
    assert rows
    for row in rows:
        assert TOKENIZERS.family(row.tokenizer_family) in TOKENIZERS.families
    fams = TOKENIZERS.families
    # Anthropic: the 4.7+ tokenizer produces ~30% more tokens for the same text.
    assert fams["claude-v4.7"].prior_ratio > 1.2 * fams["claude-v3"].prior_ratio


# -- the estimate -----------------------------------------------------------------------------


def test_estimate_counts_every_text_with_o200k_and_fixed_costs_apart() -> None:
    f = TOKENIZERS.families["claude-v3"].framing
    est = PayloadEstimator(f, o200k_text_counter())
    enc = encoding("o200k_base")
    plain = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there, world."}]}
    base = est.estimate(plain)
    assert base.text == len(enc.encode_ordinary("Hello there, world."))
    with_image = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Hello there, world."},
                    {"type": "image", "source": {"type": "base64", "data": "x"}},
                ],
            }
        ],
    }
    img = est.estimate(with_image)
    assert img.text == base.text  # an image is a fixed cost, never scaled by the ratio
    assert img.fixed - base.fixed == f.per_image + 2 * f.per_block
    with_tools = {**plain, "tools": RICH["tools"] * 2}
    tools = est.estimate(with_tools)
    assert tools.fixed - base.fixed == f.tools_prompt + 2 * f.per_tool  # prompt counted once
    assert tools.text > base.text


def test_cached_o200k_counter_agrees_and_hits() -> None:
    cache = CountCache(1 << 20)
    cached, plain = o200k_text_counter(cache), o200k_text_counter()
    texts = ["alpha beta", "γάμμα δέλτα", "alpha beta", "def f(x): return x"]
    assert cached(texts) == plain(texts)
    hits = cache.hits
    assert cached(texts) == plain(texts)
    assert cache.hits == hits + len(texts)


# -- the learner ------------------------------------------------------------------------------


PRIOR = {"f": Family(prior_ratio=1.0, prior_margin=0.2)}


def test_learner_uses_the_prior_with_a_margin_until_it_has_seen_enough() -> None:
    learner = RatioLearner(PRIOR, min_samples=5)
    assert learner.safe_ratio("f") == pytest.approx(1.2)
    learner.observe("f", ClaudeEstimate(1000, 10), 1510)  # ratio 1.5, above the cold guess
    assert learner.safe_ratio("f") == pytest.approx(1.5)
    assert learner.observe("f", ClaudeEstimate(10, 10), 500) is None  # too little text


def test_learner_is_bounded_follows_a_shift_and_its_margin_covers_the_spread() -> None:
    rng = random.Random(3)
    learner = RatioLearner(PRIOR, window=100, quantile=0.9)
    for _ in range(1000):
        learner.observe("f", ClaudeEstimate(1000, 0), round(1000 * rng.uniform(1.2, 1.3)))
    for _ in range(100):  # the API's tokenizer changed: ratios are ~1.6 from now on
        learner.observe("f", ClaudeEstimate(1000, 0), round(1000 * rng.uniform(1.55, 1.65)))
    stats = learner.stats("f")
    assert stats.samples == 100
    assert 1.55 <= stats.ratio <= 1.65
    assert stats.ratio < stats.safe_ratio <= 1.65


def test_learner_is_thread_safe_and_bounds_families() -> None:
    learner = RatioLearner(
        {f"f{i}": Family(prior_ratio=1.0) for i in range(10)}, window=50, max_families=4
    )

    def work(fam: str) -> None:
        for i in range(500):
            learner.observe(fam, ClaudeEstimate(1000, 0), 1000 + i % 7)

    threads = [threading.Thread(target=work, args=(f"f{i % 2}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert learner.stats("f0").samples == learner.stats("f1").samples == 50
    for i in range(2, 10):
        learner.observe(f"f{i}", ClaudeEstimate(1000, 0), 1000)
    assert learner.stats("f0").samples == 0  # evicted: back on the prior


# -- the digest cache -------------------------------------------------------------------------


def test_digest_is_of_the_counted_bytes() -> None:
    same = {**RICH, "max_tokens": 1}
    assert payload_digest(RICH) == payload_digest(same)  # max_tokens is not counted
    reordered = {**RICH, "messages": RICH["messages"][::-1]}
    assert payload_digest(RICH) != payload_digest(reordered)
    other_model = {**RICH, "model": "claude-opus-4-1"}
    assert payload_digest(RICH) != payload_digest(other_model)
    counts = ConfirmedCounts(max_bytes=120 * 3)
    for i in range(10):
        counts.put({**RICH, "system": f"s{i}"}, i)
    assert counts.get({**RICH, "system": "s9"}) == 9
    assert counts.get({**RICH, "system": "s0"}) is None  # bounded: the oldest went first


# -- the confirmer against the server ---------------------------------------------------------


async def test_confirmer_returns_the_servers_count_and_replays_cost_nothing(
    make_confirmer: Callable[..., PayloadConfirmer], bytes_server: Any, anthropic_server_module: Any
) -> None:
    confirmer = make_confirmer()
    got = await confirmer.count(RICH)
    (request,) = bytes_server.requests
    assert "max_tokens" not in request.body
    assert got == anthropic_server_module.bytes_expected_tokens(request.body)
    assert await confirmer.count(dict(RICH)) == got
    assert bytes_server.calls == 1
    assert confirmer.cache_hits == 1


async def test_identical_payloads_in_flight_share_one_call(
    make_confirmer: Callable[..., PayloadConfirmer], bytes_server: Any, fault: Any
) -> None:
    confirmer = make_confirmer()
    bytes_server.script(fault.delay(0.2))  # keeps the first call in flight while others ask
    got = await asyncio.gather(*(confirmer.count(dict(RICH)) for _ in range(5)))
    assert len(set(got)) == 1
    assert bytes_server.calls == 1


async def test_confirmer_honours_retry_after_through_the_limiter(
    make_confirmer: Callable[..., PayloadConfirmer], bytes_server: Any, fault: Any
) -> None:
    confirmer = make_confirmer()
    bytes_server.script(fault.status(429, retry_after=0.05))
    assert await confirmer.count(RICH) > 0
    assert bytes_server.calls == 2
    assert confirmer._limiter.throttled == 1
    assert confirmer._limiter.slowdown > 1


async def test_confirmer_retries_5xx_and_timeouts_then_gives_up_cleanly(
    make_confirmer: Callable[..., PayloadConfirmer], bytes_server: Any, fault: Any
) -> None:
    confirmer = make_confirmer(timeout_s=0.3, attempts=2)
    bytes_server.script(fault.status(529))
    assert await confirmer.count(RICH) > 0
    bytes_server.script(fault.delay(3), fault.delay(3))
    with pytest.raises(CountingUnavailable):
        await confirmer.count({**RICH, "system": "another"})
    assert confirmer.failures == 1
    bytes_server.reset()
    with pytest.raises(InvalidRequest):  # a 400 is not retried
        await confirmer.count({**RICH, "messages": []})
    assert bytes_server.calls == 1


# -- workloads --------------------------------------------------------------------------------

WORDS = [
    "the",
    "of",
    "context",
    "budget",
    "window",
    "token",
    "model",
    "request",
    "reply",
    "system",
    "history",
    "query",
    "chunk",
    "Straße",
    "Größe",
    "naïve",
    "façade",
    "東京",
    "データ",
    "пример",
    "данные",
    "42",
    "3.14",
    "0x1f",
    "def",
    "return",
    "lambda",
    "{}",
    "[]",
    "()",
    "=>",
    ";",
]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


class Fitter:
    """A minimal Claude fit: system + newest history turns + context chunks + query."""

    def __init__(self, confirmer: PayloadConfirmer, truth: Callable[[Any], int]) -> None:
        self.truth = truth
        fam = TOKENIZERS.families["claude-v3"]
        self.estimator = PayloadEstimator(fam.framing, o200k_text_counter(CountCache(1 << 22)))
        self.learner = RatioLearner({"claude-v3": fam})
        self.confirmer = confirmer

    def payload(self, system: str, turns: list[str], chunks: list[str], query: str) -> Any:
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": t}
            for i, t in enumerate(turns)
        ]
        last = [{"type": "text", "text": c} for c in chunks] + [{"type": "text", "text": query}]
        messages.append({"role": "user", "content": last})
        return {"model": MODEL, "system": system, "messages": messages}

    def plan_for(
        self,
        build: Callable[[tuple[int, int]], Any],
        cost: Callable[[Any], int],
        target: int,
        pairs: int,
        n_chunks: int,
    ) -> tuple[int, int]:
        """Chunks first (best first), then the newest history pairs, while they fit."""
        plan = (0, 0)
        if cost(build(plan)) > target:
            raise ValueError("the query alone does not fit")
        for _ in range(n_chunks):
            trial = (plan[0], plan[1] + 1)
            if cost(build(trial)) > target:
                break
            plan = trial
        for _ in range(pairs):
            trial = (plan[0] + 1, plan[1])
            if cost(build(trial)) > target:
                break
            plan = trial
        return plan

    async def fit(
        self, system: str, history: list[str], chunks: list[str], query: str, budget: int
    ) -> tuple[Any, int, int | None]:
        """(payload, confirmed tokens, the oracle's tokens when something was dropped).

        The oracle runs the same allocator on the server's own counts: what a perfect local
        tokenizer would have emitted. Comparing with it measures the loss from estimating,
        not the coarseness of whole items."""
        pairs = len(history) // 2
        everything = (pairs, len(chunks))

        def build(plan: tuple[int, int]) -> Any:
            keep_pairs, keep_chunks = plan
            turns = history[len(history) - 2 * keep_pairs :] if keep_pairs else []
            return self.payload(system, turns, chunks[:keep_chunks], query)

        def allocate(target: int, ratio: float) -> tuple[int, int]:
            est = self.estimator.estimate
            return self.plan_for(build, lambda p: est(p).scaled(ratio), target, *everything)

        got = await fit_confirmed(
            allocate=allocate,
            render=build,
            estimate=self.estimator.estimate,
            count=self.confirmer.count,
            dropped_any=lambda p: p != everything,
            budget=budget,
            learner=self.learner,
            family="claude-v3",
            key=conversation_key(MODEL, system, history[0] if history else query),
        )
        oracle = None
        if got.plan != everything:
            best = self.plan_for(build, self.truth, budget, *everything)
            oracle = self.truth(build(best))
        return got.payload, got.tokens, oracle


async def test_unrelated_requests_cost_about_one_call_each(
    make_confirmer: Callable[..., PayloadConfirmer], bytes_server: Any, anthropic_server_module: Any
) -> None:
    rng = random.Random(7)
    fitter = Fitter(make_confirmer(), anthropic_server_module.bytes_expected_tokens)
    used: list[float] = []
    vs_oracle: list[float] = []
    n = 40
    for _ in range(n):
        # Items of realistic size next to the budget: a chunk is a few % of it.
        chunks = [sentence(rng, rng.randint(10, 40)) for _ in range(rng.randint(60, 150))]
        history = [sentence(rng, rng.randint(5, 40)) for _ in range(2 * rng.randint(0, 6))]
        budget = rng.randint(2000, 5000)
        payload, tokens, oracle = await fitter.fit(
            sentence(rng, 12), history, chunks, sentence(rng, 15), budget
        )
        assert tokens == anthropic_server_module.bytes_expected_tokens(payload) <= budget
        if oracle is not None:
            used.append(tokens / budget)
            vs_oracle.append(tokens / oracle)
    assert bytes_server.calls / n <= 1.3
    assert len(used) > n / 2
    assert min(used) >= 0.95
    assert min(vs_oracle) >= 0.95


async def test_growing_conversations_cost_about_one_call_per_turn(
    make_confirmer: Callable[..., PayloadConfirmer], bytes_server: Any, anthropic_server_module: Any
) -> None:
    rng = random.Random(8)
    fitter = Fitter(make_confirmer(), anthropic_server_module.bytes_expected_tokens)
    requests = 0
    vs_oracle: list[float] = []
    for _ in range(12):
        system, history = sentence(rng, 20), []
        for _turn in range(10):
            query = sentence(rng, rng.randint(5, 40))
            payload, tokens, oracle = await fitter.fit(system, history, [], query, 1800)
            requests += 1
            assert tokens == anthropic_server_module.bytes_expected_tokens(payload) <= 1800
            if oracle is not None:
                vs_oracle.append(tokens / oracle)
            history += [query, sentence(rng, rng.randint(20, 150))]
    assert bytes_server.calls / requests <= 1.05
    assert vs_oracle  # the conversations did outgrow the budget
    assert min(vs_oracle) >= 0.95  # whole turns are dropped: compare with the oracle


def test_conversation_hints_start_from_the_last_turns_ratio() -> None:
    learner = RatioLearner(PRIOR, min_samples=3)
    key = conversation_key(MODEL, "sys", "first")
    assert learner.hinted_ratio("f", key) is None
    learner.observe("f", ClaudeEstimate(1000, 0), 1400, key)
    assert learner.hinted_ratio("f", key) == pytest.approx(1.4 * 1.02)  # cold hint margin
    for confirmed in (1420, 1400, 1430, 1410):  # each turn off its hint by up to ~2%
        learner.observe("f", ClaudeEstimate(1000, 0), confirmed, key)
    hinted = learner.hinted_ratio("f", key)
    assert hinted is not None and 1.41 < hinted < 1.41 * 1.03
    assert learner.hinted_ratio("f", conversation_key(MODEL, "sys", "other")) is None


def test_ctok_counter_is_content_only_when_installed() -> None:
    pytest.importorskip("ctok")
    from worker.count.claude_estimate import ctok_text_counter

    count = ctok_text_counter("3.0")
    assert count(["a"]) == [1]
    longer, shorter = count(["hello, world, hello, world", "hello, world"])
    assert longer > shorter > 0

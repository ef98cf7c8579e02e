"""Claude requests end to end through the engine (issue 11): estimate, allocate, one count.

The real ``anthropic`` SDK talks to the local count_tokens server in its "bytes" mode, whose
tokenizer (UTF-8 bytes / 3.3 plus framing) is unlike the local o200k estimate: totals can
only be right if the engine reports the API's count of the payload it emitted.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from worker.build import build_engine
from worker.catalog import Catalog
from worker.count.anthropic_api import make_client
from worker.count.cache import CountCache
from worker.count.claude_confirm import PayloadConfirmer
from worker.count.claude_estimate import ClaudeEstimate
from worker.count.limiter import RateLimiter
from worker.engine.engine import Engine
from worker.engine.fit_api import FIT_POLICY
from worker.engine.request import AssemblyRequest
from worker.engine.result import FitResult
from worker.settings import Settings

MODEL = "claude-sonnet-4-5"
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
    "rotate",
    "key",
    "deploy",
    "region",
    "cache",
    "limit",
    "retry",
    "error",
    "Straße",
    "naïve",
    "東京",
    "データ",
    "пример",
    "42",
    "3.14",
    "def",
    "return",
    "lambda",
    "{}",
    "[]",
    "()",
    "=>",
    ";",
]

MakeEngine = Callable[..., Engine]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def request(
    i: int,
    system: str,
    history: list[str],
    chunks: list[str],
    query: str,
    window: int,
    **budget: Any,
) -> AssemblyRequest:
    roles = ("user", "assistant")
    return AssemblyRequest.model_validate(
        {
            "request_id": f"r{i}",
            "model": MODEL,
            "system": system,
            "history": [{"role": roles[k % 2], "content": t} for k, t in enumerate(history)],
            "chunks": [{"id": f"c{k}", "text": t} for k, t in enumerate(chunks)],
            "query": query,
            "budget": {"max_context_tokens": window, "output_reserve": 0, **budget},
        }
    )


def unrelated(seed: int, n: int) -> list[AssemblyRequest]:
    rng = random.Random(seed)
    return [
        request(
            i,
            sentence(rng, 15),
            [sentence(rng, rng.randint(5, 40)) for _ in range(2 * rng.randint(0, 6))],
            [sentence(rng, rng.randint(10, 40)) for _ in range(rng.randint(30, 90))],
            sentence(rng, 15),
            rng.randint(1500, 4000),
        )
        for i in range(n)
    ]


def conversations(seed: int, n: int, turns: int, **budget: Any) -> list[AssemblyRequest]:
    rng = random.Random(seed)
    out: list[AssemblyRequest] = []
    for _ in range(n):
        system, history = sentence(rng, 20), []
        for _turn in range(turns):
            query = sentence(rng, rng.randint(5, 40))
            out.append(request(len(out), system, list(history), [], query, 2000, **budget))
            history += [query, sentence(rng, rng.randint(20, 150))]
    return out


def body_of(result: FitResult) -> dict[str, Any]:
    """The count_tokens body of what the result tells the caller to send."""
    body: dict[str, Any] = {"model": result.model}
    if result.system:
        body["system"] = result.system
    body["messages"] = [{"role": m.role, "content": m.content} for m in result.messages]
    return body


@pytest.fixture
def bytes_server(anthropic_server_module: Any) -> Any:
    with anthropic_server_module.AnthropicServer(counting="bytes") as server:
        yield server


@pytest.fixture
async def make_engine(catalog: Catalog, bytes_server: Any) -> AsyncIterator[MakeEngine]:
    engines: list[Engine] = []
    pool = ThreadPoolExecutor(2)

    def make(
        *,
        limiter: RateLimiter | None = None,
        timeout_s: float = 5.0,
        attempts: int = 3,
        **kw: Any,
    ) -> Engine:
        def confirmer() -> PayloadConfirmer:
            client = make_client("sk-test", bytes_server.base_url, timeout_s, 0)
            return PayloadConfirmer(
                client,
                limiter or RateLimiter(1e6, burst=8),
                attempts=attempts,
                backoff_s=0.01,
                deadline_s=10.0,
            )

        engine = Engine(
            catalog=catalog,
            cache=CountCache(32 * 1024 * 1024),
            executor=pool,
            anthropic_factory=confirmer,
            **kw,
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.aclose()
    pool.shutdown()


def check_exact(result: FitResult, server_module: Any) -> None:
    assert result.status == "ok", result.error
    assert result.exact is True
    assert result.count_method == "anthropic:count_tokens"
    usage = result.usage
    assert usage is not None
    assert usage.total_tokens == server_module.bytes_expected_tokens(body_of(result))
    assert usage.total_tokens <= usage.budget_tokens
    assert usage.slots_apportioned is True
    parts = usage.system + usage.history + usage.context + usage.query + usage.framing
    assert parts == usage.total_tokens


async def test_unrelated_requests_about_one_call_each_exact_and_full(
    make_engine: MakeEngine, bytes_server: Any, anthropic_server_module: Any
) -> None:
    engine = make_engine()
    reqs = unrelated(11, 40)
    used: list[float] = []
    for req in reqs:
        result = await engine.fit(req)
        check_exact(result, anthropic_server_module)
        assert result.usage is not None
        if result.dropped:
            used.append(result.usage.utilization)
    assert bytes_server.calls / len(reqs) <= 1.3
    assert len(used) >= 10  # the workload does make the allocator drop
    assert min(used) >= 0.95, sorted(used)[:5]
    # the server's last body is one the engine emitted: it counted what it returned
    assert bytes_server.requests[-1].body == body_of(result)


async def test_growing_conversations_cost_about_one_call_per_turn(
    make_engine: MakeEngine, bytes_server: Any, anthropic_server_module: Any
) -> None:
    engine = make_engine()
    # newest-first history (the cache-stable cut drops exchanges that would fit, on purpose)
    reqs = conversations(12, 8, 10, stable_history=False)
    results = [await engine.fit(req) for req in reqs]
    for req, result in zip(reqs, results, strict=True):
        check_exact(result, anthropic_server_module)
        assert result.usage is not None
        dropped = [d for d in result.dropped if d.slot == "history"]
        assert all(d.reason == "history_budget" for d in dropped)
        if dropped:
            # take-back worked: the next older exchange would not have fitted its aim
            kept = len(result.messages) - 1
            older = req.history[len(req.history) - kept - 2 : len(req.history) - kept]
            body = body_of(result)
            body["messages"] = [{"role": t.role, "content": t.content} for t in older] + body[
                "messages"
            ]
            more = anthropic_server_module.bytes_expected_tokens(body)
            # (take-backs aim a little under the budget: an overshoot costs a third call)
            assert more > FIT_POLICY.take_back_aim * result.usage.budget_tokens
    assert bytes_server.calls / len(reqs) <= 1.05
    bytes_server.reset()
    stable = conversations(13, 8, 10)  # the profile's cache-stable cut
    for result in [await engine.fit(req) for req in stable]:
        check_exact(result, anthropic_server_module)
    assert bytes_server.calls / len(stable) <= 1.05


async def test_a_replayed_request_costs_no_call(make_engine: MakeEngine, bytes_server: Any) -> None:
    engine = make_engine()
    req = unrelated(3, 1)[0]
    first = await engine.fit(req)
    calls = bytes_server.calls
    again = await engine.fit(req.model_copy(update={"request_id": "again"}))
    assert bytes_server.calls == calls
    assert first.usage is not None and again.usage is not None
    assert again.usage.total_tokens == first.usage.total_tokens
    assert again.messages == first.messages


async def test_a_confirmed_overrun_is_trimmed_and_reconfirmed(
    make_engine: MakeEngine, bytes_server: Any, anthropic_server_module: Any
) -> None:
    engine = make_engine()
    # Teach the learner a ratio far too low: the first allocation overruns.
    claude = engine.claude
    for _ in range(10):
        claude.learner.observe("claude-v3", ClaudeEstimate(1000, 0), 500)
    result = await engine.fit(unrelated(4, 1)[0])
    check_exact(result, anthropic_server_module)
    sent = [anthropic_server_module.bytes_expected_tokens(r.body) for r in bytes_server.requests]
    assert result.usage is not None
    assert len(sent) >= 2 and sent[0] > result.usage.budget_tokens


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param(lambda f: [f.status(429, retry_after=0)] * 2, id="429-retry-after"),
        pytest.param(lambda f: [f.status(429, retry_after_ms=5)], id="429-retry-after-ms"),
        pytest.param(lambda f: [f.status(503), f.status(529)], id="5xx"),
        pytest.param(lambda f: [f.disconnect()], id="connection"),
        pytest.param(lambda f: [f.delay(2.0)], id="timeout"),
    ],
)
async def test_transient_failures_are_retried_and_counted(
    make_engine: MakeEngine,
    bytes_server: Any,
    anthropic_server_module: Any,
    fault: Any,
    faults: Callable[[Any], list[Any]],
) -> None:
    scripted = faults(fault)
    bytes_server.script(*scripted)
    engine = make_engine(timeout_s=0.5)
    result = await engine.fit(unrelated(5, 1)[0])
    check_exact(result, anthropic_server_module)
    assert bytes_server.pending == 0
    confirmer = engine.anthropic_started
    assert confirmer is not None
    assert confirmer.throttled == sum(1 for f in scripted if f.code == 429)


async def test_persistent_failure_fails_retriably_or_estimates(
    make_engine: MakeEngine, bytes_server: Any, fault: Any
) -> None:
    bytes_server.script(*[fault.status(503)] * 40)
    engine = make_engine(attempts=2)
    assert engine.claude.cold("claude-v3")
    failed, *others = await asyncio.gather(*(engine.fit(r) for r in unrelated(6, 4)))
    assert failed.status == "error" and failed.error is not None
    assert (failed.error.code, failed.error.retriable) == ("counting_unavailable", True)
    assert all(r.status == "error" for r in others)
    # nothing to learn from a failing API: requests no longer queue one at a time
    assert not engine.claude.cold("claude-v3")
    bytes_server.reset()
    bytes_server.script(*[fault.status(503)] * 20)
    estimated = await make_engine(attempts=2, on_unavailable="estimate").fit(unrelated(6, 1)[0])
    assert estimated.status == "ok" and estimated.exact is False
    assert estimated.count_method is not None
    assert estimated.count_method.startswith("estimate:local:o200k_base")
    [alert] = [a for a in estimated.alerts if a.type == "estimated_count"]
    assert alert.message.startswith("the count API did not answer")
    assert estimated.usage is not None
    assert estimated.usage.total_tokens <= estimated.usage.budget_tokens


async def test_local_mode_makes_no_call_and_says_it_estimates(
    make_engine: MakeEngine, bytes_server: Any
) -> None:
    engine = make_engine(claude_counting="local")
    for req in unrelated(7, 5):
        result = await engine.fit(req)
        assert result.status == "ok", result.error
        assert result.exact is False
        assert result.count_method is not None
        assert result.count_method.startswith("local:o200k_base")
        assert result.usage is not None
        assert result.usage.total_tokens <= result.usage.budget_tokens
        assert result.count_audit is None
    assert bytes_server.calls == 0


async def test_local_mode_needs_no_api_at_all(catalog: Catalog) -> None:
    async with Engine(catalog=catalog, claude_counting="local") as engine:
        result = await engine.fit(unrelated(8, 1)[0])
    assert result.status == "ok" and result.exact is False


async def test_audit_mode_confirms_a_sample_and_records_drift(
    make_engine: MakeEngine, bytes_server: Any, anthropic_server_module: Any
) -> None:
    engine = make_engine(claude_counting="audit", claude_audit_fraction=0.5)
    reqs = unrelated(9, 30)
    results = [await engine.fit(r) for r in reqs]
    audited = [r for r in results if r.count_audit is not None]
    assert 0 < len(audited) < len(results)
    assert bytes_server.calls == len(audited)
    for r in results:
        assert r.exact is False and r.usage is not None
    for r in audited:
        audit = r.count_audit
        assert audit is not None and r.usage is not None
        truth = anthropic_server_module.bytes_expected_tokens(body_of(r))
        assert audit.confirmed_tokens == truth
        assert audit.local_tokens == r.usage.total_tokens
        assert audit.drift == pytest.approx((audit.local_tokens - truth) / truth, abs=1e-6)


async def test_audit_mode_alerts_when_drift_passes_the_threshold(
    make_engine: MakeEngine,
) -> None:
    # The prior ratio carries a margin: local counts sit above the API's, so a tiny
    # threshold is passed once enough payloads were audited; a lax one never is.
    strict = make_engine(
        claude_counting="audit", claude_audit_fraction=1.0, claude_drift_threshold=1e-4
    )
    lax = make_engine(claude_counting="audit", claude_audit_fraction=1.0, claude_drift_threshold=5)
    reqs = unrelated(10, 25)
    strict_results = [await strict.fit(r) for r in reqs]
    lax_results = [await lax.fit(r) for r in reqs]
    alerts = [any(a.type == "count_drift" for a in r.alerts) for r in strict_results]
    assert not any(alerts[:19]) and all(alerts[20:])  # judged from 20 samples on
    assert not any(a.type == "count_drift" for r in lax_results for a in r.alerts)


class VirtualTime:
    """A clock and a sleep that advance only when every task waits on a sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._seq), fut))
        await fut

    async def run(self, *aws: Awaitable[Any]) -> list[Any]:
        tasks = [asyncio.ensure_future(a) for a in aws]
        while not all(t.done() for t in tasks):
            # Real time passes too (HTTP answers, counting threads); the limiter's promise
            # holds whenever virtual time moves, since grants happen at its clock.
            await asyncio.sleep(0.001)
            if self._sleepers:
                at, _, fut = heapq.heappop(self._sleepers)
                self.now = max(self.now, at)
                fut.set_result(None)
        return [t.result() for t in tasks]


async def test_the_engine_shares_one_limiter_and_it_holds_its_rate(
    make_engine: MakeEngine, bytes_server: Any
) -> None:
    vt = VirtualTime()
    rpm, burst = 120.0, 3
    granted: list[float] = []

    class Recording(RateLimiter):
        async def acquire(self) -> float:
            waited = await super().acquire()
            granted.append(vt.now)
            return waited

    limiter = Recording(rpm, burst=burst, clock=vt.clock, sleep=vt.sleep)
    engine = make_engine(limiter=limiter)
    reqs = unrelated(13, 12)
    results = await vt.run(*(engine.fit(r) for r in reqs))
    assert all(r.status == "ok" for r in results)
    assert len(granted) == bytes_server.calls == limiter.calls >= len(reqs)
    interval = 60 / rpm
    for i, t in enumerate(sorted(granted)):
        assert t >= (i - burst + 1) * interval - 1e-9


def test_build_engine_wires_mode_rate_and_one_shared_confirmer(bytes_server: Any) -> None:
    settings = Settings(
        anthropic_base_url=bytes_server.base_url,
        anthropic_api_key="sk-test",  # type: ignore[arg-type]
        anthropic_count_rpm=42,
        anthropic_count_burst=3,
        claude_counting="audit",
        claude_audit_fraction=0.25,
    )
    with build_engine(settings) as engine:
        assert engine.claude.mode == "audit"
        confirmer = engine.anthropic
        assert confirmer is not None and confirmer is engine.anthropic
        assert (confirmer.limiter.rpm, confirmer.limiter.burst) == (42, 3)
        result = engine.fit_sync(unrelated(14, 1)[0])
        assert result.status == "ok"
        assert engine.anthropic_started is confirmer


def test_the_counting_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENHEAP_CLAUDE_COUNTING", "local")
    assert Settings().claude_counting == "local"
    monkeypatch.setenv("TOKENHEAP_CLAUDE_COUNTING", "sometimes")
    with pytest.raises(ValueError):
        Settings()


@pytest.mark.parametrize("mode", ["api", "local"])
def test_tokenheap_fit_end_to_end(
    bytes_server: Any, anthropic_server_module: Any, mode: str
) -> None:
    """`tokenheap fit` on a JSONL file of Claude requests, configured by the environment."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    reqs = unrelated(15, 20)
    stdin = "".join(r.model_dump_json(exclude_none=True) + "\n" for r in reqs)
    env = {
        **os.environ,
        "TOKENHEAP_ANTHROPIC_BASE_URL": bytes_server.base_url,
        "TOKENHEAP_ANTHROPIC_API_KEY": "sk-test",
        "TOKENHEAP_CLAUDE_COUNTING": mode,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "fit", "-"],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = [FitResult.model_validate(json.loads(line)) for line in proc.stdout.splitlines()]
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    if mode == "local":
        assert bytes_server.calls == 0
        assert all(r.status == "ok" and r.exact is False for r in results)
        return
    for r in results:
        check_exact(r, anthropic_server_module)
    # a cold process, requests fitted concurrently: the first ones calibrate the others
    assert bytes_server.calls / len(reqs) <= 1.3


async def test_the_engines_count_client_feeds_the_count_metrics(
    make_engine: MakeEngine, bytes_server: Any, fault: Any, catalog: Catalog
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    from worker.telemetry import names
    from worker.telemetry.otel import OtelTelemetry

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    telemetry = OtelTelemetry(
        tracer_provider=TracerProvider(), meter_provider=meters, catalog=catalog
    )
    engine = make_engine()
    telemetry.observe_anthropic(lambda: engine.anthropic_started)  # as the worker does
    bytes_server.script(fault.status(429, retry_after=0))
    result = await engine.fit(unrelated(16, 1)[0])
    assert result.status == "ok"
    data = reader.get_metrics_data()
    meters.shutdown()
    assert data is not None
    values = {
        m.name: m.data.data_points[0].value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert values[names.METRIC_ANTHROPIC_CALLS] == bytes_server.calls
    assert values[names.METRIC_ANTHROPIC_THROTTLED] == 1
    assert values[names.METRIC_ANTHROPIC_LIMITER_WAIT] >= 0

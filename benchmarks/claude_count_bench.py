"""count_tokens calls and latency per Claude request: the old per-piece design against the
engine's estimate-and-confirm path, on a local count_tokens server adding latency to each call.

    python -m benchmarks.claude_count_bench [--latency 0.15] [--requests 40] [--conversations 12]

The server counts UTF-8 bytes / 3.3 plus framing (tests/support/anthropic_server.py, "bytes"
mode): a tokenizer unlike the local o200k estimate. "old" is the design the engine had
before issue 11, kept here only (``old_fit``): one call per distinct piece through
``AnthropicCounter``, the allocator on those counts, a confirmation of the payload. "new" is
``Engine.fit`` as shipped (worker/engine/fit_api.py): the local estimate at the learned
ratio, the engine's allocator, one count of the final payload. Requests run one after the
other on the same budgets; each design gets a fresh server and engine (a cold start). The
limiter is set far above the calls made, so latency is the count calls, not the RPM.
Not a timed test: figures vary with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.load import load_file
from worker.catalog import ChatFraming, load_catalog
from worker.count.anthropic_api import AnthropicCounter, make_client
from worker.count.cache import CountCache
from worker.count.claude_confirm import PayloadConfirmer
from worker.count.limiter import RateLimiter
from worker.engine.allocate import allocate
from worker.engine.budget import policy_for
from worker.engine.costs import Costs
from worker.engine.engine import Engine
from worker.engine.fit_api import LOCAL_ENCODING
from worker.engine.prepared import Prepared, prepare
from worker.engine.report import build_result, error_result
from worker.engine.request import AssemblyRequest
from worker.engine.result import CacheUse, FitResult
from worker.errors import CountingUnavailable, TokenheapError

ROOT = Path(__file__).resolve().parents[1]
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
    "latency",
    "throughput",
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


def load_server() -> ModuleType:
    return load_file("_bench_anthropic_server", "tests/support/anthropic_server.py")


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


Job = dict[str, Any]  # system, history (list of str, alternating), chunks, query, budget


def unrelated(rng: random.Random, n: int) -> list[Job]:
    return [
        {
            "system": sentence(rng, 15),
            "history": [sentence(rng, rng.randint(5, 40)) for _ in range(2 * rng.randint(0, 6))],
            "chunks": [sentence(rng, rng.randint(10, 40)) for _ in range(rng.randint(30, 90))],
            "query": sentence(rng, 15),
            "max_context": rng.randint(1500, 4000),
        }
        for _ in range(n)
    ]


def conversations(rng: random.Random, n: int, turns: int) -> list[Job]:
    jobs: list[Job] = []
    for _ in range(n):
        system, history = sentence(rng, 20), list[str]()
        for _turn in range(turns):
            query = sentence(rng, rng.randint(5, 40))
            jobs.append(
                {
                    "system": system,
                    "history": list(history),
                    "chunks": [],
                    "query": query,
                    "max_context": 2000,
                }
            )
            history += [query, sentence(rng, rng.randint(20, 150))]
    return jobs


def request_of(i: int, job: Job) -> AssemblyRequest:
    roles = ("user", "assistant")
    return AssemblyRequest.model_validate(
        {
            "request_id": f"r{i}",
            "model": MODEL,
            "system": job["system"],
            "history": [{"role": roles[k % 2], "content": t} for k, t in enumerate(job["history"])],
            "chunks": [{"id": f"c{k}", "text": t} for k, t in enumerate(job["chunks"])],
            "query": job["query"],
            "budget": {"max_context_tokens": job["max_context"], "output_reserve": 0},
        }
    )


CLAUDE_FRAMING = ChatFraming(per_message=4, per_name=0, reply_priming=0)
OLD_ROUNDS = 4


async def old_fit(p: Prepared, api: AnthropicCounter) -> FitResult:
    """The pre-issue-11 Claude path: every distinct piece counted by the API (cached),
    allocation on those counts, then the payload confirmed and trimmed by the excess."""
    model = p.req.model
    nonempty = [t for t in p.texts if t]
    try:
        got = dict(zip(nonempty, await api.count_texts(model, nonempty), strict=True))
        counts = [got.get(t, 0) if t else 0 for t in p.texts]
        costs = Costs.of(p.layout, counts, CLAUDE_FRAMING, {})
        wants = costs.wants(p.layout, p.budget.budget_tokens)
        policy = policy_for(p.req, p.profile, p.budget)
        plan = allocate(wants, policy)
        slack = 0
        for _ in range(OLD_ROUNDS):
            payload = p.layout.render(plan)
            confirmed = await api.count_payload(
                model,
                payload.system,
                payload.messages,
                tools=payload.tools,
                tool_choice=payload.tool_choice,
            )
            if confirmed <= p.budget.budget_tokens:
                return build_result(
                    p, plan, costs, "anthropic:count_tokens", True, {}, [], CacheUse(), confirmed
                )
            slack += confirmed - p.budget.budget_tokens
            plan = allocate(replace(wants, budget=p.budget.budget_tokens - slack), policy)
        raise CountingUnavailable("the confirmed payload stayed over budget")
    except TokenheapError as exc:
        return error_result(p.req.request_id, p.req.model, exc, p.req)


Measured = tuple[list[float], list[float], list[str]]
"""Latencies, budget used by results that dropped something, error codes."""


def _tally(result: FitResult, elapsed: float, out: Measured) -> None:
    latencies, used, errors = out
    latencies.append(elapsed)
    if result.status != "ok" or result.usage is None:
        errors.append(result.error.code if result.error else result.status)
    elif result.dropped:
        used.append(result.usage.total_tokens / result.usage.budget_tokens)


async def old(server: Any, reqs: list[AssemblyRequest]) -> Measured:
    catalog = load_catalog()
    client = make_client("sk-bench", server.base_url, 10.0, 2)
    api = AnthropicCounter(client, cache=CountCache(64 << 20), deadline_s=60)
    out: Measured = ([], [], [])
    try:
        for req in reqs:
            start = time.perf_counter()
            result = await old_fit(prepare(catalog, req), api)
            _tally(result, time.perf_counter() - start, out)
    finally:
        await api.aclose()
    return out


async def new(server: Any, reqs: list[AssemblyRequest]) -> Measured:
    pool = ThreadPoolExecutor(2)
    limiter = RateLimiter(100_000, burst=16)
    engine = Engine(
        catalog=load_catalog(),
        cache=CountCache(64 << 20),
        executor=pool,
        anthropic_factory=lambda: PayloadConfirmer(
            make_client("sk-bench", server.base_url, 10.0, 0), limiter, deadline_s=60
        ),
    )
    out: Measured = ([], [], [])
    try:
        engine.preload([LOCAL_ENCODING])  # the vocabulary loads at start-up, not per request
        for req in reqs:
            start = time.perf_counter()
            result = await engine.fit(req)
            _tally(result, time.perf_counter() - start, out)
    finally:
        await engine.aclose()
        pool.shutdown()
    return out


def line(
    name: str,
    calls: int,
    n: int,
    latencies: list[float],
    used: list[float],
    errors: list[str] | None = None,
) -> str:
    mean_used = f"{statistics.mean(used):.3f}" if used else "-"
    errs = errors or []
    failed = ", ".join(f"{errs.count(e)} {e}" for e in sorted(set(errs))) or "0"
    return (
        f"| {name} | {calls / n:.2f} | {statistics.median(latencies) * 1000:.0f} ms "
        f"| {statistics.mean(latencies) * 1000:.0f} ms | {mean_used} ({len(used)}/{n}) "
        f"| {failed} |"
    )


async def run(args: argparse.Namespace) -> None:
    srv = load_server()
    workloads = {
        "unrelated": unrelated(random.Random(1), args.requests),
        "conversations": conversations(random.Random(2), args.conversations, args.turns),
    }
    print(f"count_tokens server: bytes/3.3 + framing, {args.latency * 1000:.0f} ms per call\n")
    print(
        "| workload, design | calls/request | median latency | mean latency "
        "| used when dropped | failed |"
    )
    print("|---|---|---|---|---|---|")
    for name, jobs in workloads.items():
        reqs = [request_of(i, job) for i, job in enumerate(jobs)]
        for design, fit in (("old", old), ("new", new)):
            with srv.AnthropicServer(counting="bytes", latency=args.latency) as server:
                lat, used, errors = await fit(server, reqs)
                print(line(f"{name}, {design}", server.calls, len(reqs), lat, used, errors))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--latency", type=float, default=0.15)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=10)
    asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    main()

"""count_tokens calls and latency per Claude request: today's engine path against the new
estimate-and-confirm loop, on a local count_tokens server that adds latency to every call.

    python -m benchmarks.claude_count_bench [--latency 0.15] [--requests 40] [--conversations 12]

The server counts UTF-8 bytes / 3.3 plus framing (tests/support/anthropic_server.py, "bytes"
mode): a tokenizer unlike the local o200k estimate. Today's path is the engine's
(``Engine.fit`` with ``AnthropicCounter``: one call per distinct piece, then a confirmation).
The new loop (worker/count/claude_fit.py) is driven by a minimal allocator here, on the same
requests and the same budgets the engine computed, so calls and latency compare; the budget
used is reported for both. Not a timed test: figures vary with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import anthropic

from worker.catalog import load_catalog
from worker.count.anthropic_api import AnthropicCounter, make_client
from worker.count.cache import CountCache
from worker.count.claude_confirm import PayloadConfirmer
from worker.count.claude_estimate import (
    PayloadEstimator,
    RatioLearner,
    conversation_key,
    load_claude_tokenizers,
    o200k_text_counter,
)
from worker.count.claude_fit import fit_confirmed
from worker.count.limiter import RateLimiter
from worker.engine.engine import Engine
from worker.engine.request import AssemblyRequest

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
    spec = importlib.util.spec_from_file_location(
        "_bench_anthropic_server", ROOT / "tests" / "support" / "anthropic_server.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
        system, history = sentence(rng, 20), []
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


async def today(
    server: Any, jobs: list[Job], errors: list[str]
) -> tuple[list[float], list[float], list[int]]:
    """Engine.fit with AnthropicCounter; returns latencies, budget used when dropping, budgets.
    Requests the engine fails are appended to ``errors`` (by code)."""
    pool = ThreadPoolExecutor(2)
    cache = CountCache(64 * 1024 * 1024)
    engine = Engine(
        catalog=load_catalog(),
        cache=cache,
        executor=pool,
        anthropic_factory=lambda: AnthropicCounter(
            make_client("sk-bench", server.base_url, 10.0, 2), cache=cache, deadline_s=60
        ),
    )
    latencies, used, budgets = [], [], []
    known: dict[int, int] = {}
    try:
        for i, job in enumerate(jobs):
            req = request_of(i, job)
            start = time.perf_counter()
            result = await engine.fit(req)
            latencies.append(time.perf_counter() - start)
            if result.status != "ok" or result.usage is None:
                errors.append(result.error.code if result.error else result.status)
                budgets.append(known.get(job["max_context"], job["max_context"]))
                continue
            known[job["max_context"]] = result.usage.budget_tokens
            budgets.append(result.usage.budget_tokens)
            if result.dropped:
                used.append(result.usage.total_tokens / result.usage.budget_tokens)
    finally:
        await engine.aclose()
        pool.shutdown()
    return latencies, used, budgets


class NewFit:
    """The new loop with a minimal allocator: chunks best first, then newest history pairs."""

    def __init__(self, server: Any) -> None:
        tokenizers = load_claude_tokenizers(ROOT / "config" / "models.yaml")
        family = tokenizers.families["claude-v3"]
        self.estimator = PayloadEstimator(family.framing, o200k_text_counter(CountCache(1 << 24)))
        self.learner = RatioLearner({"claude-v3": family})
        self.client = anthropic.AsyncAnthropic(
            api_key="sk-bench", base_url=server.base_url, timeout=10.0
        )
        self.confirmer = PayloadConfirmer(self.client, RateLimiter(100_000, burst=8))

    async def fit(self, job: Job, budget: int) -> tuple[int, bool]:
        history, chunks = job["history"], job["chunks"]
        pairs, everything = len(history) // 2, (len(history) // 2, len(chunks))

        def build(plan: tuple[int, int]) -> Any:
            turns = history[len(history) - 2 * plan[0] :] if plan[0] else []
            messages = [
                {"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns)
            ]
            last = [{"type": "text", "text": c} for c in chunks[: plan[1]]]
            last.append({"type": "text", "text": job["query"]})
            messages.append({"role": "user", "content": last})
            return {"model": MODEL, "system": job["system"], "messages": messages}

        def allocate(target: int, ratio: float) -> tuple[int, int]:
            def fits(p: tuple[int, int]) -> bool:
                return self.estimator.estimate(build(p)).scaled(ratio) <= target

            plan = (0, 0)
            while plan[1] < len(chunks) and fits((plan[0], plan[1] + 1)):
                plan = (plan[0], plan[1] + 1)
            while plan[0] < pairs and fits((plan[0] + 1, plan[1])):
                plan = (plan[0] + 1, plan[1])
            return plan

        got = await fit_confirmed(
            allocate=allocate,
            render=build,
            estimate=self.estimator.estimate,
            count=self.confirmer.count,
            dropped_any=lambda p: p != everything,
            budget=budget,
            learner=self.learner,
            family="claude-v3",
            key=conversation_key(MODEL, job["system"], history[0] if history else job["query"]),
        )
        return got.tokens, got.plan != everything


async def new(server: Any, jobs: list[Job], budgets: list[int]) -> tuple[list[float], list[float]]:
    fitter = NewFit(server)
    latencies, used = [], []
    try:
        for job, budget in zip(jobs, budgets, strict=True):
            start = time.perf_counter()
            tokens, dropped = await fitter.fit(job, budget)
            latencies.append(time.perf_counter() - start)
            if dropped:
                used.append(tokens / budget)
    finally:
        await fitter.client.close()
    return latencies, used


def line(
    name: str,
    calls: int,
    n: int,
    latencies: list[float],
    used: list[float],
    errors: list[str] | None = None,
) -> str:
    mean_used = f"{statistics.mean(used):.3f}" if used else "-"
    failed = ", ".join(f"{errors.count(e)} {e}" for e in sorted(set(errors or []))) or "0"
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
        with srv.AnthropicServer(counting="bytes", latency=args.latency) as server:
            errors: list[str] = []
            lat, used, budgets = await today(server, jobs, errors)
            print(line(f"{name}, today", server.calls, len(jobs), lat, used, errors))
        with srv.AnthropicServer(counting="bytes", latency=args.latency) as server:
            lat, used = await new(server, jobs, budgets)
            print(line(f"{name}, new", server.calls, len(jobs), lat, used))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--latency", type=float, default=0.15)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=10)
    asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    main()

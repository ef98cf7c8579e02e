"""Benchmark workloads as JSONL files of requests, built from real text (benchmarks/corpus.py).

reuse: conversations resent every turn (turn N carries turns 1..N-1), chunks drawn with a
       Zipf-like skew from a pool (popular chunks come back), one shared system prompt.
cold:  the same shapes, but no text appears twice anywhere in the file.
agent: reuse, with native OpenAI tool use: every answer follows 1-3 parallel tool calls and
       their results, and the requests carry tool definitions.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from benchmarks.corpus import paragraphs, passage

SYSTEM = (
    "You are the support assistant of a developer platform. Answer from the provided "
    "context, cite chunk ids in brackets, and say plainly when the context does not cover "
    "the question. Be concise; prefer code over prose when showing how to do something."
)


def _zipf_index(rng: random.Random, n: int, s: float = 1.1) -> int:
    weights = _weights(n, s)
    return rng.choices(range(n), cum_weights=weights)[0]


_WEIGHT_CACHE: dict[tuple[int, float], list[float]] = {}


def _weights(n: int, s: float) -> list[float]:
    key = (n, s)
    if key not in _WEIGHT_CACHE:
        acc, out = 0.0, []
        for k in range(1, n + 1):
            acc += 1 / k**s
            out.append(acc)
        _WEIGHT_CACHE[key] = out
    return _WEIGHT_CACHE[key]


class _Text:
    """Hands out passages; with `fresh`, every passage is new (a distinct start paragraph
    and a salt, so no two texts in the file are equal)."""

    def __init__(self, fresh: bool) -> None:
        self.fresh = fresh
        self.n = 0

    def take(self, chars: int) -> str:
        self.n += 1
        text = passage(self.n * 7, chars)
        return f"({self.n}) {text}" if self.fresh else text


TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look up"},
                    "scope": {
                        "type": "string",
                        "description": "Where to look",
                        "enum": ["docs", "tickets", "code"],
                    },
                },
                "required": ["query"],
            },
        },
    }
    for name, desc in (
        ("search_docs", "Search the product documentation"),
        ("get_ticket", "Fetch a support ticket by id"),
        ("run_query", "Run a read-only analytics query"),
    )
]


def _tool_round(rng: random.Random, c: int, turn: int) -> list[dict[str, Any]]:
    """An assistant message with parallel calls, then one tool message per call."""
    calls = [
        {
            "id": f"call_{c}_{turn}_{k}",
            "type": "function",
            "function": {
                "name": TOOLS[k % len(TOOLS)]["function"]["name"],
                "arguments": json.dumps({"query": passage(c + turn + k, 60), "scope": "docs"}),
            },
        }
        for k in range(rng.randint(1, 3))
    ]
    results = [
        {
            "role": "tool",
            "tool_call_id": call["id"],
            "content": passage(c * 7 + turn * 3 + k, rng.randint(200, 900)),
        }
        for k, call in enumerate(calls)
    ]
    return [{"role": "assistant", "content": None, "tool_calls": calls}, *results]


def build(
    kind: str,
    conversations: int = 40,
    turns: int = 12,
    chunks_per_request: int = 8,
    pool: int = 400,
    seed: int = 7,
    model: str = "gpt-4o",
    window: int = 16_000,
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    fresh = kind == "cold"
    text = _Text(fresh)
    paras = paragraphs()
    pool_texts = [passage(i * 13, rng.randint(600, 2400)) for i in range(pool)]
    convs: list[list[dict[str, Any]]] = [[] for _ in range(conversations)]
    out: list[dict[str, Any]] = []
    for turn in range(turns):
        for c in range(conversations):
            question = paras[(c * 31 + turn * 7) % len(paras)]
            if fresh:
                history = [
                    {"role": m["role"], "content": text.take(len(m["content"]))} for m in convs[c]
                ]
                chunks = [
                    {"id": f"fresh-{text.n}-{k}", "text": text.take(rng.randint(600, 2400))}
                    for k in range(chunks_per_request)
                ]
                question = text.take(len(question))
                system = f"{SYSTEM} (tenant {c}-{turn})"
            else:
                history = list(convs[c])
                picked = {_zipf_index(rng, pool) for _ in range(chunks_per_request)}
                chunks = [{"id": f"doc-{k}", "text": pool_texts[k]} for k in sorted(picked)]
                system = SYSTEM
            req: dict[str, Any] = {
                "request_id": f"{kind}-{c}-{turn}",
                "model": model,
                "conversation_id": f"conv-{c}",
                "system": system,
                "history": history,
                "chunks": chunks,
                "query": question,
                "budget": {"max_context_tokens": window, "profile": "rag-chatbot"},
            }
            if kind == "agent":
                req["tools"] = TOOLS
            out.append(req)
            answer = passage(c * 101 + turn * 17, rng.randint(300, 1200))
            convs[c].append({"role": "user", "content": question})
            if kind == "agent":
                convs[c] += _tool_round(rng, c, turn)
            convs[c].append({"role": "assistant", "content": answer})
    return out


def write(kind: str, path: Path, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for req in build(kind, **kw):
            f.write(json.dumps(req) + "\n")
    return path


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The workload's shape as options, the same for every benchmark that writes one."""
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conversations", type=int, default=50)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--chunks", type=int, default=16)


def shape_of(args: argparse.Namespace) -> dict[str, int]:
    """`write`'s keyword arguments from the options of `add_shape_args`."""
    return {
        "conversations": args.conversations,
        "turns": args.turns,
        "chunks_per_request": args.chunks,
    }

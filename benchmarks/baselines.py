"""The processes tokenheap is measured against, each run as `python -m benchmarks.baselines
KIND FILE.jsonl` so that every contender pays its own start-up, as `tokenheap fit` does.

seed       the seed's algorithm: count every piece every time (tiktoken), history up to 40%
           newest first, chunks in order until the first misfit; prints the fitted messages.
langchain  langchain-core's trim_messages with a tiktoken counter over the same messages.
tiktoken   tiktoken counting every text of every request once, nothing else (the floor
           for a cold file: "no slower than tiktoken counting the same text alone").
io-floor   the I/O floor: each line parsed with json.loads and written back with
           json.dumps, one line each, and nothing else (no vocabulary, no tokenheap import):
           what any process that reads requests and writes results pays.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken


def encoding(name: str) -> tiktoken.Encoding:
    """The shipped vocabulary, imported here so that `io-floor` pays for none of it."""
    from worker.count.vocab import encoding as shipped

    return shipped(name)


def seed(lines: list[str]) -> None:
    enc = encoding("o200k_base")
    out = sys.stdout
    for line in lines:
        req = json.loads(line)
        window = req["budget"]["max_context_tokens"]
        count = lambda s: len(enc.encode_ordinary(s))  # noqa: E731 - the seed's habit
        budget = window - int(window * 0.10)
        used = count(req["system"]) + count(req["query"])
        # the seed counts every piece up front, every time
        history_tokens = [count(m["content"]) for m in req["history"]]
        chunk_tokens = [count(c["text"]) for c in req["chunks"]]
        history_budget = int(window * 0.40)
        kept_history: list[dict[str, Any]] = []
        h = 0
        for msg, t in zip(reversed(req["history"]), reversed(history_tokens), strict=True):
            if h + t > history_budget:
                break
            kept_history.insert(0, msg)
            h += t
        used += h
        context: list[str] = []
        for chunk, t in zip(req["chunks"], chunk_tokens, strict=True):
            if used + t > budget:
                break
            context.append(chunk["text"])
            used += t
        messages = [
            {"role": "system", "content": req["system"]},
            *kept_history,
            {"role": "user", "content": "\n\n".join(context) + "\n\n" + req["query"]},
        ]
        out.write(
            json.dumps({"request_id": req["request_id"], "messages": messages, "tokens": used})
            + "\n"
        )


def langchain(lines: list[str]) -> None:
    from langchain_core.messages import (
        AIMessage,
        BaseMessage,
        HumanMessage,
        SystemMessage,
        trim_messages,
    )

    enc = encoding("o200k_base")

    def counter(msgs: list[BaseMessage]) -> int:
        return sum(3 + len(enc.encode_ordinary(str(m.content))) for m in msgs) + 3

    out = sys.stdout
    for line in lines:
        req = json.loads(line)
        window = req["budget"]["max_context_tokens"]
        context = "\n\n".join(c["text"] for c in req["chunks"])
        msgs: list[BaseMessage] = [SystemMessage(req["system"])]
        for m in req["history"]:
            cls = HumanMessage if m["role"] == "user" else AIMessage
            msgs.append(cls(m["content"]))
        msgs.append(HumanMessage(context + "\n\n" + req["query"]))
        trimmed = trim_messages(
            msgs,
            max_tokens=window - int(window * 0.10),
            token_counter=counter,
            strategy="last",
            include_system=True,
            allow_partial=False,
            start_on="human",
        )
        out.write(
            json.dumps({"request_id": req["request_id"], "messages": [m.content for m in trimmed]})
            + "\n"
        )


def tiktoken_only(lines: list[str]) -> None:
    enc = encoding("o200k_base")
    total = 0
    for line in lines:
        req = json.loads(line)
        texts = [
            req["system"],
            req["query"],
            *(m["content"] for m in req["history"]),
            *(c["text"] for c in req["chunks"]),
        ]
        total += sum(len(enc.encode_ordinary(t)) for t in texts)
    sys.stdout.write(f"{total}\n")


def tiktoken_batch(lines: list[str]) -> None:
    """tiktoken's own threaded batch API over the same texts (2 threads, as many as cores)."""
    enc = encoding("o200k_base")
    texts: list[str] = []
    for line in lines:
        req = json.loads(line)
        texts += [
            req["system"],
            req["query"],
            *(m["content"] for m in req["history"]),
            *(c["text"] for c in req["chunks"]),
        ]
    total = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=2)))
    sys.stdout.write(f"{total}\n")


def io_floor(lines: list[str]) -> None:
    out = sys.stdout
    for line in lines:
        out.write(json.dumps(json.loads(line)) + "\n")


KINDS = {
    "io-floor": io_floor,
    "seed": seed,
    "langchain": langchain,
    "tiktoken": tiktoken_only,
    "tiktoken-batch": tiktoken_batch,
}

if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as f:
        KINDS[kind](f.readlines())

"""Demo traffic for the compose stack: examples/*.json to the requests topic, in a loop.

Each example goes out in turn through a rotation of lanes (model, tenant, pipeline, profile,
budget, padding), so the dashboard has something to show: roomy and tight budgets, dropped
history and chunks, per-request utilization alerts, one pipeline that runs hot long enough to
raise a sustained alert, now and then an unknown model (an error result) and, every
--bad-every messages, a malformed one (a dead letter). Meanwhile it prints one line per
result, sustained alert and dead letter, so `docker compose up` shows the fitted contexts.

    python ops/compose/produce_examples.py --bootstrap localhost:29092 --count 40

Settings come from the flags, else the worker's own variables (TOKENHEAP_BOOTSTRAP_SERVERS,
TOKENHEAP_REQUESTS_TOPIC, ...). With OTEL_* exporters configured, every request is sent under
a PRODUCER span whose context travels in the Kafka headers, so its trace in Jaeger starts
here and continues in the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Lane:
    """How one example is dressed up before it is sent."""

    name: str
    model: str
    tenant: str
    pipeline: str
    profile: str
    max_context_tokens: int
    chunk_copies: int = 1
    """The example's chunks repeated with distinct text (more than fits in a tight budget)."""
    history_copies: int = 1
    reflow: bool | None = None
    """False keeps each slot to its share: drops without filling the whole budget."""


LANES: tuple[Lane, ...] = (
    Lane("roomy", "gpt-4o", "acme", "docs-chat", "rag-chatbot", 8192),
    Lane("tight-context", "gpt-4o-mini", "acme", "docs-chat", "rag-chatbot", 1500, 8, 1, False),
    Lane(
        "long-history", "gpt-4.1-mini", "globex", "support-bot", "support-agent", 1500, 1, 10, False
    ),
    Lane("summaries", "gpt-3.5-turbo", "globex", "summarizer", "summarization", 3000, 8, 1),
    # Always over the 0.8 alert threshold: a sustained alert after ~20 of these.
    Lane("hot", "gpt-4", "acme", "search-qa", "rag-chatbot", 340, 4, 2),
)
UNKNOWN_MODEL = "gpt-0-unknown"
"""Sent every --error-every messages: the worker answers with an error result."""
BAD_KINDS = ("not-json", "no-query", "unknown-field", "item-too-long")
"""Malformed messages, in turn: each becomes a dead letter with its reason."""


def load_examples(folder: Path) -> list[dict[str, Any]]:
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise SystemExit(f"no *.json requests in {folder}")
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def dress(example: dict[str, Any], lane: Lane, request_id: str) -> dict[str, Any]:
    """The example as this lane sends it (a new dict; the example is not modified)."""
    doc = dict(example)
    chunks = list(example.get("chunks", []))
    doc["chunks"] = [
        dict(c, id=f"{c['id']}~{k}", text=c["text"] if k == 0 else f"{c['text']} (copy {k})")
        for k in range(lane.chunk_copies)
        for c in chunks
    ]
    doc["history"] = list(example.get("history", [])) * lane.history_copies
    doc.update(
        request_id=request_id,
        model=lane.model,
        tenant=lane.tenant,
        pipeline=lane.pipeline,
        conversation_id=f"{lane.name}-{request_id.rsplit('-', 1)[-1][-2:]}",
        budget={"max_context_tokens": lane.max_context_tokens, "profile": lane.profile},
    )
    if lane.reflow is not None:
        doc["budget"]["reflow"] = lane.reflow
    return doc


def bad_message(kind: str, request_id: str) -> bytes:
    if kind == "not-json":
        return b'{"request_id": "' + request_id.encode() + b'", "model": '
    doc: dict[str, Any] = {"request_id": request_id, "model": "gpt-4o", "query": "hello?"}
    if kind == "no-query":
        del doc["query"]
    elif kind == "unknown-field":
        doc["chunk"] = [{"id": "typo", "text": "a field name the contract does not know"}]
    elif kind == "item-too-long":
        doc["system"] = "x" * 300_000  # over TOKENHEAP_MAX_ITEM_CHARS (262144)
    else:
        raise ValueError(f"unknown bad message kind {kind!r}")
    return json.dumps(doc).encode()


@dataclass(frozen=True)
class Message:
    key: bytes
    value: bytes
    expect: str
    """`ok`, `error` (an error result) or `dead_letter`."""


def messages(
    examples: Sequence[dict[str, Any]],
    *,
    run: str,
    bad_every: int = 25,
    error_every: int = 60,
    verbatim: bool = False,
) -> Iterator[Message]:
    """Endless: example i % len(examples) in lane i % len(LANES), with the odd bad one."""
    n = 0
    while True:
        n += 1
        rid = f"demo-{run}-{n:06d}"
        if bad_every and n % bad_every == 0:
            kind = BAD_KINDS[(n // bad_every) % len(BAD_KINDS)]
            yield Message(rid.encode(), bad_message(kind, rid), "dead_letter")
            continue
        example = examples[n % len(examples)]
        if verbatim:
            doc = dict(example, request_id=rid)
        else:
            doc = dress(example, LANES[n % len(LANES)], rid)
        expect = "ok"
        if error_every and n % error_every == 0:
            doc["model"] = UNKNOWN_MODEL
            expect = "error"
        key = (doc.get("conversation_id") or rid).encode()
        yield Message(key, json.dumps(doc).encode(), expect)


# -- printing what comes back ------------------------------------------------------------


def describe_result(doc: dict[str, Any]) -> str:
    where = "/".join(x for x in (doc.get("tenant"), doc.get("pipeline")) if x) or "-"
    head = f"result      {doc['request_id']}  {doc['model']}  {where}"
    if doc.get("status") != "ok":
        error = doc.get("error") or {}
        return f"{head}  ERROR {error.get('code')}: {error.get('message', '')[:100]}"
    usage = doc.get("usage") or {}
    slots = " ".join(
        f"{s}={usage.get(s, 0)}" for s in ("system", "history", "context", "query", "framing")
    )
    line = (
        f"{head}  {usage.get('total_tokens')}/{usage.get('budget_tokens')} tokens "
        f"({usage.get('utilization', 0):.0%})  {slots}"
    )
    if doc.get("dropped"):
        line += f"  dropped={len(doc['dropped'])}"
    if doc.get("alerts"):
        line += "  alerts=" + ",".join(a["type"] for a in doc["alerts"])
    return line


def describe_alert(doc: dict[str, Any]) -> str | None:
    """Sustained alerts only: per-request alerts are already on their result's line."""
    if doc.get("kind") != "sustained":
        return None
    key = "/".join(x for x in (doc.get("tenant"), doc.get("pipeline"), doc.get("model")) if x)
    return f"ALERT       {doc['type']} {doc.get('state')} for {key}: {doc.get('message', '')}"


def describe_dead_letter(doc: dict[str, Any]) -> str:
    return (
        f"dead letter {doc.get('reason_code')} from {doc.get('source_topic')}"
        f"[{doc.get('source_partition')}]@{doc.get('source_offset')}: "
        f"{str(doc.get('reason', ''))[:100]}"
    )


# -- Kafka -------------------------------------------------------------------------------


def _tracer() -> Any:
    """A tracer exporting as OTEL_* says (nothing is exported when they select nothing)."""
    from opentelemetry import trace

    try:
        from worker.telemetry.setup import setup_telemetry
    except ImportError:  # run without tokenheap installed: spans stay local
        return trace.get_tracer("tokenheap.demo")
    providers = setup_telemetry(service_name="tokenheap-demo-producer", set_global=True)
    return providers.tracer_provider.get_tracer("tokenheap.demo")


async def produce(args: argparse.Namespace, producer: Any, stop: asyncio.Event) -> int:
    """Send until --count or `stop`, at --rate; each under a PRODUCER span."""
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    tracer = _tracer()
    stream = messages(
        load_examples(Path(args.examples)),
        run=args.run,
        bad_every=args.bad_every,
        error_every=args.error_every,
        verbatim=args.verbatim,
    )
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    started = time.monotonic()
    sent = 0
    while not stop.is_set() and (args.count == 0 or sent < args.count):
        message = next(stream)
        with tracer.start_as_current_span(
            f"send {args.requests_topic}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": args.requests_topic,
                "messaging.operation.type": "send",
            },
        ):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            headers = [(k, v.encode()) for k, v in carrier.items()]
            await producer.send_and_wait(
                args.requests_topic, message.value, key=message.key, headers=headers
            )
        sent += 1
        if interval:
            delay = started + sent * interval - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
    print(f"produced {sent} requests to {args.requests_topic}", flush=True)
    return sent


async def open_follower(args: argparse.Namespace, producer: Any) -> Any:
    """A consumer (no group) positioned at the end of the results, alerts and DLQ topics."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tps = []
    for topic in (args.results_topic, args.alerts_topic, args.dead_letter_topic):
        partitions = await producer.partitions_for(topic)  # waits for the topic's metadata
        tps += [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=args.bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)  # resolve "end" now, before anything is produced
    return consumer


async def follow(consumer: Any, args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Print results, sustained alerts and dead letters as they arrive."""
    while not stop.is_set():
        batch = await consumer.getmany(timeout_ms=500)
        for tp, records in batch.items():
            for record in records:
                line = describe(tp.topic, record.value, args)
                if line:
                    print(line, flush=True)


def describe(topic: str, value: bytes | None, args: argparse.Namespace) -> str | None:
    try:
        doc = json.loads(value or b"null")
    except ValueError:
        return f"{topic}: undecodable message"
    if not isinstance(doc, dict):
        return None
    if topic == args.results_topic:
        return describe_result(doc)
    if topic == args.alerts_topic:
        return describe_alert(doc)
    return describe_dead_letter(doc)


async def run(args: argparse.Namespace) -> int:
    from aiokafka import AIOKafkaProducer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # as PID 1 in a container, SIGTERM needs one
        loop.add_signal_handler(sig, stop.set)
    # The same message size as the worker's producers (TOKENHEAP_MAX_MESSAGE_BYTES, default
    # the broker's 1 MiB): a request the broker would refuse fails here, not there.
    max_bytes = int(os.environ.get("TOKENHEAP_MAX_MESSAGE_BYTES", str(1 << 20)))
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap, enable_idempotence=True, max_request_size=max_bytes
    )
    await producer.start()
    consumer = None
    follower = None
    try:
        if args.follow:
            consumer = await open_follower(args, producer)
            follower = asyncio.create_task(follow(consumer, args, stop))
        await produce(args, producer, stop)
        if follower is not None and not stop.is_set():
            with contextlib.suppress(TimeoutError):  # print the last results
                await asyncio.wait_for(stop.wait(), args.linger)
    finally:
        stop.set()
        if follower is not None:
            await follower
        if consumer is not None:
            await consumer.stop()
        await producer.stop()
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", default=env("TOKENHEAP_BOOTSTRAP_SERVERS", "localhost:29092"))
    p.add_argument(
        "--requests-topic", default=env("TOKENHEAP_REQUESTS_TOPIC", "tokenheap.requests")
    )
    p.add_argument("--results-topic", default=env("TOKENHEAP_RESULTS_TOPIC", "tokenheap.results"))
    p.add_argument("--alerts-topic", default=env("TOKENHEAP_ALERTS_TOPIC", "tokenheap.alerts"))
    p.add_argument(
        "--dead-letter-topic", default=env("TOKENHEAP_DEAD_LETTER_TOPIC", "tokenheap.dlq")
    )
    p.add_argument("--examples", default=str(REPO / "examples"), help="folder of *.json")
    p.add_argument("--rate", type=float, default=5.0, help="requests per second (0: flat out)")
    p.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    p.add_argument("--bad-every", type=int, default=25, help="every Nth is malformed (0: none)")
    p.add_argument("--error-every", type=int, default=60, help="every Nth: unknown model")
    p.add_argument("--verbatim", action="store_true", help="send the examples unchanged")
    p.add_argument("--no-follow", dest="follow", action="store_false", help="do not print")
    p.add_argument("--linger", type=float, default=5.0, help="seconds to print after --count")
    p.add_argument("--run", default=uuid.uuid4().hex[:6], help="request id infix")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"producing {args.examples}/*.json to {args.requests_topic} at {args.bootstrap}, "
        f"{args.rate:g}/s" + (f", {args.count} in all" if args.count else ", until stopped"),
        flush=True,
    )
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

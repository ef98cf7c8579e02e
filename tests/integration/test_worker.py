"""The worker against the real broker: order, offsets, dead letters, backpressure, crashes,
graceful drain, rebalances, the DLQ tool. Every topic and group is fresh per test."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.util
import io
import json
import re
import signal
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from worker.build import build_engine
from worker.engine.engine import Engine
from worker.stream.dlq import list_dead_letters, replay_dead_letters
from worker.stream.kafka import ensure_topics, partitions_of
from worker.stream.outgoing import MAX_VALUE_BYTES, Source, dead_letter_message
from worker.stream.publish import transactional_id


def _load(path: Path) -> ModuleType:
    """Import a helper module by path (tests/ is not a package), once."""
    name = f"_tokenheap_test_support.{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def support(name: str) -> ModuleType:
    return _load(Path(__file__).parents[1] / "support" / f"{name}.py")


kit = _load(Path(__file__).with_name("worker_kit.py"))
MakeTopics = Callable[..., Awaitable[list[str]]]
pytestmark = pytest.mark.kafka
MODES = ["at-least-once", "exactly-once"]


def _no_duplicates(ids: list[str]) -> None:
    dupes = {i: n for i, n in Counter(ids).items() if n > 1}
    assert not dupes, f"published more than once: {sorted(dupes)[:10]}"


async def test_round_trip_across_partitions(
    kafka_bootstrap: str, make_topics: MakeTopics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request gets one result keyed by conversation (else request id), with its alerts
    and trace headers; a request the engine rejects gets an error result; all of it is
    committed; /readyz is down while the vocabularies load, up while partitions are owned."""
    release = threading.Event()
    preload = Engine.preload

    def held(self: Engine, names: Sequence[str], *, behind: bool = False) -> Any:
        assert release.wait(30), "the test never let the vocabularies load"
        return preload(self, names, behind=behind)

    # loading takes a fraction of a second now (fastokens loads behind): hold it, so the
    # worker is observed live and not ready for certain
    monkeypatch.setattr(Engine, "preload", held)
    names = await kit.make_names(make_topics, partitions=3)
    n = 30
    values = [kit.request(i, conversation=f"conv-{i % 4}" if i % 2 else None) for i in range(n)]
    values.append(kit.request(n, model="no-such-model"))  # decodes, then the engine rejects it
    port = kit.free_port()
    telemetry = kit.RecordingTelemetry()
    settings = kit.settings_for(kafka_bootstrap, names, health_port=port)
    async with (
        kit.Reader(
            kafka_bootstrap, [names.results, names.alerts], names.partitions, committed_only=True
        ) as r,
        kit.InProcessWorker(settings, telemetry=telemetry) as worker,
    ):
        await worker.wait_live()
        assert await kit.http_status(port, "/readyz") == 503  # loading: not yet
        release.set()
        await worker.wait_ready()
        sent = await kit.produce(
            kafka_bootstrap, names.requests, values, partition_of=lambda i: i % 3
        )
        await r.wait_for(lambda: len(r.on(names.results)) >= n + 1)
        await r.wait_for(lambda: len(r.on(names.alerts)) >= n)
        assert await kit.http_status(port, "/readyz") == 200
        assert await kit.http_status(port, "/livez") == 200
        assert await kit.http_status(port, "/nope") == 404
        await asyncio.sleep(1.0)  # a commit interval or three
        assert await worker.stop() == 0

    results = {d["request_id"]: d for d in r.json(names.results)}
    _no_duplicates(r.ids(names.results))
    assert set(results) == {kit.request_id(i) for i in range(n + 1)}
    assert all(results[kit.request_id(i)]["status"] == "ok" for i in range(n))
    rejected = results[kit.request_id(n)]
    assert rejected["status"] == "error" and rejected["error"]["code"] == "unknown_model"
    for rec in r.on(names.results):
        doc = json.loads(rec.value)
        assert rec.key == (doc.get("conversation_id") or doc["request_id"]).encode()
        assert ("traceparent", kit.TRACEPARENT) in rec.headers
    assert sorted(a["request_id"] for a in r.json(names.alerts)) == [
        kit.request_id(i) for i in range(n)
    ]
    per_partition = Counter(s.partition for s in sent)
    assert await kit.committed_offsets(kafka_bootstrap, names.group) == dict(per_partition)
    assert {p for p, _ in telemetry.processed} == {0, 1, 2}


async def test_results_keep_offset_order_per_partition(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    """Earlier requests are made to finish last; results still come out in offset order."""
    names = await kit.make_names(make_topics, partitions=2)
    n = 24
    values = [kit.request(i, conversation=f"conv-{i % 2}") for i in range(n)]
    settings = kit.settings_for(kafka_bootstrap, names, max_in_flight=64)
    engine = kit.DelayedEngine(
        build_engine(settings), lambda req: 0.03 * (n - int(req.request_id.split("-")[1]))
    )
    async with (
        kit.Reader(kafka_bootstrap, [names.results], names.partitions, committed_only=True) as r,
        kit.InProcessWorker(settings, engine=engine),
    ):
        await kit.produce(kafka_bootstrap, names.requests, values, partition_of=lambda i: i % 2)
        await r.wait_for(lambda: len(r.on(names.results)) >= n)

    by_conversation: dict[str, list[str]] = {}
    for doc in r.json(names.results):
        by_conversation.setdefault(doc["conversation_id"], []).append(doc["request_id"])
    for parity in (0, 1):
        expected = [kit.request_id(i) for i in range(parity, n, 2)]
        assert by_conversation[f"conv-{parity}"] == expected


async def test_bad_messages_are_dead_lettered_while_the_partition_flows(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    """Malformed JSON, schema violations, oversized and empty messages go to the DLQ with the
    reason, original bytes, headers and position; the good ones around them are fitted in
    order and everything is committed. Then `dlq list` shows them and `dlq replay` re-sends
    their bytes, remembering how far it got."""
    names = await kit.make_names(make_topics, partitions=1)
    oversized = kit.request(90, chunks=3, system="x" * 20_000)
    values: list[bytes | None] = [
        kit.request(0),
        b'{"request_id": "broken", ',
        kit.request(1),
        json.dumps({"request_id": "r", "model": "gpt-4o", "query": "q", "extra": 1}).encode(),
        oversized,
        None,
        kit.request(2),
    ]
    headers = [("origin", b"test"), ("traceparent", kit.TRACEPARENT)]
    telemetry = kit.RecordingTelemetry()
    settings = kit.settings_for(kafka_bootstrap, names, max_request_bytes=16_384)
    async with (
        kit.Reader(
            kafka_bootstrap, [names.results, names.dlq], names.partitions, committed_only=True
        ) as r,
        kit.InProcessWorker(settings, telemetry=telemetry) as worker,
    ):
        await kit.produce(kafka_bootstrap, names.requests, values, headers=headers)
        await r.wait_for(lambda: len(r.on(names.results)) >= 5 and len(r.on(names.dlq)) >= 4)
        await asyncio.sleep(1.0)
        assert await worker.stop() == 0

    # A rejected request whose id can be read is answered too (its caller would hang).
    ids = [kit.request_id(0), kit.request_id(1), "r", kit.request_id(90), kit.request_id(2)]
    assert r.ids(names.results) == ids
    answered = {d["request_id"]: d for d in r.json(names.results)}
    assert answered["r"]["error"]["code"] == "invalid_request"
    assert answered[kit.request_id(90)]["error"]["code"] == "request_too_large"
    letters = r.json(names.dlq)
    assert [(d["source_offset"], d["reason_code"]) for d in letters] == [
        (1, "invalid_request"),
        (3, "invalid_request"),
        (4, "request_too_large"),
        (5, "invalid_request"),
    ]
    assert telemetry.dead_letters == [d["reason_code"] for d in letters]
    for d in letters:
        assert d["source_topic"] == names.requests and d["source_partition"] == 0
        assert d["group_id"] == names.group
        original = values[d["source_offset"]]
        kept = base64.b64decode(d["value_b64"]) if d.get("value_b64") else None
        assert kept == original
        assert [(h["key"], base64.b64decode(h["value_b64"])) for h in d["headers"]] == headers
        assert "x" * 50 not in d["reason"]  # the reason never quotes the content
    assert "extra" in letters[1]["reason"]
    assert await kit.committed_offsets(kafka_bootstrap, names.group) == {0: len(values)}

    # -- dlq list: metadata only, from the beginning, never moves anything ---------------
    out = io.StringIO()
    assert await list_dead_letters(settings, 10, out) == 4
    listed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(d["source_offset"], d["reason_code"]) for d in listed] == [
        (d["source_offset"], d["reason_code"]) for d in letters
    ]
    assert all("value_b64" not in d for d in listed)
    code, stdout = await kit.run_cli(settings, "dlq", "list", "--limit", "2")
    assert code == 0
    assert [json.loads(x)["source_offset"] for x in stdout.splitlines()] == [1, 3]

    # -- dlq replay: bounded by the limit, progress kept by its own group ---------------
    assert (await replay_dead_letters(settings, 2)).replayed == 2
    last = await replay_dead_letters(settings, 10)  # the null value is replayed as a null
    assert (last.replayed, last.refused) == (2, [])
    assert (await replay_dead_letters(settings, 10)).replayed == 0
    async with kit.Reader(
        kafka_bootstrap, [names.requests], names.partitions, committed_only=True
    ) as src:
        await src.wait_for(lambda: len(src.on(names.requests)) >= len(values) + 4)
    replayed = src.on(names.requests)[len(values) :]
    assert [rec.value for rec in replayed] == [values[1], values[3], values[4], values[5]]
    assert all(list(rec.headers) == headers for rec in replayed)


async def test_in_flight_is_bounded_overall_and_per_partition(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    """Slow requests pile up; the worker never holds more than its bounds (it pauses
    partitions and fetches the excess again), and still processes everything."""
    names = await kit.make_names(make_topics, partitions=3)
    n = 60
    settings = kit.settings_for(
        kafka_bootstrap, names, max_in_flight=4, max_in_flight_per_partition=2
    )
    engine = kit.DelayedEngine(build_engine(settings), lambda req: 0.05)
    telemetry = kit.RecordingTelemetry()
    async with (
        kit.Reader(kafka_bootstrap, [names.results], names.partitions, committed_only=True) as r,
        kit.InProcessWorker(settings, telemetry=telemetry, engine=engine),
    ):
        await kit.stream(kafka_bootstrap, names.requests, n, partitions=3)
        await r.wait_for(lambda: len(r.on(names.results)) >= n)

    assert sorted(r.ids(names.results)) == [kit.request_id(i) for i in range(n)]
    assert 2 <= telemetry.max_active <= 4
    assert max(telemetry.max_by_partition.values()) <= 2


@pytest.mark.parametrize("delivery", MODES)
async def test_sigkill_mid_stream_then_restart_loses_nothing(
    kafka_bootstrap: str, make_topics: MakeTopics, tmp_path: Path, delivery: str
) -> None:
    """A worker process is killed (-9) while requests stream in; a new one finishes them.
    At-least-once: every request has a result. Exactly-once: and exactly one, as seen by a
    read_committed reader (the killed worker's open transactions are aborted)."""
    names = await kit.make_names(make_topics, partitions=3)
    n = 240
    settings = kit.settings_for(
        kafka_bootstrap, names, delivery=delivery, health_port=kit.free_port()
    )
    committed_only = delivery == "exactly-once"
    first = kit.WorkerProcess(settings, tmp_path / "first.log")
    second = None
    try:
        async with kit.Reader(
            kafka_bootstrap, [names.results], names.partitions, committed_only=committed_only
        ) as r:
            await first.wait_ready()
            stream = kit.stream(kafka_bootstrap, names.requests, n, partitions=3, pace_s=0.01)
            await r.wait_for(lambda: len(r.on(names.results)) >= 40)
            first.kill()
            assert not stream.done(), "the stream ended before the kill; slow it down"
            second = kit.WorkerProcess(settings, tmp_path / "second.log")
            await stream
            await r.wait_for(lambda: len(set(r.ids(names.results))) >= n, 90)
            await asyncio.sleep(1.0)  # let any duplicate show up before counting
        assert await second.terminate() == 0, second.log_tail()
    finally:
        first.cleanup()
        if second is not None:
            second.cleanup()
    ids = r.ids(names.results)
    assert set(ids) == {kit.request_id(i) for i in range(n)}
    if delivery == "exactly-once":
        _no_duplicates(ids)


@pytest.mark.parametrize("delivery", MODES)
async def test_sigterm_drains_commits_and_restart_reprocesses_nothing(
    kafka_bootstrap: str, make_topics: MakeTopics, tmp_path: Path, delivery: str
) -> None:
    """SIGTERM mid-stream, with requests in flight (Claude requests, whose count_tokens calls
    the local stand-in holds after the first ten, so the worker surely has some in flight at
    SIGTERM): the worker finishes them once they are answered, commits exactly what it
    published (the committed offsets match the results out) and exits 0. The next worker
    starts there: no request is processed twice, none is lost."""
    names = await kit.make_names(make_topics, partitions=3)
    n = 60
    with support("anthropic_server").AnthropicServer(latency=0.2) as count_api:
        settings = kit.settings_for(
            kafka_bootstrap,
            names,
            delivery=delivery,
            health_port=kit.free_port(),
            anthropic_base_url=count_api.base_url,
            max_in_flight=6,
            # A held call waits for the test, not for the API: on a loaded machine the wait
            # for ten visible results can outlast the default 10 s timeout and 30 s deadline,
            # and the held requests would then end in counting_unavailable, not in a drain.
            anthropic_timeout_s=300.0,
            anthropic_deadline_s=600.0,
            anthropic_count_rpm=60_000.0,
        )
        first = kit.WorkerProcess(settings, tmp_path / "first.log")
        second = None
        try:
            async with kit.Reader(
                kafka_bootstrap, [names.results], names.partitions, committed_only=True
            ) as r:
                await first.wait_ready()
                count_api.hold(after=10)
                stream = kit.stream(
                    kafka_bootstrap, names.requests, n, partitions=3, pace_s=0.01,
                    model="claude-sonnet-4-5", distinct=True,
                )  # fmt: skip
                # Some results committed before SIGTERM, so the restart has offsets to start
                # from; five of the ten answered calls' requests are enough for that.
                await r.wait_for(lambda: len(r.on(names.results)) >= 5 and count_api.held > 0)
                first.proc.send_signal(signal.SIGTERM)
                await first.wait_log("in-flight")
                count_api.release()
                assert await first.wait(60) == 0, first.log_tail()
                committed = await kit.committed_offsets(kafka_bootstrap, names.group)
                await asyncio.sleep(1.0)  # anything published late would show up now
                before = set(r.ids(names.results))
                sent = await stream
                expected_before = {
                    kit.request_id(i)
                    for i, s in enumerate(sent)
                    if s.offset < committed.get(s.partition, 0)
                }
                assert before == expected_before
                log = first.log_path.read_text()
                held = re.search(r"draining (\d+) in-flight", log)
                assert held and int(held[1]) > 0, "nothing was in flight at SIGTERM"
                assert f"drained: {held[1]} records finished, 0 cut off" in log

                second = kit.WorkerProcess(settings, tmp_path / "second.log")
                await r.wait_for(lambda: len(set(r.ids(names.results))) >= n, 90)
                await asyncio.sleep(1.0)
            assert await second.terminate() == 0, second.log_tail()
        finally:
            first.cleanup()
            if second is not None:
                second.cleanup()
    ids = r.ids(names.results)
    _no_duplicates(ids)
    assert set(ids) == {kit.request_id(i) for i in range(n)}
    failed = [d for d in r.json(names.results) if d["status"] != "ok"]
    assert not failed, (failed, first.log_tail(), second.log_tail() if second else "")


@pytest.mark.parametrize("delivery", MODES)
async def test_two_workers_share_partitions_and_rebalances_lose_nothing(
    kafka_bootstrap: str, make_topics: MakeTopics, delivery: str
) -> None:
    """A second worker joins mid-stream (partitions are split), then the first leaves (the
    second takes everything): every request has exactly one result, because a revoked
    partition's in-flight records are finished and committed before it moves."""
    names = await kit.make_names(make_topics, partitions=4)
    n = 400
    settings = kit.settings_for(kafka_bootstrap, names, delivery=delivery)
    a_seen, b_seen = kit.RecordingTelemetry(), kit.RecordingTelemetry()
    async with contextlib.AsyncExitStack() as stack:
        r = await stack.enter_async_context(
            kit.Reader(kafka_bootstrap, [names.results], names.partitions, committed_only=True)
        )
        a = await stack.enter_async_context(
            kit.InProcessWorker(kit.with_health(settings), telemetry=a_seen)
        )
        await a.wait_ready()
        stream = kit.stream(kafka_bootstrap, names.requests, n, partitions=4, pace_s=0.02)
        await r.wait_for(lambda: len(r.on(names.results)) >= 30)
        b = await stack.enter_async_context(
            kit.InProcessWorker(kit.with_health(settings), telemetry=b_seen)
        )
        await r.wait_for(lambda: len(b_seen.processed) >= 10)
        b_partitions_while_shared = {p for p, _ in b_seen.processed}
        assert not stream.done(), "the stream ended before the second worker joined"
        assert await a.stop() == 0
        await stream
        await r.wait_for(lambda: len(set(r.ids(names.results))) >= n, 90)
        await asyncio.sleep(1.0)
        assert await b.stop() == 0

    ids = r.ids(names.results)
    assert set(ids) == {kit.request_id(i) for i in range(n)}
    _no_duplicates(ids)
    assert a_seen.processed and b_seen.processed
    assert 0 < len(b_partitions_while_shared) < 4


async def test_a_fenced_partition_stops_the_worker_and_nothing_is_duplicated(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    """Exactly-once: a new producer registering a partition's transactional id (what its next
    owner does) fences the worker's producer for it. The worker must not write another
    result for that partition: it stops with exit code 1, its open transaction is aborted,
    and the next worker produces every result exactly once."""
    names = await kit.make_names(make_topics, partitions=2)
    n = 120
    settings = kit.settings_for(
        kafka_bootstrap, names, delivery="exactly-once", health_port=kit.free_port()
    )
    async with contextlib.AsyncExitStack() as stack:
        r = await stack.enter_async_context(
            kit.Reader(kafka_bootstrap, [names.results], names.partitions, committed_only=True)
        )
        first = await stack.enter_async_context(kit.InProcessWorker(settings))
        await first.wait_ready()
        stream = kit.stream(kafka_bootstrap, names.requests, n, partitions=2, pace_s=0.02)
        await r.wait_for(lambda: len(r.on(names.results)) >= 20)
        tp = TopicPartition(names.requests, 0)
        usurper = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap, transactional_id=transactional_id(names.group, tp)
        )
        await usurper.start()  # InitProducerId: bumps the epoch, aborts the open transaction
        assert not stream.done(), "the stream ended before the fence; slow it down"
        try:
            assert await first.wait(60) == 1
        finally:
            await usurper.stop()
        await stack.enter_async_context(kit.InProcessWorker(settings))
        await stream
        await r.wait_for(lambda: len(set(r.ids(names.results))) >= n, 60)
        await asyncio.sleep(1.0)
    ids = r.ids(names.results)
    assert set(ids) == {kit.request_id(i) for i in range(n)}
    _no_duplicates(ids)


async def test_missing_topics_are_created_with_the_configured_partitions(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    """TOKENHEAP_CREATE_TOPICS: missing topics are made (and existing ones left alone)."""
    (existing,) = await make_topics(1, partitions=2)
    missing = [f"{existing}-new-{i}" for i in range(2)]
    common = {"bootstrap_servers": kafka_bootstrap}
    assert await ensure_topics(common, [existing, *missing], 5, 1) == missing
    assert await ensure_topics(common, [existing, *missing], 5, 1) == []
    assert await partitions_of(common, missing[0]) == list(range(5))
    assert await partitions_of(common, existing) == [0, 1]


def test_a_dead_letter_too_large_to_copy_its_original_refers_to_it() -> None:
    """A base64 copy of a message near the size limit would not fit in one message: the
    letter keeps the reason and position and refers to the original by digest."""
    value = b"x" * 900_000
    source = Source("requests", 2, 41, None, b"key", value, (("h", b"v"),))
    out = dead_letter_message("dlq", source, reason_code="request_too_large", reason="too big",
                              group_id="g")  # fmt: skip
    letter = json.loads(out.value)
    assert len(out.value) <= MAX_VALUE_BYTES and out.key == b"key"
    assert letter["original"] == "reference" and letter["value_b64"] is None
    assert letter["reason"] == "too big" and letter["headers"] == []
    assert letter["reference"]["value_size"] == 900_000
    assert letter["reference"]["value_sha256"] == hashlib.sha256(value).hexdigest()
    assert (letter["source_partition"], letter["source_offset"]) == (2, 41)

"""Dead letters on the real broker: records with null, empty and binary headers (and null
keys and values) are dead-lettered whole and replayed byte for byte; an original too large
to copy is kept by reference, replayed by re-reading it, and refused (never marked done)
once it is gone from the source topic."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import jsonschema
import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from tests.integration import worker_kit as kit
from worker.settings import Settings
from worker.stream.dlq import list_dead_letters, replay_dead_letters, replay_group
from worker.stream.outgoing import Source, dead_letter_message

pytestmark = pytest.mark.kafka
MakeTopics = Callable[..., Awaitable[list[str]]]
SCHEMA = json.loads(
    (Path(__file__).parents[2] / "schemas" / "dead-letter.json").read_text(encoding="utf-8")
)
Headers = list[tuple[str, bytes | None]]


async def _send(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes | None, Headers]]
) -> list[int]:
    """Each (key, value, headers) to partition 0, in order; their offsets."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        offsets = []
        for key, value, headers in records:
            # `send` refuses neither key nor value, which Kafka (and a Java client) allows.
            batch = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None, headers=headers)
            batch.close()
            md = await (await producer.send_batch(batch, topic, partition=0))
            offsets.append(md.offset)
        return offsets
    finally:
        await producer.stop()


async def _rejected(
    bootstrap: str, settings: Settings, names: kit.Names, expected: int
) -> list[ConsumerRecord[bytes, bytes]]:
    """Run the worker until `expected` dead letters are on the DLQ, then drain it."""
    async with (
        kit.Reader(bootstrap, [names.dlq], 1, committed_only=True) as r,
        kit.InProcessWorker(settings) as worker,
    ):
        await r.wait_for(lambda: len(r.on(names.dlq)) >= expected)
        await asyncio.sleep(0.5)
        assert await worker.stop() == 0
    letters = r.on(names.dlq)
    assert len(letters) == expected
    return letters


async def _read_back(bootstrap: str, topic: str, start: int, count: int) -> list[Record]:
    async with kit.Reader(bootstrap, [topic], 1, committed_only=True) as src:
        await src.wait_for(lambda: len(src.on(topic)) >= start + count)
    return [(r.key, r.value, list(r.headers)) for r in src.on(topic)[start:]]


Record = tuple[bytes | None, bytes | None, Headers]


async def test_null_empty_and_binary_headers_are_dead_lettered_and_replayed_exactly(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    names = await kit.make_names(make_topics, partitions=1)
    binary = bytes(range(256))
    originals: list[Record] = [
        (b"k0", b'{"request_id": "broken", ', [("nul", None), ("empty", b""), ("bin", binary)]),
        (None, None, [("nul", None), ("nul", None)]),  # null key and value, a repeated header
        (b"", b"", [("", b"")]),
    ]
    await _send(kafka_bootstrap, names.requests, originals)
    settings = kit.settings_for(kafka_bootstrap, names)
    letters = await _rejected(kafka_bootstrap, settings, names, len(originals))

    for rec, (key, _value, headers) in zip(letters, originals, strict=True):
        doc = json.loads(rec.value)
        jsonschema.validate(doc, SCHEMA)
        assert doc["original"] == "inline" and rec.key == key
        assert [h["key"] for h in doc["headers"]] == [k for k, _ in headers]
    assert [h["value_b64"] for h in json.loads(letters[0].value)["headers"]][:2] == [None, ""]

    out = io.StringIO()
    assert await list_dead_letters(settings, 10, out) == len(originals)
    listed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all(d["reason_code"] == "invalid_request" for d in listed), listed

    report = await replay_dead_letters(settings, 10)
    assert (report.replayed, report.refused) == (len(originals), [])
    assert await _read_back(kafka_bootstrap, names.requests, len(originals), 3) == originals
    assert (await replay_dead_letters(settings, 10)).replayed == 0  # remembered as done


async def test_a_large_original_is_kept_by_reference_and_refused_once_gone(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    """900 kB, over what a base64 copy allows: the letter refers to it; replay re-reads it
    from the source; once the source record is deleted, replay refuses and commits nothing."""
    names = await kit.make_names(make_topics, partitions=1)
    big = b"{" + hashlib.sha256(b"seed").digest() * 28_000 + b"}"  # 896 kB, not a request
    original: Record = (b"big", big, [("nul", None), ("h", b"v")])
    await _send(kafka_bootstrap, names.requests, [original])
    settings = kit.settings_for(kafka_bootstrap, names, max_request_bytes=100_000)
    (letter,) = await _rejected(kafka_bootstrap, settings, names, 1)
    doc = json.loads(letter.value)
    jsonschema.validate(doc, SCHEMA)
    assert doc["reason_code"] == "request_too_large" and doc["original"] == "reference"
    assert doc["reference"]["value_sha256"] == hashlib.sha256(big).hexdigest()
    assert doc["reference"]["value_size"] == len(big)
    assert len(letter.value) < 20_000

    report = await replay_dead_letters(settings, 10)
    assert (report.replayed, report.refused) == (1, [])
    assert await _read_back(kafka_bootstrap, names.requests, 1, 1) == [original]

    # The worker rejects the replayed copy again (offset 1); then the source is trimmed.
    (_, again) = await _rejected(kafka_bootstrap, settings, names, 2)
    assert json.loads(again.value)["source_offset"] == 1
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(names.requests, 0): RecordsToDelete(2)})
    finally:
        await admin.close()

    # A replayable letter behind the refused one waits with it (progress is an offset).
    behind = dead_letter_message(
        names.dlq, Source(names.requests, 0, 99, None, b"k", b"{", ()),
        reason_code="invalid_request", reason="bad", group_id=names.group,
    )  # fmt: skip
    await _send(kafka_bootstrap, names.dlq, [(behind.key, behind.value, [])])
    ends = await kit.end_offsets(kafka_bootstrap, names.requests, 1)
    for _ in range(2):  # refused every time: it was never marked done
        report = await replay_dead_letters(settings, 10)
        assert report.replayed == 0
        assert [(r.dlq_offset, "no longer" in r.why) for r in report.refused] == [(1, True)]
    assert await kit.committed_offsets(kafka_bootstrap, replay_group(names.group)) == {0: 1}
    assert await kit.end_offsets(kafka_bootstrap, names.requests, 1) == ends  # nothing sent
    code, _ = await kit.run_cli(settings, "dlq", "replay")
    assert code == 1

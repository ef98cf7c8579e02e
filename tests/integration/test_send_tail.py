"""`tokenheap send` and `tokenheap tail` against a running worker on the real broker; results
carry their request's id in a header and echo its metadata; a rejected request with a
readable id is answered; readiness means membership, not partition ownership."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration import worker_kit as kit
from worker.settings import Settings

pytestmark = pytest.mark.kafka
MakeTopics = Callable[..., Awaitable[list[str]]]


async def cli(
    settings: Settings, *args: str, stdin: bytes | None = None, timeout_s: float = 90.0
) -> tuple[int, str, str]:
    """`python -m worker <args>` with these settings: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args,
        env=kit.worker_env(settings), cwd=kit.REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(timeout_s):
        out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def doc(i: int, **over: Any) -> dict[str, Any]:
    return dict(json.loads(kit.request(i)), **over)


async def test_send_prints_each_answer_matched_by_request_id(
    kafka_bootstrap: str, make_topics: MakeTopics, tmp_path: Path
) -> None:
    names = await kit.make_names(make_topics, partitions=3)
    settings = kit.with_health(kit.settings_for(kafka_bootstrap, names))
    requests = [
        doc(1, metadata={"caller": "ci", "n": 1}),
        doc(2, conversation_id="conv-a"),
        doc(3, model="no-such-model"),
    ]
    src = tmp_path / "batch.ndjson"
    src.write_text("".join(json.dumps(d) + "\n" for d in requests), encoding="utf-8")
    async with (
        kit.Reader(kafka_bootstrap, [names.results], names.partitions, committed_only=True) as r,
        kit.InProcessWorker(settings) as worker,
    ):
        await worker.wait_ready()
        code, out, err = await cli(settings, "send", str(src), "--timeout", "60")
        assert code == 1, err  # one error result
        answers = {d["request_id"]: d for d in map(json.loads, out.splitlines())}
        assert set(answers) == {kit.request_id(i) for i in (1, 2, 3)}
        assert answers[kit.request_id(1)]["metadata"] == {"caller": "ci", "n": 1}
        assert "metadata" not in answers[kit.request_id(2)]
        assert answers[kit.request_id(3)]["error"]["code"] == "unknown_model"

        # all ok, from stdin, one pretty-printed document: exit 0
        pretty = json.dumps(doc(4), indent=2).encode()
        code, out, err = await cli(settings, "send", "-", "--timeout", "60", stdin=pretty)
        assert code == 0, err
        assert [json.loads(x)["request_id"] for x in out.splitlines()] == [kit.request_id(4)]

        await r.wait_for(lambda: len(r.on(names.results)) >= 4)
        for record in r.on(names.results):
            header = dict(record.headers)["request_id"]
            assert header is not None
            assert header.decode() == json.loads(record.value)["request_id"]

        code, out, err = await cli(
            settings, "tail", "--results", "--from-beginning", "--limit", "4"
        )
        assert code == 0, err
        tailed = [json.loads(x)["request_id"] for x in out.splitlines()]
        assert sorted(tailed) == sorted(kit.request_id(i) for i in (1, 2, 3, 4))
        assert await worker.stop() == 0


async def test_a_request_too_large_gets_an_error_result_and_a_dead_letter(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    names = await kit.make_names(make_topics, partitions=1)
    settings = kit.with_health(kit.settings_for(kafka_bootstrap, names, max_request_bytes=8_192))
    big = json.dumps(doc(7, system="x" * 20_000, metadata={"k": "v"})).encode()
    async with kit.InProcessWorker(settings) as worker:
        await worker.wait_ready()
        code, out, err = await cli(settings, "send", "-", "--timeout", "60", stdin=big)
        assert code == 1, err
        (answer,) = map(json.loads, out.splitlines())
        assert answer["request_id"] == kit.request_id(7)
        assert answer["error"]["code"] == "request_too_large"
        assert answer["metadata"] == {"k": "v"}
        code, out, err = await cli(
            settings, "tail", "--dead-letters", "--from-beginning", "--limit", "1"
        )
        assert code == 0, err
        (letter,) = map(json.loads, out.splitlines())
        assert letter["reason_code"] == "request_too_large"
        assert await worker.stop() == 0


async def test_send_without_a_worker_names_what_got_no_answer(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    names = await kit.make_names(make_topics, partitions=1)
    settings = kit.settings_for(kafka_bootstrap, names)
    body = json.dumps(doc(5)).encode()
    code, out, err = await cli(settings, "send", "-", "--timeout", "1", stdin=body)
    assert code == 1
    assert out == ""
    assert "no answer for 'req-00005'" in err
    assert "Traceback" not in err


async def test_send_to_a_missing_topic_is_a_configuration_error(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    names = await kit.make_names(make_topics, partitions=1)
    settings = kit.settings_for(kafka_bootstrap, names).model_copy(
        update={"requests_topic": f"tokenheap-missing-{uuid.uuid4().hex[:12]}"}
    )
    code, _, err = await cli(settings, "send", "-", stdin=json.dumps(doc(1)).encode())
    assert code == 2
    assert "does not exist" in err and "Traceback" not in err


async def test_a_spare_replica_is_ready_and_reports_no_partitions(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    """Two workers, one partition: both ready (members of the group); /status says which
    one owns the partition."""
    names = await kit.make_names(make_topics, partitions=1)
    base = kit.settings_for(kafka_bootstrap, names)
    a_settings, b_settings = kit.with_health(base), kit.with_health(base)
    async with kit.InProcessWorker(a_settings) as a, kit.InProcessWorker(b_settings) as b:
        await a.wait_ready()
        await b.wait_ready()
        owned = []
        for s in (a_settings, b_settings):
            status = await _status(s.health_port)
            assert status["ready"] is True and status["member"] is True
            # every vocabulary the catalog's OpenAI models use is loaded, and says how it counts
            assert set(status["counting"]) >= {"o200k_base", "cl100k_base"}
            assert all(m.endswith(n) for n, m in status["counting"].items())
            owned.extend(status["partitions"])
        assert owned == [f"{names.requests}[0]"]  # exactly one owner
        assert await a.stop() == 0
        assert await b.stop() == 0


async def _status(port: int) -> dict[str, Any]:
    """GET /status until the partitions have settled (a rebalance may be under way)."""
    for _ in range(200):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        raw = await reader.read()
        writer.close()
        body: dict[str, Any] = json.loads(raw.split(b"\r\n\r\n", 1)[1])
        if body["member"]:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError("never a member")


async def test_a_worker_without_its_requests_topic_stops_with_a_clear_error(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    names = await kit.make_names(make_topics, partitions=1)
    missing = f"tokenheap-missing-{uuid.uuid4().hex[:12]}"
    settings = kit.settings_for(kafka_bootstrap, names).model_copy(
        update={"requests_topic": missing}
    )
    code, _, err = await cli(settings, "worker")
    assert code == 2
    assert f"the requests topic {missing!r} does not exist" in err
    assert "TOKENHEAP_CREATE_TOPICS" in err and "Traceback" not in err


class KafkaRecorder(kit.NoopTelemetry):
    """Keeps what the flow reports for the Kafka metrics."""

    def __init__(self) -> None:
        self.source: Callable[[], Any] | None = None
        self.rebalances: list[tuple[str, int]] = []
        self.commits: list[float] = []

    def watch_kafka(self, source: Callable[[], Any]) -> None:
        self.source = source

    def on_rebalance(self, *, kind: str, partitions: int) -> None:
        self.rebalances.append((kind, partitions))

    def on_commit(self, duration_s: float) -> None:
        self.commits.append(duration_s)


async def test_the_flow_reports_lag_assignment_rebalances_and_commits(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    names = await kit.make_names(make_topics, partitions=3)
    settings = kit.with_health(kit.settings_for(kafka_bootstrap, names))
    telemetry = KafkaRecorder()
    n = 12
    async with (
        kit.Reader(kafka_bootstrap, [names.results], names.partitions, committed_only=True) as r,
        kit.InProcessWorker(settings, telemetry=telemetry) as worker,
    ):
        await worker.wait_ready()
        await kit.produce(
            kafka_bootstrap,
            names.requests,
            [kit.request(i) for i in range(n)],
            partition_of=lambda i: i % 3,
        )
        await r.wait_for(lambda: len(r.on(names.results)) >= n)
        assert telemetry.source is not None
        await r.wait_for(lambda: len(telemetry.commits) > 0)
        snap = telemetry.source()
        assert snap.assigned_partitions == 3 and snap.paused_partitions == 0
        assert set(snap.lag) <= {(names.requests, p) for p in range(3)}
        await r.wait_for(lambda: all(v == 0 for v in telemetry.source().lag.values()))
        assert await worker.stop() == 0
    assert telemetry.rebalances == [("assigned", 3)]  # a drain is not a rebalance
    assert all(d >= 0 for d in telemetry.commits)

"""Helpers for the worker's integration tests: requests, topic sets, readers, and the worker
run in-process (a task) or as a real process (`python -m worker worker`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from worker.engine.engine import Engine
from worker.engine.request import AssemblyRequest
from worker.engine.result import FitResult
from worker.engine.stage import SpanLike
from worker.settings import Settings
from worker.stream.service import serve
from worker.telemetry.alerts import AlertMessage
from worker.telemetry.hooks import KafkaHeaders, NoopTelemetry

REPO = Path(__file__).resolve().parents[2]
EXAMPLE: dict[str, Any] = json.loads((REPO / "examples" / "request.json").read_text())
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

# -- requests ---------------------------------------------------------------------------


def request(
    i: int, *, conversation: str | None = None, chunks: int = 3, distinct: bool = False, **over: Any
) -> bytes:
    """The example request under a unique id (model gpt-4o: counted locally); ``distinct``
    makes its query unique too (a Claude payload counted before costs no count call)."""
    doc = dict(EXAMPLE, request_id=f"req-{i:05d}", conversation_id=conversation, **over)
    if distinct:
        doc["query"] = f"{doc['query']} (request {i})"
    doc["chunks"] = [dict(c, id=f"{c['id']}-{k}") for k, c in enumerate(EXAMPLE["chunks"] * 4)][
        :chunks
    ]
    return json.dumps(doc).encode()


def request_id(i: int) -> str:
    return f"req-{i:05d}"


# -- topics and settings ----------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    requests: str
    results: str
    alerts: str
    dlq: str
    group: str
    partitions: int


async def make_names(make_topics: Callable[..., Awaitable[list[str]]], partitions: int) -> Names:
    req, res, alerts, dlq = await make_topics(4, partitions=partitions, prefix="w")
    return Names(req, res, alerts, dlq, f"{req}-group", partitions)


def settings_for(bootstrap: str, names: Names, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": names.group,
        "requests_topic": names.requests,
        "results_topic": names.results,
        "alerts_topic": names.alerts,
        "dead_letter_topic": names.dlq,
        "health_port": 0,
        "commit_interval_s": 0.3,
        "drain_timeout_s": 15.0,
    }
    values.update(over)
    return Settings(**values)


def with_health(settings: Settings) -> Settings:
    """The same settings with a free health port of its own (one per worker)."""
    return settings.model_copy(update={"health_port": free_port()})


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of a worker process with exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENHEAP_")}
    for name, value in settings.model_dump(exclude_none=True).items():
        if name in Settings.model_fields and value != Settings.model_fields[name].default:
            env[f"TOKENHEAP_{name.upper()}"] = str(value)
    env["OTEL_SDK_DISABLED"] = "true"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- producing and reading ---------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    partition: int
    offset: int


async def produce(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes | None],
    *,
    partition_of: Callable[[int], int] = lambda i: 0,
    headers: Sequence[tuple[str, bytes]] = (),
    pace_s: float = 0.0,
) -> list[Sent]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        out = []
        for i, value in enumerate(values):
            md = await producer.send_and_wait(
                topic, value, key=b"k%d" % i, partition=partition_of(i), headers=list(headers)
            )
            out.append(Sent(md.partition, md.offset))
            if pace_s:
                await asyncio.sleep(pace_s)
        return out
    finally:
        await producer.stop()


def stream(
    bootstrap: str, topic: str, n: int, *, partitions: int, pace_s: float = 0.0, **over: Any
) -> asyncio.Task[list[Sent]]:
    """Requests 0..n-1, round-robin over the partitions, as a background task."""
    return asyncio.create_task(
        produce(
            bootstrap,
            topic,
            [request(i, **over) for i in range(n)],
            partition_of=lambda i: i % partitions,
            pace_s=pace_s,
        )
    )


class Reader:
    """Reads topics from the beginning (no group) in the background; wait on a condition."""

    def __init__(
        self, bootstrap: str, topics: Sequence[str], partitions: int, *, committed_only: bool
    ) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed" if committed_only else "read_uncommitted",
        )
        self._tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        self.records: list[ConsumerRecord[bytes, bytes]] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Reader:
        await self._consumer.start()
        self._consumer.assign(self._tps)
        await self._consumer.seek_to_beginning(*self._tps)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            for records in batch.values():
                self.records.extend(records)
            if batch:
                self._changed.set()

    def on(self, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
        return [r for r in self.records if r.topic == topic]

    def json(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in self.on(topic)]

    def ids(self, topic: str) -> list[str]:
        return [d["request_id"] for d in self.json(topic)]

    async def wait_for(self, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not check():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.5)


async def committed_offsets(bootstrap: str, group: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items()}


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {tp.partition: o for tp, o in ends.items()}


async def http_status(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return int(line.split()[1])


# -- telemetry and engine doubles -------------------------------------------------------


@dataclass
class RecordingTelemetry(NoopTelemetry):
    """Counts records being processed (overall and per partition); one alert per ok result;
    a fixed traceparent on every outgoing message."""

    active: int = 0
    max_active: int = 0
    active_by_partition: dict[int, int] = field(default_factory=dict)
    max_by_partition: dict[int, int] = field(default_factory=dict)
    processed: list[tuple[int, int]] = field(default_factory=list)
    dead_letters: list[str] = field(default_factory=list)

    @contextmanager
    def process(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        group: str,
        key: bytes | None,
        headers: KafkaHeaders,
    ) -> Iterator[SpanLike]:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        n = self.active_by_partition.get(partition, 0) + 1
        self.active_by_partition[partition] = n
        self.max_by_partition[partition] = max(self.max_by_partition.get(partition, 0), n)
        self.processed.append((partition, offset))
        try:
            with super().process(
                topic=topic, partition=partition, offset=offset, group=group, key=key,
                headers=headers,
            ) as span:  # fmt: skip
                yield span
        finally:
            self.active -= 1
            self.active_by_partition[partition] -= 1

    def on_result(
        self, req: AssemblyRequest | None, result: FitResult, duration_s: float
    ) -> list[AlertMessage]:
        if result.status != "ok":
            return []
        return [
            AlertMessage(
                kind="request",
                type="test_alert",
                message="one per ok result",
                request_id=result.request_id,
                model=result.model,
                at=datetime.now(UTC),
            )
        ]

    def on_dead_letter(self, *, reason_code: str, topic: str) -> None:
        self.dead_letters.append(reason_code)

    def outgoing_headers(self) -> list[tuple[str, bytes]]:
        return [("traceparent", TRACEPARENT)]


class DelayedEngine(Engine):
    """The real engine, after a per-request pause (to force completions out of order)."""

    def __init__(self, base: Engine, delay: Callable[[AssemblyRequest], float]) -> None:
        super().__init__(**{f.name: getattr(base, f.name) for f in fields(base) if f.init})
        self.delay = delay

    async def fit(self, req: AssemblyRequest) -> FitResult:
        await asyncio.sleep(self.delay(req))
        return await Engine.fit(self, req)


# -- running the worker ------------------------------------------------------------------


class InProcessWorker:
    """`serve()` as a task of the test's event loop; `stop()` drains and returns its code."""

    def __init__(
        self,
        settings: Settings,
        *,
        telemetry: NoopTelemetry | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.stop_event = asyncio.Event()
        self._task = asyncio.create_task(
            serve(settings, stop=self.stop_event, telemetry=telemetry, engine=engine)
        )

    async def stop(self, timeout_s: float = 60.0) -> int:
        self.stop_event.set()
        return await self.wait(timeout_s)

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until /readyz answers 200 (needs a health port in the settings)."""
        await self._wait_for_200("/readyz", timeout_s)

    async def wait_live(self, timeout_s: float = 30.0) -> None:
        await self._wait_for_200("/livez", timeout_s)

    async def _wait_for_200(self, path: str, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while True:
                if self._task.done():
                    raise AssertionError(f"the worker stopped: {self._task.result()}")
                with contextlib.suppress(OSError, IndexError, ValueError):
                    if await http_status(self.settings.health_port, path) == 200:
                        return
                await asyncio.sleep(0.05)

    async def wait(self, timeout_s: float) -> int:
        """The exit code, once `serve()` returns by itself (or is stopped)."""
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(self._task)

    async def __aenter__(self) -> InProcessWorker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._task.done():
            await self.stop()
        elif not self._task.cancelled():
            self._task.exception()  # retrieved: a failure shows in the test, not as noise


async def run_cli(settings: Settings, *args: str, timeout_s: float = 60.0) -> tuple[int, str]:
    """`python -m worker <args>` with these settings: (exit code, stdout)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args,
        env=worker_env(settings), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(timeout_s):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


class WorkerProcess:
    """`python -m worker worker` with TOKENHEAP_* settings, its log in a file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.port = settings.health_port
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "worker"],
            env=worker_env(settings),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, IndexError, ValueError):
                if await http_status(self.port, "/readyz") == 200:
                    return
            await asyncio.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout_s} s:\n{self.log_tail()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    async def terminate(self, timeout_s: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout_s)

    async def wait_log(self, text: str, timeout_s: float = 30.0) -> None:
        """Until ``text`` shows up in the log (the process must not exit first)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the log:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    async def wait(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"worker did not exit in {timeout_s} s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)
        self._log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

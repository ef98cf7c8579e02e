"""The worker on Kafka: throughput and end-to-end latency, against a bare aiokafka
consume -> produce passthrough on the same broker, topics layout and messages; 1 vs 2
worker processes, and 2 started apart vs 2 forked from one (`TOKENHEAP_PROCESSES=2`).

    python -m benchmarks.kafka_bench [--requests 8000] [--latency-requests 1000]
                                     [--base-tree DIR] [--rounds 1]

It starts its own single-node broker (ops/kafka/broker.py). Requests are built from real
text (benchmarks/corpus.py): a shared system prompt, 6 history turns, 8 retrieved chunks and
a query, about 12 KB each, model gpt-4o (counted locally).

throughput  N requests are loaded first, then the system starts; the rate counts outputs from
            the moment every process owns partitions (group joins and the rebalance a
            second worker causes do not count) up to 90% of them (nor does the tail).
latency     the system runs idle, then requests arrive at a fixed rate; time from send to
            the output arriving at a read_committed reader in this process; p50 and p99. Two
            rates, the same for every system: half the slowest plain worker's throughput
            (those keep up; the exactly-once and exporting rows may not), and half the
            passthrough's (the goal: a worker that keeps up there has at least half the
            passthrough's throughput).
--base-tree another checkout of tokenheap (e.g. `git worktree add --detach DIR <commit>`):
            its worker runs beside this tree's, rows interleaved, each system started with
            PYTHONPATH and the working directory of its own tree.
--rounds    every measurement repeated, the systems interleaved in each round (a base tree's
            system and this tree's swap places every other round); medians.
All worker rows but the exactly-once one are at-least-once (acked produce, then commit);
the exactly-once row shows what transactions cost (results become visible when the
transaction commits, once per commit interval). Workers run with OTEL_SDK_DISABLED=true but
the "exporting OTLP" row, whose worker sends its traces and metrics over OTLP/HTTP to a
local endpoint that reads and discards them (a collector's own work left out): what
telemetry costs the worker. CPU per request is the system's processes' user + system time
(Linux /proc; a forked worker's children included) over the counted throughput window,
divided by the outputs in it: steadier than a rate on a shared machine. Memory is their
proportional set size together, halfway through the outputs (a page shared by a forked
worker's children counts once over them). Figures are machine-bound (2 cores share the broker, the
systems and this driver): quote ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.corpus import passage  # noqa: E402
from benchmarks.load import load_file  # noqa: E402

PARTITIONS = 6
READY_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 600.0
MIN_WINDOW_S = 0.5
"""Shortest counted window a throughput is worth quoting from (the passthrough gets through
the middle 80% of 12,000 requests in about a second)."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CPU_SAMPLE_S = 0.05
"""How often a system's CPU time is read during a throughput run."""


# -- workload ---------------------------------------------------------------------------


def build_request(i: int, prefix: str = "bench") -> bytes:
    """A realistic RAG request: shared system prompt, history, ranked chunks, a query."""
    history = [
        {"role": "user" if k % 2 == 0 else "assistant", "content": passage(i * 7 + k, 300)}
        for k in range(6)
    ]
    chunks = [
        {"id": f"doc-{(i * 11 + k) % 997}", "text": passage(i * 11 + k + 400, 1200)}
        for k in range(8)
    ]
    doc = {
        "request_id": f"{prefix}-{i:06d}",  # also the message key: results are keyed by it
        "model": "gpt-4o",
        "system": passage(3, 600),
        "history": history,
        "chunks": chunks,
        "query": passage(i * 5 + 900, 160)[:200],
        "budget": {"max_context_tokens": 8192},
    }
    return json.dumps(doc).encode()


# -- broker helpers ---------------------------------------------------------------------


def load_broker() -> ModuleType:
    return load_file("tokenheap_ops_kafka_broker", "ops/kafka/broker.py")


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        async with asyncio.timeout(30):
            while True:
                described = await admin.describe_topics(list(names))
                if all(
                    t["error_code"] == 0
                    and len(t["partitions"]) == partitions
                    and all(p["leader"] >= 0 for p in t["partitions"])
                    for t in described
                ):
                    return
                await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def produce_all(bootstrap: str, topic: str, values: Sequence[bytes]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        futures = []
        for i, value in enumerate(values):
            key = f"bench-{i:06d}".encode()
            futures.append(await producer.send(topic, value, key=key, partition=i % PARTITIONS))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def produce_paced(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes],
    rate: float,
    sent_at: dict[bytes, float],
    prefix: str,
) -> None:
    """Open loop: message i leaves at start + i / rate, whatever the system does."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        futures = []
        start = time.perf_counter()
        for i, value in enumerate(values):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            key = f"{prefix}-{i:06d}".encode()
            sent_at[key] = time.perf_counter()
            futures.append(await producer.send(topic, value, key=key, partition=i % PARTITIONS))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class Arrivals:
    """Reads the output topic from the beginning; when each key first arrived."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        self._tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        self.at: dict[bytes, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Arrivals:
        await self._consumer.start()
        self._consumer.assign(self._tps)
        await self._consumer.seek_to_beginning(*self._tps)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batch.values():
                for r in records:
                    self.at.setdefault(r.key, now)

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            while True:
                if len(self.at) >= count:
                    return
                await asyncio.sleep(0.05)


# -- the systems ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Topics:
    src: str
    dst: str
    alerts: str
    dlq: str
    group: str


class System:
    """`processes` copies of one contender, each a child process; or, `forked`, one worker
    process with `TOKENHEAP_PROCESSES=processes` (its children forked from it)."""

    def __init__(
        self,
        kind: str,
        processes: int,
        bootstrap: str,
        logs: Path,
        tree: Path | None = None,
        otel: dict[str, str] | None = None,
        forked: bool = False,
    ) -> None:
        self.kind = kind
        self.processes = processes
        self.forked = forked
        self._children: list[int] = []
        self.bootstrap = bootstrap
        self.logs = logs
        self.tree = tree
        """Another checkout whose worker this is (None: this tree's)."""
        self.otel = otel
        """A worker's OTEL_* variables (None: OTEL_SDK_DISABLED=true)."""
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []

    @property
    def label(self) -> str:
        name = {
            "passthrough": "aiokafka passthrough",
            "worker": "tokenheap worker",
            "worker-eos": "tokenheap worker, exactly-once",
            "worker-otlp": "tokenheap worker, exporting OTLP",
        }[self.kind]
        base = f" ({self.tree.name})" if self.tree is not None else ""
        forked = ", forked" if self.forked else ""
        return f"{name}{base}{forked} x{self.processes}"

    def pids(self) -> list[int]:
        """Every process of the system: a forked worker's children too, once they exist."""
        pids = [p.pid for p in self.procs]
        if self.forked and len(self._children) < self.processes:
            self._children = children_of(pids)
        return pids + self._children

    def start(self, t: Topics) -> None:
        self._children = []
        for n in range(1 if self.forked else self.processes):
            log = open(self.logs / f"{self.kind}-{n}-{t.group}.log", "wb")  # noqa: SIM115
            cwd = ROOT
            if self.kind.startswith("worker"):
                port = free_port()
                self.ports.append(port)
                env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENHEAP_")}
                env.update(
                    TOKENHEAP_BOOTSTRAP_SERVERS=self.bootstrap,
                    TOKENHEAP_GROUP_ID=t.group,
                    TOKENHEAP_REQUESTS_TOPIC=t.src,
                    TOKENHEAP_RESULTS_TOPIC=t.dst,
                    TOKENHEAP_ALERTS_TOPIC=t.alerts,
                    TOKENHEAP_DEAD_LETTER_TOPIC=t.dlq,
                    TOKENHEAP_HEALTH_PORT=str(port),
                    OTEL_SDK_DISABLED="true",
                )
                if self.kind == "worker-eos":
                    env["TOKENHEAP_DELIVERY"] = "exactly-once"
                if self.forked:
                    env["TOKENHEAP_PROCESSES"] = str(self.processes)
                if self.otel is not None:
                    env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
                    if "OTEL_EXPORTER_OTLP_ENDPOINT" in self.otel:
                        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
                    env.update(self.otel)
                if self.tree is not None:
                    env["PYTHONPATH"] = str(self.tree)
                    cwd = self.tree
                cmd = [sys.executable, "-m", "worker", "worker"]
            else:
                env = dict(os.environ)
                cmd = [
                    sys.executable, "-m", "benchmarks.kafka_bench", "passthrough",
                    "--bootstrap", self.bootstrap, "--src", t.src, "--dst", t.dst,
                    "--group", t.group, "--ready-file", str(self._ready_file(t, n)),
                ]  # fmt: skip
            self.procs.append(
                subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
            )
            log.close()

    async def ready(self, t: Topics) -> None:
        """Every process owns partitions (health endpoint / the group's assignment)."""
        async with asyncio.timeout(READY_TIMEOUT_S):
            while not await self._all_ready(t):
                for p in self.procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"{self.label} exited {p.returncode}")
                await asyncio.sleep(0.2)

    async def _all_ready(self, t: Topics) -> bool:
        if self.kind.startswith("worker"):
            for port in self.ports:
                with contextlib.suppress(OSError, IndexError, ValueError):
                    if await http_status(port, "/readyz") == 200:
                        continue
                return False
            return True
        return all(self._ready_file(t, n).exists() for n in range(self.processes))

    async def warm(self) -> None:
        """Every process counts at full speed: a worker's vocabularies have switched to the
        backend it loads behind (its /status `counting`; a tree without it is warm once
        ready)."""
        if not self.kind.startswith("worker"):
            return
        async with asyncio.timeout(READY_TIMEOUT_S):
            for port in self.ports:
                while True:
                    with contextlib.suppress(OSError, IndexError, ValueError):
                        counting = (await http_json(port, "/status")).get("counting", {})
                        if not any(m.startswith("tiktoken:") for m in counting.values()):
                            break
                    await asyncio.sleep(0.2)

    def _ready_file(self, t: Topics, n: int) -> Path:
        return self.logs / f"{t.group}-{n}.ready"

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs.clear()
        self.ports.clear()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """(status, body) of one GET to the health endpoint."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def http_status(port: int, path: str) -> int:
    return (await http_get(port, path))[0]


async def http_json(port: int, path: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((await http_get(port, path))[1])
    return doc


# -- measurements -----------------------------------------------------------------------


_seq = iter(range(10**6))


async def fresh_topics(bootstrap: str) -> Topics:
    tag = f"{os.getpid()}-{next(_seq)}"
    t = Topics(f"src-{tag}", f"dst-{tag}", f"alerts-{tag}", f"dlq-{tag}", f"bench-{tag}")
    await create_topics(bootstrap, [t.src, t.dst, t.alerts, t.dlq], PARTITIONS)
    return t


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds these processes have used so far (Linux /proc; a process
    that is gone, or a system without /proc, counts 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def children_of(pids: Sequence[int]) -> list[int]:
    """The processes whose parent is one of `pids` (Linux /proc; none elsewhere)."""
    parents = set(pids)
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) in parents:
                found.append(int(stat.parent.name))
    return found


def pss_mib(pids: Sequence[int]) -> float:
    """The proportional set size of these processes together, MiB: each shared page counted
    once over all that share it (Linux smaps_rollup; 0 where unreadable). A forked worker's
    children share the pages their parent filled before the fork (the vocabularies); apart,
    only file-backed pages such as shared libraries are shared."""
    kib = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    kib += int(line.split()[1])
    return kib / 1024


class CpuTrace:
    """The system's CPU seconds sampled while it runs, read back at any moment in between."""

    def __init__(self, pids: Callable[[], Sequence[int]]) -> None:
        self._pids = pids
        """Asked at every sample: a forked worker's children appear after it starts."""
        self.at: list[float] = []
        self.cpu: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> CpuTrace:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            self.at.append(time.perf_counter())
            self.cpu.append(cpu_seconds(self._pids()))
            await asyncio.sleep(CPU_SAMPLE_S)

    def between(self, start: float, end: float) -> float:
        """CPU seconds used from `start` to `end`, each read at the first sample at or after
        it (both edges late by under CPU_SAMPLE_S, alike)."""

        def near(t: float) -> float:
            i = min(bisect.bisect_left(self.at, t), len(self.at) - 1)
            return self.cpu[i]

        return near(end) - near(start) if self.at else 0.0


@dataclass(frozen=True)
class Throughput:
    rate: float
    """Requests per second, over the counted window."""
    ready_s: float
    """Seconds from start to ready, and (next) to full speed."""
    warm_s: float
    cpu_ms: float
    """CPU of the system's processes per request over the window."""
    pss_mib: float
    """Memory of the system's processes together, halfway through the outputs."""


async def throughput(system: System, values: Sequence[bytes]) -> Throughput:
    """The rate from a preloaded backlog, counted once every process owns partitions (a
    second worker joining triggers a rebalance) and counts at full speed (a worker's
    fastokens loads behind it), up to 90% of the outputs; the CPU of the system's processes
    over the same window; their memory (proportional set size) halfway."""
    t = await fresh_topics(system.bootstrap)
    await produce_all(system.bootstrap, t.src, values)
    async with Arrivals(system.bootstrap, t.dst) as out:
        started = time.perf_counter()
        system.start(t)
        try:
            with CpuTrace(system.pids) as cpu:
                await system.ready(t)
                ready_at = time.perf_counter()
                await system.warm()
                warm_at = time.perf_counter()
                await out.wait(len(values) // 2)
                pss = pss_mib(system.pids())  # mid-window, every vocabulary loaded
                await out.wait(len(values))
        finally:
            system.stop()
    times = sorted(out.at.values())
    start = max(warm_at, times[int(len(times) * 0.1)])
    end = times[int(len(times) * 0.9)]
    counted = sum(1 for x in times if start < x <= end)
    if end - start < MIN_WINDOW_S or counted < len(values) // 4:
        raise RuntimeError(
            f"{system.label}: only {counted} outputs after all processes were ready; "
            "raise --requests"
        )
    cpu_ms = 1000 * cpu.between(start, end) / counted
    return Throughput(counted / (end - start), ready_at - started, warm_at - started, cpu_ms, pss)


async def latency(system: System, values: Sequence[bytes], rate: float) -> tuple[float, float]:
    """(p50, p99) ms from send to output, at a fixed arrival rate, after a warm-up."""
    t = await fresh_topics(system.bootstrap)
    sent_at: dict[bytes, float] = {}
    warm = max(20, len(values) // 10)
    async with Arrivals(system.bootstrap, t.dst) as out:
        system.start(t)
        try:
            await system.ready(t)
            await system.warm()
            warm_values = [build_request(i, "warm") for i in range(warm)]
            await produce_paced(system.bootstrap, t.src, warm_values, rate, {}, "warm")
            await out.wait(warm)
            await produce_paced(system.bootstrap, t.src, values, rate, sent_at, "bench")
            await out.wait(warm + len(values))
        finally:
            system.stop()
    ms = sorted((out.at[k] - sent_at[k]) * 1000 for k in sent_at)
    return statistics.median(ms), ms[min(len(ms) - 1, int(len(ms) * 0.99))]


@dataclass
class Row:
    label: str
    kind: str
    rate: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    half_p50: float = 0.0
    """Latency at half the passthrough's throughput."""
    half_p99: float = 0.0
    ready: float = 0.0
    """Seconds from the process start to ready (/readyz), median."""
    warm: float = 0.0
    """... and to counting at full speed (fastokens loaded behind), median."""
    cpu_ms: float = 0.0
    """CPU of the system's processes per request over the throughput window, median."""
    pss_mib: float = 0.0
    """Their memory together (proportional set size) halfway through, median."""


KINDS = ("worker", "worker-eos", "worker-otlp")


def contenders(
    bootstrap: str,
    logs: Path,
    base: Path | None,
    otlp_endpoint: str,
    kinds: Sequence[str] = KINDS,
) -> list[System]:
    """The passthrough, then each worker configuration of `kinds`: the base tree's (if
    given) right before this tree's, so the two are measured next to each other."""
    systems = [System("passthrough", 1, bootstrap, logs)]
    exporting = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint}
    configs = (("worker", 1), ("worker", 2), ("worker-eos", 1), ("worker-otlp", 1))
    trees = (base, None) if base is not None else (None,)
    for kind, processes in configs:
        if kind not in kinds:
            continue
        otel = exporting if kind == "worker-otlp" else None
        for tree in trees:
            systems.append(System(kind, processes, bootstrap, logs, tree, otel))
        if (kind, processes) == ("worker", 2):
            for tree in trees:  # a base tree from before TOKENHEAP_PROCESSES has no such row
                if tree is None or (tree / "worker" / "stream" / "processes.py").exists():
                    systems.append(System(kind, processes, bootstrap, logs, tree, forked=True))
    return systems


def round_order(systems: Sequence[System], r: int) -> list[int]:
    """The order systems run in round `r`: as listed in even rounds; in odd ones each base
    tree's system and this tree's swap places, so neither always runs right after the
    other (an order effect of the machine then cancels in the medians instead of siding
    with one tree: one run showed a 2x latency difference that alternating removed)."""
    order = list(range(len(systems)))
    if r % 2:
        for i in range(len(systems) - 1):
            a, b = systems[i], systems[i + 1]
            pair = (a.kind, a.processes) == (b.kind, b.processes)
            if pair and a.tree is not None and b.tree is None:
                order[i], order[i + 1] = i + 1, i
    return order


async def bench(
    bootstrap: str,
    n: int,
    n_latency: int,
    logs: Path,
    base: Path | None = None,
    rounds: int = 1,
    otlp_endpoint: str = "",
    kinds: Sequence[str] = KINDS,
) -> list[Row]:
    values = [build_request(i) for i in range(n)]
    size = statistics.mean(len(v) for v in values)
    print(f"{n} requests, {size / 1024:.1f} KB each on average, {PARTITIONS} partitions")
    systems = contenders(bootstrap, logs, base, otlp_endpoint, kinds)
    rows = [Row(s.label, s.kind) for s in systems]
    rates: list[list[Throughput]] = [[] for _ in systems]
    for r in range(rounds):
        for i in round_order(systems, r):
            system, seen = systems[i], rates[i]
            run = await throughput(system, values)
            seen.append(run)
            print(
                f"  throughput  {system.label:<40} {run.rate:8.0f} req/s  "
                f"{run.cpu_ms:.3f} CPU ms/req  {run.pss_mib:6.0f} MiB  (ready in "
                f"{run.ready_s:.1f} s, full speed in {run.warm_s:.1f} s)"
            )
    for row, seen in zip(rows, rates, strict=True):
        row.rate = statistics.median(x.rate for x in seen)
        row.ready = statistics.median(x.ready_s for x in seen)
        row.warm = statistics.median(x.warm_s for x in seen)
        row.cpu_ms = statistics.median(x.cpu_ms for x in seen)
        row.pss_mib = statistics.median(x.pss_mib for x in seen)
    slowest = 0.5 * min(r.rate for r in rows if r.kind == "worker")
    half = 0.5 * rows[0].rate
    for at_half, rate, what in (
        (False, slowest, "half the slowest throughput"),
        (True, half, "half the passthrough's"),
    ):
        print(f"latency at {rate:.0f} req/s ({what})")
        seen_ms: list[list[tuple[float, float]]] = [[] for _ in systems]
        for r in range(rounds):
            for i in round_order(systems, r):
                system, pairs = systems[i], seen_ms[i]
                p50, p99 = await latency(system, values[:n_latency], rate)
                pairs.append((p50, p99))
                print(f"  latency     {system.label:<40} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms")
        for row, pairs in zip(rows, seen_ms, strict=True):
            p50 = statistics.median(x[0] for x in pairs)
            p99 = statistics.median(x[1] for x in pairs)
            if at_half:
                row.half_p50, row.half_p99 = p50, p99
            else:
                row.p50, row.p99 = p50, p99
    return rows


def table(rows: list[Row]) -> str:
    base = rows[0]
    slowest = 0.5 * min(r.rate for r in rows if r.kind == "worker")
    lines = [
        f"| system | req/s | vs passthrough | CPU ms / request | CPU vs passthrough | p50 ms "
        f"| p99 ms | p50 vs passthrough | p50 / p99 ms at {base.rate / 2:.0f} req/s "
        "| start to ready | to full speed | memory (PSS) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cpu_x = r.cpu_ms / base.cpu_ms if base.cpu_ms else 0.0
        lines.append(
            f"| {r.label} | {r.rate:.0f} | {r.rate / base.rate:.2f}x | {r.cpu_ms:.3f} | "
            f"{cpu_x:.2f}x | {r.p50:.1f} | {r.p99:.1f} | {r.p50 / base.p50:.2f}x | "
            f"{r.half_p50:.1f} / {r.half_p99:.1f} | {r.ready:.1f} s | {r.warm:.1f} s | "
            f"{r.pss_mib:.0f} MiB |"
        )
    lines.append("")
    lines.append(
        f"p50, p99 at {slowest:.0f} req/s (half the slowest plain at-least-once worker's "
        "throughput); the next column at half the passthrough's throughput."
    )
    by_label = {r.label: r for r in rows}
    for suffix in sorted({r.label.split(" x")[0].removeprefix("tokenheap worker") for r in rows
                          if r.kind == "worker" and ", forked" not in r.label}):  # fmt: skip
        one = by_label[f"tokenheap worker{suffix} x1"]
        two = by_label[f"tokenheap worker{suffix} x2"]
        lines.append(
            f"2 workers / 1 worker{suffix}: throughput {two.rate / one.rate:.2f}x, "
            f"p50 {two.p50 / one.p50:.2f}x, p99 {two.p99 / one.p99:.2f}x"
        )
    forked, apart = by_label.get("tokenheap worker, forked x2"), by_label["tokenheap worker x2"]
    if forked is not None:
        ratios = {
            "throughput": forked.rate / apart.rate,
            "CPU per request": forked.cpu_ms / apart.cpu_ms,
            "memory": forked.pss_mib / apart.pss_mib,
            "start to ready": forked.ready / apart.ready,
        }
        said = ", ".join(f"{what} {x:.2f}x" for what, x in ratios.items())
        lines.append(f"TOKENHEAP_PROCESSES=2 / 2 workers started apart: {said}")
    return "\n".join(lines)


# -- the OTLP endpoint ------------------------------------------------------------------


class _Discard(BaseHTTPRequestHandler):
    """Reads an OTLP/HTTP export and answers 200 with an empty (valid) protobuf response,
    keeping the connection open as a collector would (the exporter reuses one session)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def otlp_sink(port_file: Path) -> None:
    """(internal) An OTLP/HTTP endpoint in a process of its own: what the worker pays to
    export its telemetry, without a collector's own work in the figures."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Discard)
    port_file.write_text(str(server.server_address[1]))
    server.serve_forever()


@contextlib.contextmanager
def sink_process(logs: Path) -> Iterator[str]:
    """Starts `otlp_sink` as a child; yields its endpoint URL."""
    port_file = logs / "otlp-sink.port"
    cmd = [sys.executable, "-m", "benchmarks.kafka_bench", "otlp-sink", "--port-file"]
    proc = subprocess.Popen([*cmd, str(port_file)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the OTLP sink did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port_file.read_text()}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- the passthrough contender ----------------------------------------------------------


async def passthrough(bootstrap: str, src: str, dst: str, group: str, ready: Path) -> None:
    """Bare consume -> produce -> commit, at least once: the floor the worker is judged by."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    consumer = AIOKafkaConsumer(
        src,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=500,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        max_batch_size=256 * 1024,
        linger_ms=2,
    )
    await producer.start()
    await consumer.start()
    pending: dict[TopicPartition, int] = {}
    next_commit = loop.time() + 1.0
    signalled = False
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            if consumer.assignment() and not signalled:
                signalled = True
                os.close(os.open(ready, os.O_CREAT | os.O_WRONLY))
            futures = []
            for tp, records in batch.items():
                for r in records:
                    futures.append(await producer.send(dst, r.value, key=r.key))
                pending[tp] = records[-1].offset + 1
            await asyncio.gather(*futures)
            if pending and loop.time() >= next_commit:
                await consumer.commit(dict(pending))
                pending.clear()
                next_commit = loop.time() + 1.0
        if pending:
            await consumer.commit(dict(pending))
    finally:
        await consumer.stop()
        await producer.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    pt = sub.add_parser("passthrough", help="(internal) run the passthrough contender")
    pt.add_argument("--bootstrap", required=True)
    pt.add_argument("--src", required=True)
    pt.add_argument("--dst", required=True)
    pt.add_argument("--group", required=True)
    pt.add_argument("--ready-file", type=Path, required=True)
    sk = sub.add_parser("otlp-sink", help="(internal) an OTLP/HTTP endpoint that discards")
    sk.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--latency-requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--base-tree",
        type=Path,
        help="another tokenheap checkout whose worker runs beside this one's",
    )
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help="the worker configurations to run, comma-separated (default: all of "
        f"{', '.join(KINDS)}); the passthrough and the plain worker always run (latency "
        "is measured at half the slowest plain worker's throughput)",
    )
    args = parser.parse_args(argv)
    kinds = ["worker", *(k for k in args.kinds.split(",") if k and k != "worker")]
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"--kinds: unknown {', '.join(sorted(unknown))}")
    if args.cmd == "passthrough":
        asyncio.run(passthrough(args.bootstrap, args.src, args.dst, args.group, args.ready_file))
        return 0
    if args.cmd == "otlp-sink":
        otlp_sink(args.port_file)
        return 0
    broker_module = load_broker()
    with (
        tempfile.TemporaryDirectory(prefix="kafka-bench-") as tmp,
        broker_module.Broker() as b,
        sink_process(Path(tmp)) as otlp,
    ):
        print(f"broker {b.bootstrap} (started in {b.startup_seconds:.1f} s)")
        rows = asyncio.run(
            bench(
                b.bootstrap,
                args.requests,
                args.latency_requests,
                Path(tmp),
                args.base_tree,
                args.rounds,
                otlp,
                kinds,
            )
        )
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

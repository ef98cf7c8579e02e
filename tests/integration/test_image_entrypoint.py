"""The image's entrypoint as the container runs it, without Docker, against the real broker.

argv is ENTRYPOINT + CMD parsed from ./Dockerfile (exec form; the console script from this
environment's bin/ stands in for /opt/tokenheap/bin). The environment is what the container
gets: the Dockerfile's ENV (TOKENHEAP_*, OTEL_*, PYTHON*), then the compose file's `worker`
environment over it, with only what cannot be the same outside the compose network replaced:

    TOKENHEAP_BOOTSTRAP_SERVERS   the test broker (fixture kafka_bootstrap), not kafka:9092
    TOKENHEAP_HEALTH_PORT         a free port, not 8080 (swapped into the health checks too)
    TOKENHEAP_*_TOPIC, _GROUP_ID  fresh names, created as kafka-init creates them
    OTEL_EXPORTER_OTLP_ENDPOINT   a local OTLP/HTTP receiver, not otel-collector:4318

Checked: /livez and /readyz answer 200 and both health-check commands (the compose one and
the image's HEALTHCHECK) pass against the live worker; a request produced to the requests
topic comes back fitted on the results topic; the worker's spans and metrics reach the OTLP
endpoint under the compose service name; SIGTERM ends it with 0 within stop_grace_period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support import otlp_receiver

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = json.loads((ROOT / "examples" / "request.json").read_text(encoding="utf-8"))
TOPIC_VARS = {
    "TOKENHEAP_REQUESTS_TOPIC": "req",
    "TOKENHEAP_RESULTS_TOPIC": "res",
    "TOKENHEAP_ALERTS_TOPIC": "alerts",
    "TOKENHEAP_DEAD_LETTER_TOPIC": "dlq",
}


# -- what the image and the compose file say ------------------------------------------------


def dockerfile_final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) after the last FROM, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    logical, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    parsed = [(s.split(None, 1)[0].upper(), s.split(None, 1)[1]) for s in logical]
    last_from = max(i for i, (ins, _) in enumerate(parsed) if ins == "FROM")
    return parsed[last_from + 1 :]


def image_argv() -> list[str]:
    stage = dockerfile_final_stage()
    entrypoint = [json.loads(v) for ins, v in stage if ins == "ENTRYPOINT"][-1]
    cmd = [json.loads(v) for ins, v in stage if ins == "CMD"][-1]
    return [*entrypoint, *cmd]


def image_env() -> dict[str, str]:
    """ENV of the final stage (KEY=VALUE form), only the variables that mean the same here."""
    env: dict[str, str] = {}
    for ins, args in dockerfile_final_stage():
        if ins == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                if key.startswith(("TOKENHEAP_", "OTEL_", "PYTHON")):
                    env[key] = value
    return env


def image_healthcheck() -> list[str]:
    args = next(v for ins, v in dockerfile_final_stage() if ins == "HEALTHCHECK")
    return list(json.loads(args.split(" CMD ", 1)[1]))


def compose_worker() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    return doc["services"]["worker"]  # type: ignore[no-any-return]


def compose_env(service: str = "worker") -> dict[str, str]:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    return {k: str(v) for k, v in doc["services"][service]["environment"].items()}


def grace_seconds() -> float:
    value = str(compose_worker()["stop_grace_period"])
    match = re.fullmatch(r"(\d+)s", value)
    assert match, f"stop_grace_period {value!r}: expected seconds"
    return float(match[1])


# -- the running worker -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    port: int
    compose_port: int
    partitions: int
    bootstrap: str
    receiver: Any
    log_path: Path

    @property
    def requests_topic(self) -> str:
        return self.env["TOKENHEAP_REQUESTS_TOPIC"]

    @property
    def results_topic(self) -> str:
        return self.env["TOKENHEAP_RESULTS_TOPIC"]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    """As kafka-init does, then wait until every partition has a leader."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        async with asyncio.timeout(30):
            while True:
                described = await admin.describe_topics(names)
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


@pytest.fixture(scope="module")
def worker(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    argv = image_argv()
    executable = Path(sys.executable).parent / argv[0]
    assert executable.exists(), f"{argv[0]} is not installed in {executable.parent}"
    compose = compose_env()
    run = uuid.uuid4().hex[:10]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENHEAP_", "OTEL_"))}
    env.update(image_env())
    env.update(compose)
    env.update({var: f"tokenheap-image-{suffix}-{run}" for var, suffix in TOPIC_VARS.items()})
    env["TOKENHEAP_GROUP_ID"] = f"tokenheap-image-{run}"
    env["TOKENHEAP_BOOTSTRAP_SERVERS"] = kafka_bootstrap
    env["TOKENHEAP_HEALTH_PORT"] = str(port)
    env["PATH"] = f"{executable.parent}{os.pathsep}{env.get('PATH', '')}"
    partitions = int(compose_env("kafka-init")["TOKENHEAP_TOPIC_PARTITIONS"])
    asyncio.run(create_topics(kafka_bootstrap, [env[v] for v in TOPIC_VARS], partitions))
    log_path = tmp_path_factory.mktemp("image-entrypoint") / "worker.log"
    with otlp_receiver.OtlpHttpReceiver() as receiver, open(log_path, "wb") as log:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        proc = subprocess.Popen(
            argv, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        handle = Worker(
            proc,
            env,
            port,
            int(compose["TOKENHEAP_HEALTH_PORT"]),
            partitions,
            kafka_bootstrap,
            receiver,
            log_path,
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"{argv} exited {proc.returncode}:\n{handle.log_tail()}")
                with contextlib.suppress(OSError):
                    if http_status(port, "/readyz") == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"/readyz not 200 after 90 s:\n{handle.log_tail()}")
                time.sleep(0.2)
            yield handle
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace_seconds())
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


async def send(worker: Worker, request_id: str, headers: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=worker.bootstrap)
    await producer.start()
    try:
        value = json.dumps(dict(EXAMPLE, request_id=request_id)).encode()
        await producer.send_and_wait(
            worker.requests_topic, value, key=request_id.encode(), headers=headers
        )
    finally:
        await producer.stop()


async def result_of(worker: Worker, request_id: str, timeout_s: float = 60) -> dict[str, Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=worker.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(worker.results_topic, p) for p in range(worker.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        async with asyncio.timeout(timeout_s):
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        doc = json.loads(record.value)
                        if doc.get("request_id") == request_id:
                            return doc  # type: ignore[no-any-return]
    except TimeoutError:
        pytest.fail(f"no result for {request_id} in {timeout_s} s:\n{worker.log_tail()}")
    finally:
        await consumer.stop()


# -- the tests ---------------------------------------------------------------------------


def test_argv_and_env_are_the_images() -> None:
    assert image_argv() == ["tokenheap", "worker"]
    env = image_env()
    assert env["TOKENHEAP_HEALTH_HOST"] == "0.0.0.0"
    assert compose_env()["TOKENHEAP_HEALTH_HOST"] == "0.0.0.0"


async def test_health_endpoints_and_both_health_checks_pass(worker: Worker) -> None:
    assert http_status(worker.port, "/livez") == 200
    assert http_status(worker.port, "/readyz") == 200
    compose_check = compose_worker()["healthcheck"]["test"]
    assert compose_check[:2] == ["CMD", "python"]
    argv = [sys.executable, *compose_check[2:]]
    argv = [a.replace(f":{worker.compose_port}/", f":{worker.port}/") for a in argv]
    image_check = image_healthcheck()
    assert image_check[0] == "python"
    for check in (argv, [sys.executable, *image_check[1:]]):
        proc = await asyncio.create_subprocess_exec(*check, env=worker.env)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0, check


async def test_a_request_comes_back_fitted(worker: Worker) -> None:
    request_id = f"image-{uuid.uuid4().hex[:8]}"
    await send(worker, request_id, headers=[])
    result = await result_of(worker, request_id)
    assert result["status"] == "ok", result
    assert result["model"] == EXAMPLE["model"]
    usage = result["usage"]
    assert 0 < usage["total_tokens"] <= usage["budget_tokens"]
    assert result["messages"], "a fitted context has messages"


async def test_spans_and_metrics_reach_the_otlp_endpoint(worker: Worker) -> None:
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01".encode()
    request_id = f"image-traced-{trace_id[:8]}"
    await send(worker, request_id, headers=[("traceparent", traceparent)])
    await result_of(worker, request_id)
    process = f"process {worker.requests_topic}"

    def arrived(rx: Any) -> bool:
        traced = any(s.name == process and s.trace_id == trace_id for s in rx.spans)
        return traced and any(m.name == "tokenheap.slot.tokens" for m in rx.metrics)

    try:
        await asyncio.to_thread(worker.receiver.wait_for, arrived, 30)
    except TimeoutError as exc:
        pytest.fail(f"{exc}; spans: {sorted({s.name for s in worker.receiver.spans})}")
    span = next(s for s in worker.receiver.spans if s.name == process and s.trace_id == trace_id)
    assert span.kind == "CONSUMER"
    assert span.resource["service.name"] == compose_env()["OTEL_SERVICE_NAME"]
    assert span.resource["deployment.environment.name"] == "compose"


async def test_sigterm_stops_it_cleanly_within_the_grace_period(worker: Worker) -> None:
    """Last: it stops the module's worker."""
    worker.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.proc.wait, grace_seconds())
    assert code == 0, worker.log_tail()

"""The worker against a secured broker: a SASL_SSL listener (TLS from a CA made here, SCRAM-
SHA-512 users written at format time). The worker's own settings connect and round-trip a
request; a wrong password or an untrusted CA stops it at once with a clear error, a handful
of log lines at most, and the password in none of them."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.integration import worker_kit as kit
from tests.integration.conftest import load_broker_module, new_topics, unique_name
from tests.support.tls import Pki, make_pki
from worker.settings import Settings
from worker.stream.dlq import list_dead_letters
from worker.stream.kafka import BrokerRefused, check_connection, client_kwargs

pytestmark = pytest.mark.kafka
USER = "alice"
PASSWORD = "Tk7-quartz-Obelisk-42"  # distinctive, so a leak shows in any captured text
WRONG = "Tk7-wrong-Obelisk-99"
LOG_LINES_AT_MOST = 6  # one refusal is a few lines; a retry storm is hundreds


@dataclass(frozen=True)
class Secured:
    broker: Any
    pki: Pki


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """One broker for the module with a SASL_SSL listener next to its plaintext one."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    broker_py = load_broker_module()
    listener = broker_py.SecureListener(keystore=pki.broker_keystore, users={USER: PASSWORD})
    broker = broker_py.Broker(secure=listener)
    broker.start()
    try:
        yield Secured(broker, pki)
    finally:
        broker.stop()


async def _names(secured: Secured) -> kit.Names:
    """Fresh topics, made over the plaintext listener (set-up, not what is under test)."""
    names = [unique_name("sec") for _ in range(4)]
    await new_topics(secured.broker.bootstrap, names, 1)
    return kit.Names(*names, group=f"{names[0]}-group", partitions=1)


def _settings(secured: Secured, names: kit.Names, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": USER,
        "sasl_password": PASSWORD,
        "ssl_cafile": secured.pki.ca,
    }
    values.update(over)
    return kit.settings_for(secured.broker.secure_bootstrap, names, **values)


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text and WRONG not in text


async def test_the_worker_round_trips_over_sasl_ssl(
    secured: Secured, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    names = await _names(secured)
    settings = _settings(secured, names)
    await check_connection(settings)
    common = client_kwargs(settings, "test")
    producer = AIOKafkaProducer(**common)
    consumer = AIOKafkaConsumer(**common, auto_offset_reset="earliest", enable_auto_commit=False)
    await producer.start()
    await consumer.start()
    try:
        consumer.assign([TopicPartition(names.results, 0)])
        async with kit.InProcessWorker(settings) as worker:
            await producer.send_and_wait(names.requests, kit.request(1), key=b"k")
            async with asyncio.timeout(60):
                got = await consumer.getone()
            assert await worker.stop() == 0
    finally:
        await consumer.stop()
        await producer.stop()
    result = json.loads(got.value)
    assert (result["request_id"], result["status"]) == (kit.request_id(1), "ok")
    assert await list_dead_letters(settings, 10, _Sink()) == 0  # the DLQ tool connects too
    out, err = capfd.readouterr()
    _no_secret(caplog.text, out, err)
    assert any(f"Authenticated as {USER}" in r.getMessage() for r in caplog.records)


class _Sink:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        return None


CASES = {
    "wrong password": ({"sasl_password": WRONG}, ["rejected SASL SCRAM-SHA-512", repr(USER)]),
    "untrusted CA": ({}, ["not trusted", "TOKENHEAP_SSL_CAFILE"]),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_refused_credentials_or_trust_stop_at_once_and_say_why(
    secured: Secured,
    case: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    over, phrases = CASES[case]
    if case == "untrusted CA":
        over = {"ssl_cafile": secured.pki.other_ca}
    names = await _names(secured)
    settings = _settings(secured, names, **over)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(BrokerRefused) as refused:
        await check_connection(settings)
    message = str(refused.value)
    assert all(p in message for p in phrases), message
    assert secured.broker.secure_bootstrap in message

    caplog.clear()
    async with kit.InProcessWorker(settings) as worker:
        assert await worker.wait(60) == 2  # refused: stops by itself, no retry loop to wait out
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) <= LOG_LINES_AT_MOST, [r.getMessage() for r in lines]

    code, stderr = await _cli(settings, "dlq", "list")
    assert code == 2 and all(p in stderr for p in phrases), stderr
    out, err = capfd.readouterr()
    _no_secret(caplog.text, out, err, stderr, message)


async def _cli(settings: Settings, *args: str) -> tuple[int, str]:
    env = kit.worker_env(settings)
    if settings.sasl_password is not None:
        env["TOKENHEAP_SASL_PASSWORD"] = settings.sasl_password.get_secret_value()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env=env, cwd=Path(kit.REPO),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()

"""Settings read the way a command reads them, the size check, and the health endpoints."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from worker.cli.config import check_limits, load_settings, unknown_variables
from worker.errors import ConfigError
from worker.settings import Settings
from worker.stream.health import HealthServer


def test_every_setting_is_known_and_typos_get_their_closest_name() -> None:
    env = {f"TOKENHEAP_{n.upper()}": "x" for n in Settings.model_fields}
    env |= {"TOKENHEAP_SETTINGS_FILE": "f", "TOKENHEAP_DISK_CACHE": "0", "PATH": "/bin"}
    assert unknown_variables(env) == []
    found = unknown_variables({"TOKENHEAP_GROUPID": "g", "TOKENHEAP_ZZZ": "1"})
    assert found == [("TOKENHEAP_GROUPID", "TOKENHEAP_GROUP_ID"), ("TOKENHEAP_ZZZ", None)]


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENHEAP_MAX_IN_FLIGHT", "abc")
    with pytest.raises(ConfigError, match=r"TOKENHEAP_MAX_IN_FLIGHT: .*'abc'"):
        load_settings(err=io.StringIO())


def test_sizes_that_contradict_are_refused_and_the_defaults_agree() -> None:
    check_limits(Settings())  # defaults agree (1 MiB each, the broker's default)
    assert Settings().max_request_bytes == Settings().max_message_bytes == 1_048_576
    with pytest.raises(ConfigError, match="TOKENHEAP_MAX_MESSAGE_BYTES"):
        check_limits(Settings(max_request_bytes=2_000_000))
    check_limits(Settings(max_request_bytes=2_000_000, max_message_bytes=4_000_000))


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, body = raw.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), body


async def test_readiness_is_membership_and_status_reports_the_assignment() -> None:
    state = {"ready": False, "partitions": []}
    server = HealthServer(
        "127.0.0.1",
        0,
        lambda: bool(state["ready"]),
        status=lambda: {"partitions": state["partitions"], "in_flight": 0},
    )
    await server.start()
    try:
        assert (await _get(server.port, "/readyz"))[0] == 503
        state["ready"] = True  # a member with no partitions is ready
        code, body = await _get(server.port, "/readyz")
        assert code == 200 and b"partitions: none" in body
        state["partitions"] = ["t[0]"]
        code, body = await _get(server.port, "/status")
        assert code == 200
        assert json.loads(body) == {"ready": True, "partitions": ["t[0]"], "in_flight": 0}
    finally:
        await server.stop()


async def test_a_port_in_use_is_a_configuration_error() -> None:
    first = HealthServer("127.0.0.1", 0, lambda: True)
    await first.start()
    try:
        with pytest.raises(ConfigError, match="already in use"):
            await HealthServer("127.0.0.1", first.port, lambda: True).start()
    finally:
        await first.stop()

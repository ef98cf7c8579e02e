"""/livez, /readyz and /status over plain HTTP/1.1, stdlib asyncio only (no web framework).

livez:  200 while the event loop answers (a wedged loop fails it by not answering) and the
        worker is not stopping (`live`), so a supervisor never sees a stopping one as healthy.
readyz: 200 when the worker is a member of its consumer group, the broker answers and it
        can publish; 503 while it loads, joins, waits for the broker, drains or has failed.
        Owning partitions is *not* required: a spare replica (more replicas than
        partitions) is ready, and a rebalance does not flip the fleet unready, so a
        Kubernetes rollout keeps moving. The body names the partitions.
status: JSON: ready, the assigned partitions, records in flight, paused partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from worker.errors import ConfigError

if TYPE_CHECKING:
    from worker.stream.flow import Flow

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 5.0
MAX_HTTP_HEAD_BYTES = 8192
"""The most of a health request read; the rest is ignored."""


Status = Callable[[], dict[str, Any]]


def flow_status(flow: Flow) -> Status:
    """What /status and /readyz report about a flow, beyond ready or not."""

    def status() -> dict[str, Any]:
        return {
            "member": flow.member(),
            "partitions": [f"{t}[{p}]" for t, p in flow.assignment()],
            "in_flight": flow.in_flight,
            "paused_partitions": flow.paused(),
        }

    return status


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        status: Status | None = None,
        live: Callable[[], bool] = lambda: True,
        socks: Sequence[socket.socket] = (),
    ) -> None:
        """`socks`: sockets already bound and listening, served instead of `host:port`
        (`TOKENHEAP_PROCESSES`: the parent binds its own and each child's before forking)."""
        self._host = host
        self._port = port
        self._socks = list(socks)
        self._ready = ready
        self._status = status or (lambda: {})
        self._live = live
        self._servers: list[asyncio.Server] = []

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        for server in self._servers:
            if server.sockets:
                return int(server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        try:
            if self._socks:
                for sock in self._socks:
                    self._servers.append(await asyncio.start_server(self._serve, sock=sock))
            else:
                self._servers.append(
                    await asyncio.start_server(self._serve, self._host, self._port)
                )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"health port {self._host}:{self._port} is already in use; set "
                    "TOKENHEAP_HEALTH_PORT to a free port (0 turns the endpoint off)"
                ) from None
            raise ConfigError(
                f"cannot serve health on {self._host}:{self._port} ({exc.strerror}); "
                "check TOKENHEAP_HEALTH_HOST and TOKENHEAP_HEALTH_PORT"
            ) from None
        log.info("health endpoint on http://%s:%d/readyz", self._host, self.port)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        self._servers = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body = self._answer(head[:MAX_HTTP_HEAD_BYTES])
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status, body = 400, "bad request\n"
        except ConnectionError:
            writer.close()
            return
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}
        payload = body.encode()
        kind = "application/json" if body.startswith("{") else "text/plain"
        writer.write(
            f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def _answer(self, head: bytes) -> tuple[int, str]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] != b"GET":
            return 400, "bad request\n"
        path = parts[1].split(b"?", 1)[0]
        if path == b"/livez":
            return (200, "ok\n") if self._live() else (503, "stopping\n")
        if path == b"/readyz":
            owned = self._status().get("partitions")
            detail = "" if owned is None else f"; partitions: {', '.join(owned) or 'none'}"
            return (200, f"ready{detail}\n") if self._ready() else (503, f"not ready{detail}\n")
        if path == b"/status":
            return 200, json.dumps({"ready": self._ready(), **self._status()}) + "\n"
        return 404, "not found: try /livez, /readyz or /status\n"

"""/livez and /readyz over plain HTTP/1.1, stdlib asyncio only (no web framework to patch).

livez:  200 while the event loop answers (a wedged loop fails it by not answering) and the
        worker is not stopping (`live`), so a supervisor never sees a stopping one as healthy.
readyz: 200 when the worker owns partitions and can publish; 503 otherwise, so a load
        balancer or orchestrator can tell a rebalancing or draining worker apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        live: Callable[[], bool] = lambda: True,
    ) -> None:
        self._host = host
        self._port = port
        self._ready = ready
        self._live = live
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("health endpoint on http://%s:%d/readyz", self._host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body = self._answer(head[:MAX_REQUEST_BYTES])
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status, body = 400, "bad request\n"
        except ConnectionError:
            writer.close()
            return
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}
        payload = body.encode()
        writer.write(
            f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: text/plain\r\n"
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
            return (200, "ready\n") if self._ready() else (503, "not ready\n")
        return 404, "not found: try /livez or /readyz\n"

"""A `TOKENHEAP_PROCESSES` parent whose children are stand-ins needing no broker: each serves
its health endpoint on the socket the parent gave it, is ready at once and stops on SIGTERM
or SIGINT as a worker does (its handlers installed, then the signals unblocked).

    python -m tests.support.fake_fleet HEALTH_PORT   (from the repository's root)

FAKE_START_S: how long a child takes before its handlers exist (a worker's start-up);
FAKE_FAIL=k:code: child k exits with `code` on its own, half a second after it is up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time

from worker.settings import Settings
from worker.stream.health import HealthServer
from worker.stream.processes import run_processes
from worker.telemetry.logs import configure_logging, tag_process

log = logging.getLogger("fake")


def child(k: int, settings: Settings, sock: socket.socket | None) -> int:
    tag_process(k)
    log.info("child starting")
    time.sleep(float(os.environ.get("FAKE_START_S", "0")))  # signals stay blocked meanwhile

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
        status = {"member": True, "partitions": [f"t[{k}]"], "in_flight": 0}
        health = HealthServer(
            "127.0.0.1", 0, lambda: True, status=lambda: status, socks=[sock] if sock else ()
        )
        await health.start()
        log.info("child up")
        fail = os.environ.get("FAKE_FAIL", "")
        if fail and int(fail.split(":")[0]) == k:
            await asyncio.sleep(0.5)
            return int(fail.split(":")[1])
        await stop.wait()
        await health.stop()
        log.info("child stopped")
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT))  # as _main
        return 0

    return asyncio.run(main())


if __name__ == "__main__":
    configure_logging("INFO")
    settings = Settings(
        processes=2, health_port=int(sys.argv[1]), count_backend="tiktoken", drain_timeout_s=5
    )
    sys.exit(run_processes(settings, child))

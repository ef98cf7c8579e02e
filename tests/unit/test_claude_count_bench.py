"""The Claude counting benchmark still runs, and its two designs are what it says."""

from __future__ import annotations

import random
from typing import Any

from benchmarks import claude_count_bench as bench


async def test_old_counts_pieces_new_counts_payloads(anthropic_server_module: Any) -> None:
    jobs = bench.unrelated(random.Random(3), 3) + bench.conversations(random.Random(4), 1, 3)
    reqs = [bench.request_of(i, job) for i, job in enumerate(jobs)]
    calls = {}
    for name, design in (("old", bench.old), ("new", bench.new)):
        with anthropic_server_module.AnthropicServer(counting="bytes") as server:
            latencies, _used, errors = await design(server, reqs)
            calls[name] = server.calls
        assert errors == [] and len(latencies) == len(reqs)
    # the old design counts every distinct piece; the new one each payload about once
    assert calls["old"] > 5 * len(reqs)
    assert calls["new"] <= 1.3 * len(reqs)

"""What telemetry costs the worker: throughput and CPU per request under OTEL_* settings.

    python -m benchmarks.telemetry_bench [--requests 12000] [--rounds 3] [--base-tree DIR]

One worker on its own broker (ops/kafka/broker.py), kafka_bench's requests and throughput
measurement (a preloaded backlog, the counted window once the worker runs at full speed,
the CPU of its process over that window), once per configuration below, configurations
interleaved in every round; medians. Exporting goes over OTLP/HTTP to a local endpoint
that reads and discards (kafka_bench's sink, a process of its own), so a collector's work
is not in the figures. CPU per request is what to quote: a rate moves with the machine.
`--base-tree` adds another checkout's worker with no OTEL_* variables (what a deployment
that exports nothing runs), in the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks import kafka_bench as kb

CONFIGS: dict[str, dict[str, str]] = {
    "OTEL_SDK_DISABLED=true": {"OTEL_SDK_DISABLED": "true"},
    "no OTEL_* variables (nothing exported)": {},
    "OTLP metrics only": {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ""},
    "OTLP traces and metrics, traces sampled 10%": {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    },
    "OTLP traces and metrics": {"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
}
"""Configuration -> the OTEL_* variables of the worker ('' : the local endpoint's URL)."""


BASE = "previous release, no OTEL_* variables"


async def bench(
    bootstrap: str, n: int, rounds: int, logs: Path, endpoint: str, base: Path | None
) -> str:
    values = [kb.build_request(i) for i in range(n)]
    configs = {**CONFIGS, **({BASE: {}} if base is not None else {})}
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, env in configs.items():
            otel = {k: v or endpoint for k, v in env.items()}
            tree = base if name == BASE else None
            system = kb.System("worker", 1, bootstrap, logs, tree, otel=otel)
            run = await kb.throughput(system, values)
            rate, cpu_ms = run.rate, run.cpu_ms
            seen[name].append((rate, cpu_ms))
            print(f"  {name:<46} {rate:7.0f} req/s  {cpu_ms:.3f} CPU ms/req", flush=True)
    off = statistics.median(c for _, c in seen["OTEL_SDK_DISABLED=true"])
    lines = [
        "| worker telemetry | req/s | CPU ms / request | CPU vs telemetry off |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, pairs in seen.items():
        rate = statistics.median(r for r, _ in pairs)
        cpu = statistics.median(c for _, c in pairs)
        lines.append(f"| {name} | {rate:.0f} | {cpu:.3f} | {cpu / off:.2f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=12000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-tree", type=Path, help="another checkout's worker beside")
    args = parser.parse_args(argv)
    broker = kb.load_broker()
    with (
        tempfile.TemporaryDirectory(prefix="telemetry-bench-") as tmp,
        broker.Broker() as b,
        kb.sink_process(Path(tmp)) as endpoint,
    ):
        print(f"broker {b.bootstrap}; {args.requests} requests, {args.rounds} rounds")
        run = bench(b.bootstrap, args.requests, args.rounds, Path(tmp), endpoint, args.base_tree)
        out = asyncio.run(run)
    print()
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

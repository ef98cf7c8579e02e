"""tokenheap command line: fit, schemas, worker, dlq, config-docs."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TextIO

from worker.build import build_engine, limits_of
from worker.catalog import load_catalog
from worker.count.backends import BackendName
from worker.engine.decode import Limits
from worker.engine.engine import Engine
from worker.engine.result import FitResult
from worker.errors import ConfigError
from worker.settings import Settings
from worker.telemetry.hooks import NoopTelemetry, Telemetry

PARALLEL_MIN_BYTES = 4 * 1024 * 1024


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenheap", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    fit = sub.add_parser("fit", help="fit requests from a .json/.jsonl file or - (stdin)")
    fit.add_argument("source", help="a request .json, a .jsonl of requests, or - for stdin")
    fit.add_argument("--table", action="store_true", help="a human view instead of JSON")
    fit.add_argument(
        "--backend",
        choices=["tiktoken", "fastokens"],
        help="local BPE (default tiktoken: fastokens is faster but takes ~2 s to load)",
    )
    fit.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="processes for a .jsonl file (default: one per core for files over 4 MB)",
    )
    sch = sub.add_parser("schemas", help="write the JSON Schemas of the message contracts")
    sch.add_argument("--out", type=Path, default=Path("schemas"))
    sch.add_argument("--check", action="store_true", help="fail if schemas/ is out of date")
    sub.add_parser("config-docs", help="print the settings reference as a Markdown table")
    sub.add_parser("worker", help="run the Kafka worker")
    dlq = sub.add_parser("dlq", help="list or replay dead letters")
    dlq.add_argument("action", choices=["list", "replay"])
    dlq.add_argument("--limit", type=int, default=100)
    args = parser.parse_args(argv)

    try:
        if args.cmd == "fit":
            return _fit(args.source, args.table, args.backend, args.jobs)
        if args.cmd == "schemas":
            from worker.schemas import check_schemas, write_schemas

            if args.check:
                stale = check_schemas(args.out)
                for name in stale:
                    print(f"out of date: {args.out / name} (run `tokenheap schemas`)")
                return 1 if stale else 0
            for path in write_schemas(args.out):
                print(path)
            return 0
        if args.cmd == "config-docs":
            from worker.settings import reference_table

            print(reference_table())
            return 0
        if args.cmd == "worker":
            return _worker(Settings())
        if args.cmd == "dlq":
            from worker.stream.dlq import run_dlq

            return run_dlq(Settings(), args.action, args.limit)
    except ConfigError as exc:
        print(f"tokenheap: {exc}", file=sys.stderr)
        return 2
    return 2


def _fit(source: str, table: bool, backend: BackendName | None, jobs: int) -> int:
    settings = Settings()
    if backend is None and settings.count_backend == "auto":
        backend = "tiktoken"  # a short-lived process: load time beats counting speed
    limits = limits_of(settings)
    out = sys.stdout
    single = source != "-" and not source.endswith(".jsonl")
    if not single and source != "-":
        if jobs == 0:
            big = os.path.getsize(source) > PARALLEL_MIN_BYTES
            jobs = min(os.cpu_count() or 1, 2) if big else 1
        if jobs > 1:
            return _fit_jobs(settings, backend, source, limits, table, jobs)
    engine = build_engine(settings, backend)
    from worker.telemetry.logs import configure_logging

    configure_logging("WARNING", json_lines=settings.log_format == "json")  # stdout is data
    otel = None
    if _exporting():  # otherwise nothing would receive it: skip the SDK altogether
        from worker.telemetry.otel import build_telemetry

        otel = build_telemetry(catalog=engine.catalog, anthropic=lambda: engine.anthropic_started)
    telemetry: Telemetry = otel or NoopTelemetry()
    with _open(source) as stream:
        lines: list[str] | TextIO = [stream.read().replace("\n", " ")] if single else stream
        try:
            with otel.run() if otel else nullcontext():
                failed = asyncio.run(
                    _emit(engine, lines, limits, out, table, pretty=single, telemetry=telemetry)
                )
        finally:
            if otel:
                otel.shutdown()
    return 1 if failed and single else 0


_EXPORT_VARS = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)


def _exporting() -> bool:
    """Whether OTEL_* asks for any exporter (the same rule as worker.telemetry.setup)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(os.environ.get(v, "").strip() not in ("", "none") for v in _EXPORT_VARS)


def _open(source: str) -> TextIO:
    return sys.stdin if source == "-" else open(source, encoding="utf-8")


async def _emit(
    engine: Engine,
    lines: list[str] | TextIO,
    limits: Limits,
    out: TextIO,
    table: bool,
    pretty: bool,
    telemetry: Telemetry,
) -> int:
    from worker.cli.fitfile import fit_lines
    from worker.cli.table import render_table

    failed = 0
    last = time.perf_counter()
    try:
        async for result in fit_lines(engine, lines, limits):
            now = time.perf_counter()
            telemetry.on_result(None, result, now - last)
            last = now
            failed += result.status != "ok"
            if table:
                out.write(render_table(result))
            else:
                out.write(_dump(result, pretty))
            out.write("\n")
    finally:
        await engine.aclose()
    return failed


def _worker(settings: Settings) -> int:
    from worker.stream.service import run_worker
    from worker.telemetry.logs import configure_logging
    from worker.telemetry.otel import build_telemetry
    from worker.telemetry.sustained import SustainedConfig

    configure_logging(settings.log_level, json_lines=settings.log_format == "json")
    telemetry = build_telemetry(
        catalog=load_catalog(settings.config_dir),
        max_attribute_values=settings.telemetry_max_attribute_values,
        sustained=SustainedConfig(
            window_requests=settings.sustained_window_requests,
            window_seconds=settings.sustained_window_s,
            min_requests=settings.sustained_min_requests,
            share_limit=settings.sustained_share_limit,
            clear_below=settings.sustained_clear_below,
            max_keys=settings.sustained_max_keys,
        ),
    )
    try:
        return run_worker(settings, telemetry)
    finally:
        telemetry.shutdown()  # flushes spans and a last metric export


def _fit_jobs(
    settings: Settings,
    backend: BackendName | None,
    source: str,
    limits: Limits,
    table: bool,
    jobs: int,
) -> int:
    from worker.cli.fitjobs import fit_parallel
    from worker.cli.table import render_table

    def fmt(result: FitResult) -> str:
        return (render_table(result) if table else _dump(result, False)) + "\n"

    with open(source, encoding="utf-8") as stream:
        for text, _ in fit_parallel(
            lambda: build_engine(settings, backend), stream, limits, fmt, jobs
        ):
            sys.stdout.write(text)
    return 0


def _dump(result: FitResult, pretty: bool) -> str:
    return result.model_dump_json(exclude_none=True, indent=2 if pretty else None)


if __name__ == "__main__":
    raise SystemExit(main())

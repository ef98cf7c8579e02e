"""The in-process engine against the floor of any Python engine, per request, in one process.

    python -m benchmarks.engine_bench [--rounds 5] [--conversations 50] [--turns 20]

The floor is what every engine written in Python pays for a request whatever it does in
between: `json.loads` of the request line and `json.dumps` of the same result the engine
produced. The engine's figure is the whole path a transport runs: `decode_request`, a
fresh `Engine.fit_many` over the file (vocabulary loaded beforehand, count cache empty, so
each conversation's first turn and every new turn is counted), and `model_dump_json` of
each result. Rounds interleave the two; figures are CPU time per request, medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.workload import write
from worker.engine.decode import decode_request
from worker.engine.engine import Engine
from worker.engine.result import FitResult

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"


def engine_pass(lines: list[str]) -> tuple[float, list[str]]:
    engine = Engine()
    engine.preload(["o200k_base"])
    start = time.process_time()
    out = [
        r.model_dump_json(exclude_none=True)
        for r in engine.fit_many_sync(decode_request(line) for line in lines)
    ]
    spent = time.process_time() - start
    engine.close()
    return spent, out


def floor_pass(lines: list[str], results: list[Any]) -> float:
    start = time.process_time()
    for line, result in zip(lines, results, strict=True):
        json.loads(line)
        json.dumps(result)
    return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conversations", type=int, default=50)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--chunks", type=int, default=16)
    args = ap.parse_args()
    path = write(
        "reuse",
        DATA / "engine-reuse.jsonl",
        conversations=args.conversations,
        turns=args.turns,
        chunks_per_request=args.chunks,
    )
    lines = path.read_text(encoding="utf-8").splitlines()
    _, first = engine_pass(lines)
    results = [json.loads(r) for r in first]
    ok = sum(FitResult.model_validate(r).status == "ok" for r in results)
    eng: list[float] = []
    flo: list[float] = []
    for _ in range(args.rounds):
        eng.append(engine_pass(lines)[0])
        flo.append(floor_pass(lines, results))
    n = len(lines)
    e, f = statistics.median(eng) / n * 1e3, statistics.median(flo) / n * 1e3
    print(f"{n} requests ({ok} ok), {args.rounds} rounds, median CPU per request\n")
    print("| path | ms / request | x the floor |")
    print("| --- | ---: | ---: |")
    print(f"| json.loads(request) + json.dumps(result) (floor) | {f:.3f} | 1.00 |")
    print(f"| decode + Engine.fit_many + model_dump_json | {e:.3f} | {e / f:.2f} |")


if __name__ == "__main__":
    main()

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

from benchmarks.workload import add_shape_args, shape_of, write
from worker.count.backends import BackendName
from worker.engine.decode import decode_request
from worker.engine.engine import Engine
from worker.engine.result import FitResult

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"


def engine_pass(lines: list[str], backend: BackendName = "tiktoken") -> tuple[float, list[str]]:
    engine = Engine(backend=backend)
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
    add_shape_args(ap)
    args = ap.parse_args()
    path = write("reuse", DATA / "engine-reuse.jsonl", **shape_of(args))
    lines = path.read_text(encoding="utf-8").splitlines()
    _, first = engine_pass(lines)
    results = [json.loads(r) for r in first]
    ok = sum(FitResult.model_validate(r).status == "ok" for r in results)
    backends: list[BackendName] = ["tiktoken", "fastokens"]
    cpu: dict[str, list[float]] = {"floor": [], **{b: [] for b in backends}}
    for _ in range(args.rounds):
        cpu["floor"].append(floor_pass(lines, results))
        for b in backends:
            spent, out = engine_pass(lines, b)
            same = [o.replace(b, "tiktoken", 1) for o in out]  # count_method names it
            assert same == first, f"{b}: results differ from tiktoken's"
            cpu[b].append(spent)
    n = len(lines)
    ms = {k: statistics.median(v) / n * 1e3 for k, v in cpu.items()}
    print(f"{n} requests ({ok} ok), {args.rounds} rounds, median CPU per request\n")
    print("| path | ms / request | x the floor |")
    print("| --- | ---: | ---: |")
    print(f"| json.loads(request) + json.dumps(result) (floor) | {ms['floor']:.3f} | 1.00 |")
    for b in backends:
        label = f"decode + Engine.fit_many ({b}) + model_dump_json"
        print(f"| {label} | {ms[b]:.3f} | {ms[b] / ms['floor']:.2f} |")


if __name__ == "__main__":
    main()

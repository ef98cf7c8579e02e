"""The in-process engine against the floor of any Python engine, per request, in one process.

    python -m benchmarks.engine_bench [--rounds 5] [--conversations 50] [--turns 20]
        [--kinds reuse agent] [--other-tree /tmp/base]

The floor is what every engine written in Python pays for a request whatever it does in
between: `json.loads` of the request line and `json.dumps` of the same result the engine
produced. The engine's figure is the whole path a transport runs: `decode_request`, a
fresh `Engine.fit_many` over the file (vocabulary loaded beforehand, count cache empty, so
each conversation's first turn and every new turn is counted), and `model_dump_json` of
each result. Both passes run with the collector as the transports set it after start-up
(`worker.runtime.settle_heap`). Rounds interleave them; figures are CPU time per request,
medians. Two workloads of the same shape: `reuse` (plain text turns) and `agent` (native
OpenAI tool calls and tool results before every answer, three tool definitions on every
request). `--other-tree` runs the same engine pass with another checkout's `worker` (a fresh
process per round, in the same rounds), so a change is measured against its base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.workload import add_shape_args, shape_of, write
from worker.count.backends import BackendName
from worker.engine.decode import decode_request
from worker.engine.engine import Engine
from worker.engine.result import FitResult
from worker.runtime import settle_heap

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"


def engine_pass(lines: list[str], backend: BackendName = "tiktoken") -> tuple[float, list[str]]:
    engine = Engine(backend=backend)
    engine.preload(["o200k_base"])
    settle_heap()  # as every transport does after start-up
    start = time.process_time()
    out = [
        r.model_dump_json(exclude_none=True)
        for r in engine.fit_many_sync(decode_request(line) for line in lines)
    ]
    spent = time.process_time() - start
    engine.close()
    return spent, out


OTHER_PASS = """
import json, sys, time
from pathlib import Path
from worker.engine.decode import decode_request
from worker.engine.engine import Engine
try:
    from worker.runtime import settle_heap
except ImportError:  # a tree from before it
    import gc
    settle_heap = gc.collect
lines = Path(sys.argv[1]).read_text(encoding="utf-8").splitlines()
engine = Engine(backend=sys.argv[2])
engine.preload(["o200k_base"])
settle_heap()
start = time.process_time()
out = [r.model_dump_json(exclude_none=True) for r in engine.fit_many_sync(
    decode_request(line) for line in lines)]
print(time.process_time() - start)
"""


def other_pass(tree: Path, path: Path, backend: BackendName) -> float:
    """`engine_pass` with `tree`'s worker, in a process of its own (run from /tmp, so the
    current folder does not put this tree's package first)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-c", OTHER_PASS, str(path), backend],
        cwd="/tmp",
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(proc.stdout.strip().splitlines()[-1])


def floor_pass(lines: list[str], results: list[Any]) -> float:
    settle_heap()  # the same collector settings as the engine's pass
    start = time.process_time()
    for line, result in zip(lines, results, strict=True):
        json.loads(line)
        json.dumps(result)
    return time.process_time() - start


def _exact(results: list[str], backend: str) -> list[dict[str, Any]]:
    """The results without what may differ between backends: the count method's name, and
    the cache's hit/miss split (a backend counting more inline finds more pieces counted
    by an earlier request of the same batch)."""
    out = []
    for r in results:
        doc = json.loads(r.replace(backend, "<backend>", 1))
        doc.pop("cache", None)
        out.append(doc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_shape_args(ap)
    ap.add_argument("--kinds", nargs="+", choices=["reuse", "agent"], default=["reuse", "agent"])
    ap.add_argument("--other-tree", type=Path, help="another checkout to time beside this one")
    args = ap.parse_args()
    for kind in args.kinds:
        path = write(kind, DATA / f"engine-{kind}.jsonl", **shape_of(args))
        run(kind, path, args.rounds, args.other_tree)


def run(kind: str, path: Path, rounds: int, other_tree: Path | None) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    _, first = engine_pass(lines)
    results = [json.loads(r) for r in first]
    ok = sum(FitResult.model_validate(r).status == "ok" for r in results)
    backends: list[BackendName] = ["tiktoken", "fastokens"]
    cpu: dict[str, list[float]] = {"floor": [], **{b: [] for b in backends}}
    other: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(rounds):
        cpu["floor"].append(floor_pass(lines, results))
        for b in backends:
            spent, out = engine_pass(lines, b)
            assert _exact(out, b) == _exact(first, "tiktoken"), f"{b}: results differ"
            cpu[b].append(spent)
            if other_tree is not None:
                other[b].append(other_pass(other_tree, path, b))
    n = len(lines)
    ms = {k: statistics.median(v) / n * 1e3 for k, v in cpu.items()}
    print(f"\n{kind}: {n} requests ({ok} ok), {rounds} rounds, median CPU per request\n")
    print("| path | ms / request | x the floor |")
    print("| --- | ---: | ---: |")
    print(f"| json.loads(request) + json.dumps(result) (floor) | {ms['floor']:.3f} | 1.00 |")
    for b in backends:
        label = f"decode + Engine.fit_many ({b}) + model_dump_json"
        print(f"| {label} | {ms[b]:.3f} | {ms[b] / ms['floor']:.2f} |")
    if other_tree is not None:
        for b in backends:
            theirs = statistics.median(other[b]) / n * 1e3
            label = f"other tree: decode + Engine.fit_many ({b}) + model_dump_json"
            print(f"| {label} | {theirs:.3f} | {theirs / ms['floor']:.2f} |")
        for b in backends:
            theirs = statistics.median(other[b]) / n * 1e3
            print(f"\n{kind}, {b}: this tree takes {ms[b] / theirs:.2f}x the other tree's CPU")


if __name__ == "__main__":
    main()

"""`tokenheap fit` as a whole process on JSONL files, side by side with its baselines.

    python -m benchmarks.fit_bench [--rounds 5] [--conversations 40] [--turns 12]

Every contender is a fresh process reading the same file; rounds interleave the contenders
so a noisy neighbour slows them alike. Figures are medians; ratios are what to quote.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.workload import write

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
PY = sys.executable


def contenders(reuse: Path, cold: Path, agent: Path) -> dict[str, tuple[list[str], Path]]:
    fit = [PY, "-m", "worker", "fit"]
    base = [PY, "-m", "benchmarks.baselines"]
    return {
        "tokenheap fit (reuse)": ([*fit, str(reuse)], reuse),
        "seed algorithm (reuse)": ([*base, "seed", str(reuse)], reuse),
        "langchain trim_messages (reuse)": ([*base, "langchain", str(reuse)], reuse),
        "tokenheap fit (cold)": ([*fit, str(cold)], cold),
        "tiktoken count only (cold)": ([*base, "tiktoken", str(cold)], cold),
        "tiktoken batch, 2 threads (cold)": ([*base, "tiktoken-batch", str(cold)], cold),
        "seed algorithm (cold)": ([*base, "seed", str(cold)], cold),
        # native tool calls, tool messages and tool definitions (no baseline counts them)
        "tokenheap fit (agent)": ([*fit, str(agent)], agent),
    }


def run_once(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conversations", type=int, default=50)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--chunks", type=int, default=16)
    args = ap.parse_args()
    kw = {
        "conversations": args.conversations,
        "turns": args.turns,
        "chunks_per_request": args.chunks,
    }
    reuse = write("reuse", DATA / "reuse.jsonl", **kw)
    cold = write("cold", DATA / "cold.jsonl", **kw)
    agent = write("agent", DATA / "agent.jsonl", **kw)
    n = args.conversations * args.turns
    for path in (reuse, cold, agent):
        mb = path.stat().st_size / 1e6
        print(f"{path.name}: {n} requests, {mb:.1f} MB")
    cmds = contenders(reuse, cold, agent)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.rounds):
        for name, (cmd, _) in cmds.items():
            times[name].append(run_once(cmd))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ref = {
        "reuse": med["tokenheap fit (reuse)"],
        "cold": med["tokenheap fit (cold)"],
        "agent": med["tokenheap fit (agent)"],
    }
    print(f"\n{args.rounds} rounds, median wall time per whole process ({n} requests each)\n")
    print("| process | seconds | requests/s | tokenheap is ... x faster |")
    print("| --- | ---: | ---: | ---: |")
    for name, t in med.items():
        kind = next(k for k in ref if f"({k})" in name)
        ratio = t / ref[kind]
        print(f"| {name} | {t:.2f} | {n / t:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()

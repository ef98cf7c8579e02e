"""`tokenheap fit` as a whole process on JSONL files, side by side with its baselines.

    python -m benchmarks.fit_bench [--rounds 5] [--conversations 40] [--turns 12]
        [--other-tree /tmp/base]

Every contender is a fresh process reading the same file; rounds interleave the contenders
so a noisy neighbour slows them alike. Figures are medians; ratios are what to quote.

The start-up rows time `python -c pass`, `tokenheap fit` on a file of one request (the
reuse file's first) and tiktoken alone counting that request's texts (the floor of an exact
count with tiktoken: its import, and building o200k_base from the shipped ranks).
`--other-tree` adds that tree's `tokenheap fit` (another checkout, e.g. `git worktree add
--detach /tmp/base <commit>`) on the one-request, reuse and agent files, run from its own
folder, so a change is measured against its base in the same run. Bytecode
is compiled first for every tree run, as an installed package has it (this environment
sets PYTHONDONTWRITEBYTECODE, which would otherwise recompile tokenheap in every process).
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.workload import add_shape_args, shape_of, write

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
PY = sys.executable
Contender = tuple[list[str], Path, Path]
"""(command, input file, folder it runs in)."""


def contenders(
    reuse: Path, cold: Path, agent: Path, one: Path, other: Path | None = None
) -> dict[str, Contender]:
    fit = [PY, "-m", "worker", "fit"]
    base = [PY, "-m", "benchmarks.baselines"]
    rows: dict[str, tuple[list[str], Path]] = {
        "python -c pass (start-up)": ([PY, "-c", "pass"], one),
        "tokenheap fit, 1 request (start-up)": ([*fit, str(one)], one),
        # the floor of any exact count with tiktoken: import it, build o200k_base, count
        "tiktoken counting the same text alone, 1 request (start-up)": (
            [*base, "tiktoken", str(one)],
            one,
        ),
        "tokenheap fit (reuse)": ([*fit, str(reuse)], reuse),
        "I/O floor: json.loads + json.dumps per line (reuse)": (
            [*base, "io-floor", str(reuse)],
            reuse,
        ),
        "seed algorithm (reuse)": ([*base, "seed", str(reuse)], reuse),
        "langchain trim_messages (reuse)": ([*base, "langchain", str(reuse)], reuse),
        "tokenheap fit (cold)": ([*fit, str(cold)], cold),
        "tiktoken count only (cold)": ([*base, "tiktoken", str(cold)], cold),
        "tiktoken batch, 2 threads (cold)": ([*base, "tiktoken-batch", str(cold)], cold),
        "seed algorithm (cold)": ([*base, "seed", str(cold)], cold),
        # native tool calls, tool messages and tool definitions (no baseline counts them)
        "tokenheap fit (agent)": ([*fit, str(agent)], agent),
    }
    out = {name: (cmd, path, ROOT) for name, (cmd, path) in rows.items()}
    if other is not None:
        out["other tree: tokenheap fit, 1 request (start-up)"] = ([*fit, str(one)], one, other)
        out["other tree: tokenheap fit (reuse)"] = ([*fit, str(reuse)], reuse, other)
        out["other tree: tokenheap fit (agent)"] = ([*fit, str(agent)], agent, other)
    return out


def run_once(cmd: list[str], cwd: Path) -> float:
    """Wall time of one process; `-m worker` imports the tree it runs in (cwd comes first)."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_shape_args(ap)
    ap.add_argument("--other-tree", type=Path, help="another checkout to time beside this one")
    args = ap.parse_args()
    kw = shape_of(args)
    reuse = write("reuse", DATA / "reuse.jsonl", **kw)
    cold = write("cold", DATA / "cold.jsonl", **kw)
    agent = write("agent", DATA / "agent.jsonl", **kw)
    one = DATA / "one.jsonl"
    with reuse.open(encoding="utf-8") as f:
        one.write_text(f.readline(), encoding="utf-8")
    n = args.conversations * args.turns
    for path in (reuse, cold, agent):
        mb = path.stat().st_size / 1e6
        print(f"{path.name}: {n} requests, {mb:.1f} MB")
    other = args.other_tree.resolve() if args.other_tree else None
    for tree in (ROOT, other):
        if tree is not None:
            compileall.compile_dir(tree / "worker", quiet=1)
    compileall.compile_dir(ROOT / "benchmarks", quiet=1)
    cmds = contenders(reuse, cold, agent, one, other)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.rounds):
        for name, (cmd, _, cwd) in cmds.items():
            times[name].append(run_once(cmd, cwd))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ref = {
        "start-up": med["tokenheap fit, 1 request (start-up)"],
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
        rate = f"{n / t:.0f}" if kind != "start-up" else "-"
        print(f"| {name} | {t:.3f} | {rate} | {ratio:.2f} |")
    interp = med["python -c pass (start-up)"]
    floor = med["I/O floor: json.loads + json.dumps per line (reuse)"]
    print(f"\nstart-up above the interpreter: {ref['start-up'] - interp:.3f} s (target <= 0.3 s)")
    alone = med["tiktoken counting the same text alone, 1 request (start-up)"] - interp
    print(f"  tiktoken alone (building o200k_base, counting the request): {alone:.3f} s")
    if other is not None:
        theirs = med["other tree: tokenheap fit, 1 request (start-up)"] - interp
        print(f"  other tree: {theirs:.3f} s")
    print(f"tokenheap fit (reuse) / I/O floor (reuse): {ref['reuse'] / floor:.2f}x (target <= 3x)")
    seed = med["seed algorithm (reuse)"]
    print(
        f"seed algorithm (reuse) / tokenheap fit (reuse): {seed / ref['reuse']:.2f}x (target >= 5x)"
    )


if __name__ == "__main__":
    main()

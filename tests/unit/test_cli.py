"""`tokenheap fit` and `tokenheap schemas` as a user runs them: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=env,
        check=False,
    )


def _req(i: int, **kw: object) -> dict[str, object]:
    doc: dict[str, object] = {"request_id": f"r{i}", "model": "gpt-4o", "query": f"question {i}"}
    doc.update(kw)
    return doc


def test_fit_example_request_prints_the_fitted_context() -> None:
    proc = run("fit", "examples/request.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok"
    assert result["messages"][0]["role"] == "system"
    assert result["usage"]["total_tokens"] > 0


def test_fit_jsonl_keeps_input_order_and_reports_bad_lines(tmp_path: Path) -> None:
    lines = [json.dumps(_req(i)) for i in range(5)]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({**_req(99), "surprise": 1}))
    lines.insert(5, json.dumps(_req(7, model="claude-sonnet-4-5")))  # no API configured
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run("fit", str(src))
    assert proc.returncode == 1, proc.stderr  # some error results
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["request_id"] for o in out] == ["r0", "r1", "", "r2", "r99", "r7", "r3", "r4"]
    assert out[2]["error"] == {
        "code": "invalid_request",
        "message": "line 3: invalid JSON: key must be a string at column 2",  # of line 3
        "retriable": False,
    }
    assert out[4]["error"]["message"].startswith("line 5: surprise: Extra inputs")
    assert out[5]["error"] == {
        "code": "counting_unavailable",
        "retriable": True,
        "message": out[5]["error"]["message"],
    }
    # what to set, in the names a user sets
    assert "TOKENHEAP_ON_COUNT_UNAVAILABLE=estimate" in out[5]["error"]["message"]


def test_fit_reads_stdin_and_estimates_claude_when_told_to() -> None:
    env = {"PATH": "/usr/bin:/bin", "TOKENHEAP_ON_COUNT_UNAVAILABLE": "estimate"}
    proc = run("fit", "-", stdin=json.dumps(_req(1, model="claude-haiku-4-5")) + "\n", env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["exact"] is False
    assert result["count_method"].startswith("estimate:")
    [alert] = [a for a in result["alerts"] if a["type"] == "estimated_count"]
    assert alert["message"].startswith("no count API is configured")  # none was called


def test_fit_table_shows_bars_drops_and_alerts(tmp_path: Path) -> None:
    doc = _req(1, chunks=[{"id": "huge", "text": "z " * 5000}], budget={"max_context_tokens": 1000})
    src = tmp_path / "one.json"
    src.write_text(json.dumps(doc), encoding="utf-8")
    proc = run("fit", str(src), "--table")
    assert proc.returncode == 0, proc.stderr
    assert "dropped  1 chunk, " in proc.stdout and ": 'huge'" in proc.stdout
    assert "ALERT    top_chunk_dropped" in proc.stdout
    assert "/ 900 " in proc.stdout  # budget = 1000 - 10% output reserve


def test_fit_single_request_error_exits_non_zero(tmp_path: Path) -> None:
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(_req(1, model="gpt-unknown")), encoding="utf-8")
    proc = run("fit", str(src))
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["code"] == "unknown_model"


def test_schemas_in_repo_match_the_models() -> None:
    proc = run("schemas", "--check")
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("name", ["request.json", "result.json", "alert.json", "dead-letter.json"])
def test_schema_drift_is_detected(tmp_path: Path, name: str) -> None:
    assert run("schemas", "--out", str(tmp_path)).returncode == 0
    path = tmp_path / name
    path.write_text(path.read_text().replace('"title"', '"titel"', 1), encoding="utf-8")
    proc = run("schemas", "--check", "--out", str(tmp_path))
    assert proc.returncode == 1
    assert name in proc.stdout


def test_fit_jobs_gives_the_same_results_in_the_same_order(tmp_path: Path) -> None:
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    lines = [
        json.dumps(_req(i, history=history[: i % 3], chunks=[{"id": "c", "text": f"t{i % 5}"}]))
        for i in range(150)
    ]
    src = tmp_path / "many.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    one = run("fit", "--jobs", "1", str(src))
    two = run("fit", "--jobs", "2", str(src))
    assert one.returncode == two.returncode == 0, two.stderr

    def strip(out: str) -> list[dict[str, object]]:
        docs = [json.loads(line) for line in out.splitlines()]
        for d in docs:
            d.pop("cache")  # hits and misses depend on which process saw a piece first
        return docs

    assert [d["request_id"] for d in strip(two.stdout)] == [f"r{i}" for i in range(150)]
    assert strip(one.stdout) == strip(two.stdout)


def test_readme_settings_reference_matches_the_settings_model() -> None:
    proc = run("config-docs")
    assert proc.returncode == 0
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert proc.stdout.strip() in readme, "README is stale: paste `tokenheap config-docs`"


def test_fit_exports_spans_only_when_an_exporter_is_configured() -> None:
    base = {"PATH": "/usr/bin:/bin"}
    quiet = run("fit", "examples/request.json", env=base)
    loud = run("fit", "examples/request.json", env={**base, "OTEL_TRACES_EXPORTER": "console"})
    assert quiet.returncode == loud.returncode == 0
    assert '"trace_id"' not in quiet.stderr
    assert '"name": "fit"' in loud.stderr and '"gen_ai.usage.input_tokens": 267' in loud.stderr
    assert json.loads(loud.stdout) == json.loads(quiet.stdout)

"""The native-payload examples through `tokenheap fit`, as a user runs them (a subprocess);
every printed payload validates against the provider SDK's request types."""

from __future__ import annotations

import json
import os

import pytest

from tests.support.sdk_types import (
    ANTHROPIC_MESSAGES,
    ANTHROPIC_SYSTEM,
    ANTHROPIC_TOOLS,
    OPENAI_MESSAGES,
    OPENAI_TOOLS,
    sdk_valid,
)
from tests.unit.test_cli import ROOT, run


@pytest.mark.parametrize("name", ["openai-agent-request.json", "multimodal-request.json"])
def test_openai_examples_fit_and_validate(name: str) -> None:
    proc = run("fit", f"examples/native/{name}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok", result.get("error")
    sdk_valid(OPENAI_MESSAGES, result["messages"])
    if "tools" in result:
        sdk_valid(OPENAI_TOOLS, result["tools"])
    assert result["exact"] is False and result["inexact"]
    u = result["usage"]
    slots = ("system", "history", "context", "query", "framing", "tools")
    assert u["total_tokens"] == sum(u[k] for k in slots)


def test_claude_example_fits_offline_with_an_estimate() -> None:
    env = {**os.environ, "TOKENHEAP_ON_COUNT_UNAVAILABLE": "estimate"}
    env.pop("ANTHROPIC_API_KEY", None)
    env.pop("TOKENHEAP_ANTHROPIC_BASE_URL", None)
    proc = run("fit", "examples/native/claude-tools-request.json", env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok", result.get("error")
    sdk_valid(ANTHROPIC_MESSAGES, result["messages"])
    sdk_valid(ANTHROPIC_SYSTEM, result["system"])
    sdk_valid(ANTHROPIC_TOOLS, result["tools"])
    assert result["exact"] is False
    assert any(r.startswith("count: estimate") for r in result["inexact"])


def test_bad_native_part_is_an_error_result_not_a_traceback() -> None:
    doc = json.loads((ROOT / "examples" / "native" / "openai-agent-request.json").read_text())
    del doc["history"][4]  # a tool call left without its result
    proc = run("fit", "-", stdin=json.dumps(doc))
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "error"
    assert result["error"]["code"] == "invalid_request"
    assert "history[3].tool_calls[0]" in result["error"]["message"]

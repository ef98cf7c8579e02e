"""Claude native payloads against the local count_tokens server (the real SDK): tool, image
and document blocks, system blocks and tools reach the count call as they are sent."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

from tests.unit.test_native_fit import check_anthropic_output
from worker.catalog import Catalog
from worker.count.anthropic_api import make_client
from worker.count.cache import CountCache
from worker.count.claude_confirm import PayloadConfirmer
from worker.count.limiter import RateLimiter
from worker.engine.engine import Engine
from worker.engine.request import AssemblyRequest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "native" / "claude-tools-request.json"


def _png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
async def engine(catalog: Catalog, anthropic_server: Any) -> AsyncIterator[Engine]:
    pool = ThreadPoolExecutor(1)
    cache = CountCache(1024 * 1024)

    def counter() -> PayloadConfirmer:
        client = make_client("test-key", anthropic_server.base_url, 2.0, 1)
        return PayloadConfirmer(
            client, RateLimiter(1e6, burst=8), attempts=2, backoff_s=0.01, deadline_s=5.0
        )

    eng = Engine(catalog=catalog, cache=cache, executor=pool, anthropic_factory=counter)
    yield eng
    await eng.aclose()
    pool.shutdown()


def _doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(EXAMPLE.read_text())
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": _png(56, 28)},
    }
    doc["history"][2] = {
        "role": "user",
        "content": [image, {"type": "text", "text": doc["history"][2]["content"]}],
    }
    doc.update(over)
    return doc


async def test_confirmed_count_is_the_servers_count_of_the_native_payload(
    engine: Engine, anthropic_server: Any, anthropic_server_module: ModuleType
) -> None:
    result = await engine.fit(AssemblyRequest.model_validate(_doc()))
    assert result.status == "ok", result.error
    assert result.count_method == "anthropic:count_tokens"
    assert result.exact is True and result.inexact == []
    check_anthropic_output(result)
    messages = [m.model_dump(exclude_none=True) for m in result.messages]
    last = anthropic_server.requests[-1].body
    assert last["messages"] == messages
    assert last["system"] == result.system
    assert last["tools"] == result.tools
    kinds = {b["type"] for m in last["messages"] for b in m["content"] if isinstance(b, dict)}
    assert {"image", "document", "tool_use", "tool_result", "text"} <= kinds
    expected = anthropic_server_module.expected_tokens(result.system, messages, result.tools)
    assert result.usage is not None and result.usage.total_tokens == expected
    u = result.usage
    assert u.total_tokens == u.system + u.history + u.context + u.query + u.framing + u.tools


async def test_url_image_without_size_is_costed_at_worst_case_then_confirmed(
    engine: Engine,
) -> None:
    # count_tokens refuses url sources, so the confirm call fails as a bad request
    doc = _doc()
    doc["history"][2]["content"][0] = {
        "type": "image",
        "source": {"type": "url", "url": "https://example.com/a.png"},
    }
    result = await engine.fit(AssemblyRequest.model_validate(doc))
    assert result.status == "error" and result.error is not None
    assert result.error.code == "invalid_request"

"""The benchmark's simulated prompt caches follow the documented rules on tiny payloads."""

from __future__ import annotations

from decimal import Decimal

from benchmarks.cache_bench import Payload, simulate_anthropic, simulate_openai
from worker.catalog import Catalog


def payload(at: float, sizes: list[int], roles: list[str], salt: str = "") -> Payload:
    """Messages of the given token sizes; message i has token ids unique to (i, salt)."""
    tokens = [[hash((i, salt, k)) % 100_000 for k in range(n)] for i, n in enumerate(sizes)]
    messages = [(r, f"{i}{salt}") for i, r in enumerate(roles)]
    return Payload(at, messages, [*tokens, [1, 2, 3]], 0, 0, 2)


def test_openai_caches_whole_blocks_from_1024(catalog: Catalog) -> None:
    prices = catalog.model("gpt-5").prices
    assert prices is not None
    roles = ["system", "user", "assistant", "user"]
    first = payload(0, [1000, 200, 100, 50], roles)
    second = payload(60, [1000, 200, 100, 50], roles)
    second.tokens[3] = [7] * 80  # a new final user message
    t = simulate_openai([first, second], prices)
    # shared: 1,300 tokens -> 10 whole blocks of 128 = 1,280 cached on the second request
    assert t.cached == 1_280
    assert (
        t.cost
        == (
            Decimal(1353) * Decimal("1.25")
            + Decimal(1383 - 1280) * Decimal("1.25")
            + Decimal(1280) * Decimal("0.125")
        )
        / 1_000_000
    )


def test_openai_ignores_short_prefixes(catalog: Catalog) -> None:
    prices = catalog.model("gpt-5").prices
    assert prices is not None
    roles = ["system", "user"]
    t = simulate_openai([payload(0, [900, 10], roles), payload(1, [900, 10], roles)], prices)
    assert t.cached == 0  # 913 tokens: below the 1,024-token minimum


def test_anthropic_reads_after_a_write_and_expires(catalog: Catalog) -> None:
    prices = catalog.model("claude-sonnet-4-5").prices
    assert prices is not None
    roles = ["system", "user", "assistant", "user"]
    first = payload(0, [1500, 200, 100, 50], roles)
    again = payload(60, [1500, 200, 100, 50], roles)
    late = payload(60 + 301, [1500, 200, 100, 50], roles)
    t = simulate_anthropic([first, again, late], prices, "5m", stable=False)
    # breakpoints at system (1,500) and the last stable block (1,800): written once, read
    # 60 s later, then expired 301 s after that read and written again
    assert t.written == 1_800 + 0 + 1_800
    assert t.cached == 1_800

"""Cost arithmetic against examples worked by hand from the providers' price pages.

OpenAI gpt-5 (openai.com/api/pricing): $1.25 input, $0.125 cached input, $10 output per 1M.
Anthropic Sonnet 4.5 (prompt-caching price table): $3 base, $3.75 5-minute write, $6 1-hour
write, $0.30 cache read, $15 output per 1M. gpt-4: $30 / $60, no prompt caching.
"""

from __future__ import annotations

import datetime as dt
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from worker.catalog import Catalog, load_catalog
from worker.engine.pricing import (
    Prices,
    affordable_input_tokens,
    estimate,
    input_cost,
    output_cost,
)

CONFIG = Path(__file__).resolve().parents[2] / "config"


def prices(catalog: Catalog, model: str) -> Prices:
    found = catalog.model(model).prices
    assert found is not None, f"{model} has no prices in config/models.yaml"
    return found


def test_gpt5_cached_prefix(catalog: Catalog) -> None:
    # 100,000 input tokens, 60,032 of them a cached prefix (1,024 + guaranteed 128-blocks):
    # 39,968 x $1.25/M = $0.04996, 60,032 x $0.125/M = $0.007504, together $0.057464.
    got = input_cost(prices(catalog, "gpt-5"), 100_000, cached_tokens=60_032)
    assert got == Decimal("0.057464")


def test_gpt5_without_cache_and_output_reserve(catalog: Catalog) -> None:
    p = prices(catalog, "gpt-5-2025-08-07")  # a dated snapshot prices as its family
    assert input_cost(p, 12_000) == Decimal("0.015")  # 12,000 x $1.25/M
    assert output_cost(p, 1_600) == Decimal("0.016")  # 1,600 x $10/M


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        # 20,000 fresh x $3 = 60,000; 20,000 read x $0.30 = 6,000; 10,000 written x $3.75 =
        # 37,500 (5 min) or x $6 = 60,000 (1 h); per million tokens.
        ("5m", Decimal("0.1035")),
        ("1h", Decimal("0.126")),
    ],
)
def test_sonnet_reads_and_writes(catalog: Catalog, ttl: str, expected: Decimal) -> None:
    p = prices(catalog, "claude-sonnet-4-5-20250929")
    got = input_cost(p, 50_000, cached_tokens=20_000, cache_write_tokens=10_000, write_ttl=ttl)  # type: ignore[arg-type]
    assert got == expected


def test_model_without_caching_bills_cached_tokens_in_full(catalog: Catalog) -> None:
    p = prices(catalog, "gpt-4")
    assert input_cost(p, 1_000, cached_tokens=500) == Decimal("0.03")  # 1,000 x $30/M


def test_openai_writes_cost_the_input_rate(catalog: Catalog) -> None:
    p = prices(catalog, "gpt-4o")  # no write fee before GPT-5.6
    assert input_cost(p, 2_000, cache_write_tokens=2_000) == Decimal("0.005")  # 2,000 x $2.5


def test_estimate_block(catalog: Catalog) -> None:
    # Haiku 4.5: $1 base, $0.10 read, $1.25 5-min write, $5 output.
    # 8,000 input: 5,000 read = 500, 2,000 written = 2,500, 1,000 fresh = 1,000 -> $0.004;
    # reserve 2,000 x $5 = $0.01.
    got = estimate(
        prices(catalog, "claude-haiku-4-5"),
        input_tokens=8_000,
        output_reserve=2_000,
        cached_tokens=5_000,
        cache_write_tokens=2_000,
    )
    assert (got.input, got.output_worst_case, got.total_worst_case) == (0.004, 0.01, 0.014)
    assert got.currency == "USD" and "LiteLLM" in got.price_source
    assert got.prices_as_of == dt.date(2026, 12, 1)


def test_rates_are_exact_decimals(catalog: Catalog) -> None:
    p = prices(catalog, "gpt-5-nano")
    assert (p.input, p.cached_input, p.output) == (
        Decimal("0.05"),
        Decimal("0.005"),
        Decimal("0.4"),
    )


def test_every_model_row_has_prices(catalog: Catalog) -> None:
    missing = [name for name, info in catalog.models.items() if info.prices is None]
    assert missing == []
    for name, info in catalog.models.items():
        p = info.prices
        assert p is not None
        if info.provider == "anthropic":  # the documented multipliers (PAYLOADS.md §2.4)
            assert p.cached_input == p.input / 10, name
            assert p.cache_write_5m == p.input * Decimal("1.25"), name
            assert p.cache_write_1h == p.input * 2, name


def test_parts_cannot_exceed_the_whole(catalog: Catalog) -> None:
    with pytest.raises(ValueError, match="exceed"):
        input_cost(prices(catalog, "gpt-5"), 1_000, cached_tokens=800, cache_write_tokens=300)


def test_prices_reject_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        Prices.model_validate(
            {"input": 1, "output": 2, "source": "x", "as_of": "2026-12-01", "cache_read": 0.1}
        )


def test_a_users_row_overrides_the_prices(tmp_path: Path) -> None:
    shutil.copy(CONFIG / "profiles.yaml", tmp_path / "profiles.yaml")
    (tmp_path / "models.yaml").write_text(
        "models:\n"
        "  gpt-5: {provider: openai, encoding: o200k_base, context_window: 400000,\n"
        "          max_output: 128000, prices: {input: 1, cached_input: 0.1, output: 8,\n"
        "          source: our contract, as_of: 2026-11-01}}\n",
        encoding="utf-8",
    )
    p = load_catalog(tmp_path).model("gpt-5").prices
    assert p is not None and p.source == "our contract"
    assert input_cost(p, 1_000_000) == Decimal(1)


RATE = st.decimals(min_value=0, max_value=100, places=3)


@given(
    base=RATE.filter(lambda d: d > 0),
    discount=st.decimals(min_value=0, max_value=1, places=3),
    cap=st.decimals(min_value=0, max_value=10, places=6),
    cached=st.integers(0, 2_000_000),
)
def test_affordable_tokens_are_the_most_the_cap_pays_for(
    base: Decimal, discount: Decimal, cap: Decimal, cached: int
) -> None:
    p = Prices(
        input=base, cached_input=base * discount, output=base, source="t", as_of=dt.date.today()
    )
    n = affordable_input_tokens(p, cap, cached_tokens=cached)
    read = min(cached, n)
    assert input_cost(p, n, cached_tokens=read) <= cap
    one_more = input_cost(p, n + 1, cached_tokens=min(cached, n + 1))
    assert one_more > cap or (read == n + 1 and p.read_rate() == 0)


@given(total=st.integers(0, 10**7), data=st.data())
def test_reading_from_cache_never_costs_more(total: int, data: st.DataObject) -> None:
    p = Prices(
        input=Decimal(3),
        cached_input=Decimal("0.3"),
        output=Decimal(15),
        source="t",
        as_of=dt.date.today(),
    )
    a = data.draw(st.integers(0, total))
    b = data.draw(st.integers(a, total))
    assert input_cost(p, total, cached_tokens=b) <= input_cost(p, total, cached_tokens=a)

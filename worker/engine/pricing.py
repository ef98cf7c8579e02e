"""Prices per model and the cost arithmetic of one request: expected input, worst-case output.

Prices are data (`prices:` on a model row in config/models.yaml), in **USD per million
tokens**, as the providers' price pages print them, so a row can be checked against the page
by eye. Arithmetic is in `Decimal` so a sum of many requests does not drift; the result model
reports floats rounded to a nano-dollar, enough for metrics and a per-request budget.

Billing model (PAYLOADS.md §1.5, §2.4): of a request's input tokens, the part read from the
provider's prompt cache is billed at `cached_input`, the part written to it at the write
rate of its TTL (Anthropic: 1.25x for 5 minutes, 2x for 1 hour; OpenAI before GPT-5.6: no
write fee, so `cache_write_*` is absent and writes cost `input`), the rest at `input`.
Pure: no I/O. The `Prices` rows themselves are catalog data (`worker/catalog.py`).
"""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_FLOOR, Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict

from worker.catalog import CacheTTL, Prices

PER = Decimal(1_000_000)
"""Prices are per this many tokens."""
_NANO = Decimal("0.000000001")


def input_cost(
    prices: Prices,
    input_tokens: int,
    cached_tokens: int = 0,
    cache_write_tokens: int = 0,
    write_ttl: CacheTTL = "5m",
) -> Decimal:
    """Cost of a request's input; `input_tokens` is everything sent, the other two are parts.

    >>> p = Prices(input=Decimal("1.25"), cached_input=Decimal("0.125"), output=Decimal(10),
    ...            source="example", as_of=dt.date(2026, 12, 1))
    >>> input_cost(p, 10_000, cached_tokens=8_192)
    Decimal('0.003284')
    """
    if min(input_tokens, cached_tokens, cache_write_tokens) < 0:
        raise ValueError("token counts cannot be negative")
    if cached_tokens + cache_write_tokens > input_tokens:
        raise ValueError(
            f"cached ({cached_tokens}) plus written ({cache_write_tokens}) tokens exceed "
            f"the {input_tokens} input tokens they are part of"
        )
    fresh = input_tokens - cached_tokens - cache_write_tokens
    total = (
        fresh * prices.input
        + cached_tokens * prices.read_rate()
        + cache_write_tokens * prices.write_rate(write_ttl)
    )
    return total / PER


def output_cost(prices: Prices, output_tokens: int) -> Decimal:
    """Cost of `output_tokens` of reply; with the output reserve, the worst case."""
    if output_tokens < 0:
        raise ValueError("token counts cannot be negative")
    return output_tokens * prices.output / PER


def affordable_input_tokens(prices: Prices, max_input_cost: Decimal, cached_tokens: int = 0) -> int:
    """Most input tokens `max_input_cost` pays for when `cached_tokens` of them are read
    from the cache (a `budget.max_input_cost` turned into a token cap for the allocator).

    >>> p = Prices(input=Decimal(2), cached_input=Decimal("0.5"), output=Decimal(8),
    ...            source="example", as_of=dt.date(2026, 12, 1))
    >>> affordable_input_tokens(p, Decimal("0.01"), cached_tokens=4_000)
    8000
    >>> affordable_input_tokens(p, Decimal("0.01"), cached_tokens=2_000)
    6500
    """
    if max_input_cost < 0 or cached_tokens < 0:
        raise ValueError("a cost cap and a token count cannot be negative")
    budget = max_input_cost * PER
    read = prices.read_rate()
    if cached_tokens * read >= budget:
        return int((budget / read).to_integral_value(ROUND_FLOOR)) if read > 0 else cached_tokens
    if prices.input == 0:
        raise ValueError("an input price of 0 puts no cap on tokens")
    rest = (budget - cached_tokens * read) / prices.input
    return cached_tokens + int(rest.to_integral_value(ROUND_FLOOR))


class CostEstimate(BaseModel):
    """`usage.cost` of a fit result: what the payload is expected to cost, before sending."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: Literal["USD"] = "USD"
    input: float
    """Expected input cost: the cached prefix at the cached rate, writes at theirs."""
    output_worst_case: float
    """The whole output reserve at the output rate: the most the reply can cost."""
    total_worst_case: float
    """input + output_worst_case: the most this request can cost."""
    cached_tokens: int
    """Input tokens assumed read from the prompt cache."""
    cache_write_tokens: int
    """Input tokens assumed written to it."""
    write_ttl: CacheTTL
    price_source: str
    prices_as_of: dt.date
    max_input_cost: float | None = None
    """The request's `budget.max_input_cost`, when it set one (`input` never exceeds it)."""


def estimate(
    prices: Prices,
    *,
    input_tokens: int,
    output_reserve: int,
    cached_tokens: int = 0,
    cache_write_tokens: int = 0,
    write_ttl: CacheTTL = "5m",
    max_input_cost: Decimal | None = None,
) -> CostEstimate:
    """The cost block of one fitted request."""
    cin = input_cost(prices, input_tokens, cached_tokens, cache_write_tokens, write_ttl)
    cout = output_cost(prices, output_reserve)
    return CostEstimate(
        input=_usd(cin),
        output_worst_case=_usd(cout),
        total_worst_case=_usd(cin + cout),
        cached_tokens=cached_tokens,
        cache_write_tokens=cache_write_tokens,
        write_ttl=write_ttl,
        price_source=prices.source,
        prices_as_of=prices.as_of,
        max_input_cost=None if max_input_cost is None else float(max_input_cost),
    )


def _usd(amount: Decimal) -> float:
    return float(amount.quantize(_NANO))

"""Prices and costs: exact integers in micro-USD, rounded up once, never floats."""

from __future__ import annotations

from decimal import Decimal

import pytest

from extproc.budgets.pricing import (
    FREE,
    Amount,
    Price,
    cost_micro_usd,
    micro_to_usd,
    usd_to_micro,
)


@pytest.mark.parametrize(
    ("value", "micro"),
    [
        pytest.param("2.50", 2_500_000, id="str"),
        pytest.param(Decimal("0.15"), 150_000, id="decimal"),
        pytest.param(10, 10_000_000, id="int"),
        pytest.param(0.15, 150_000, id="float-short-repr"),
        pytest.param(2.5, 2_500_000, id="float-yaml"),
        pytest.param("0.000001", 1, id="six-decimals"),
        pytest.param(" 1.5 ", 1_500_000, id="whitespace"),
        pytest.param("0", 0, id="zero"),
    ],
)
def test_usd_to_micro_is_exact(value: Amount, micro: int) -> None:
    result = usd_to_micro(value)
    assert result == micro
    assert type(result) is int


@pytest.mark.parametrize(
    ("value", "error", "fragment"),
    [
        pytest.param("0.0000001", ValueError, "at most 6 decimals", id="seven-decimals-str"),
        pytest.param(0.1234567, ValueError, "at most 6 decimals", id="seven-decimals-float"),
        pytest.param(0.1 + 0.2, ValueError, "at most 6 decimals", id="float-noise"),
        pytest.param("-1", ValueError, "between 0", id="negative"),
        pytest.param("nan", ValueError, "between 0", id="nan"),
        pytest.param(float("inf"), ValueError, "between 0", id="inf"),
        pytest.param("1e12", ValueError, "between 0", id="absurd"),
        pytest.param("two dollars", ValueError, "not a decimal", id="text"),
        pytest.param(True, TypeError, "expected a number", id="bool"),
        pytest.param(None, TypeError, "expected a number", id="none"),
    ],
)
def test_usd_to_micro_rejects(value: object, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        usd_to_micro(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("micro", "text"),
    [(0, "0"), (1, "0.000001"), (1_500, "0.0015"), (2_000_000, "2"), (12_345_678, "12.345678")],
)
def test_micro_to_usd(micro: int, text: str) -> None:
    assert micro_to_usd(micro) == text


def test_price_from_usd_defaults_cached_to_input() -> None:
    price = Price.from_usd(input="2.50", output="10")
    assert price == Price(input=2_500_000, cached_input=2_500_000, output=10_000_000)


def test_price_rejects_non_int_fields() -> None:
    with pytest.raises(ValueError, match="non-negative int"):
        Price(input=1.5, cached_input=0, output=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative int"):
        Price(input=-1, cached_input=0, output=0)


GPT_4O = Price.from_usd(input="2.50", cached_input="1.25", output="10.00")
NANO = Price.from_usd(input="0.05", cached_input="0.005", output="0.40")


@pytest.mark.parametrize(
    ("price", "tokens", "micro"),
    [
        pytest.param(GPT_4O, (1_000_000, 0, 0), 2_500_000, id="one-million-input"),
        pytest.param(GPT_4O, (0, 0, 1_000_000), 10_000_000, id="one-million-output"),
        pytest.param(GPT_4O, (1, 0, 0), 3, id="one-token-rounds-up-2.5"),
        # 600 uncached * 2.5 + 400 cached * 1.25 + 200 out * 10 = 1500 + 500 + 2000
        pytest.param(GPT_4O, (1_000, 400, 200), 4_000, id="mix"),
        # 8 * 0.05 + 377 * 0.40 = 0.4 + 150.8 = 151.2 → 152
        pytest.param(NANO, (8, 0, 377), 152, id="chat-basic-rounds-once"),
        pytest.param(NANO, (3, 3, 0), 1, id="cached-only-rounds-up"),
        pytest.param(GPT_4O, (0, 0, 0), 0, id="nothing-is-free"),
        pytest.param(FREE, (10**9, 10**8, 10**9), 0, id="free"),
    ],
)
def test_cost_is_exact_and_rounds_up_once(
    price: Price, tokens: tuple[int, int, int], micro: int
) -> None:
    cost = cost_micro_usd(price, *tokens)
    assert type(cost) is int
    # The reference: exact rational arithmetic, one ceiling at the end.
    uncached = tokens[0] - tokens[1]
    exact = (
        Decimal(uncached) * Decimal(price.input)
        + Decimal(tokens[1]) * Decimal(price.cached_input)
        + Decimal(tokens[2]) * Decimal(price.output)
    ) / Decimal(1_000_000)
    assert cost == int(exact.to_integral_value(rounding="ROUND_CEILING"))
    assert cost == micro


def test_rounding_happens_once_per_call_not_per_part() -> None:
    price = Price.from_usd(input="0.4", cached_input="0.4", output="0.4")
    # Each part alone is 0.4 micro-USD (rounds up to 1); together 1.2 → 2, not 3.
    assert cost_micro_usd(price, 2, 1, 1) == 2


def test_huge_counts_stay_exact() -> None:
    price = Price.from_usd(input="123.456789", output="987.654321")
    cost = cost_micro_usd(price, 10**15 + 1, 0, 10**15 + 3)
    assert cost == -(-((10**15 + 1) * 123_456_789 + (10**15 + 3) * 987_654_321) // 10**6)


@pytest.mark.parametrize(
    "tokens",
    [
        pytest.param((-1, 0, 0), id="negative-input"),
        pytest.param((1, 0, -1), id="negative-output"),
        pytest.param((1, 2, 0), id="cached-over-input"),
        pytest.param((1, -1, 0), id="negative-cached"),
    ],
)
def test_cost_rejects_bad_counts(tokens: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="token counts"):
        cost_micro_usd(GPT_4O, *tokens)


def test_cache_writes_are_charged_at_their_own_price() -> None:
    """Anthropic: 1,000 prompt tokens of which 200 read from the cache and 500 written to
    it, at 0.80 input, 0.08 cached and 1.00 (1.25x) written, plus 10 output at 4.00."""
    haiku = Price.from_usd(input="0.80", cached_input="0.08", cache_write="1.00", output="4.00")
    # 300 * 0.8 + 200 * 0.08 + 500 * 1.0 + 10 * 4 = 240 + 16 + 500 + 40 = 796
    assert cost_micro_usd(haiku, 1_000, 200, 10, 500) == 796
    plain = Price.from_usd(input="0.80", cached_input="0.08", output="4.00")
    # No cache_write price: written tokens cost the input price (300 + 500) * 0.8 + ...
    assert cost_micro_usd(plain, 1_000, 200, 10, 500) == 696
    with pytest.raises(ValueError, match="token counts"):
        cost_micro_usd(haiku, 100, 60, 0, 50)  # cached + written over input


def test_one_hour_cache_writes_are_charged_at_twice_the_input_unless_priced() -> None:
    """Anthropic bills a write to its 1-hour cache at 2x the input price (5-minute: 1.25x):
    they were all charged at the 5-minute price."""
    haiku = Price.from_usd(input="0.80", cached_input="0.08", cache_write="1.00", output="4.00")
    # 500 written, 200 of them for an hour: 300 * 1.0 + 200 * 1.6 instead of 500 * 1.0.
    assert cost_micro_usd(haiku, 1_000, 200, 10, 500, 200) == 796 - 200 + 320
    priced = Price.from_usd(input="0.80", cache_write="1.00", cache_write_1h="2.00", output="4")
    assert cost_micro_usd(priced, 500, 0, 0, 500, 200) == 300 + 400
    with pytest.raises(ValueError, match="token counts"):
        cost_micro_usd(haiku, 1_000, 0, 0, 100, 101)  # more 1-hour writes than writes

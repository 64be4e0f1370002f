"""Model prices and exact request costs, as integers.

Money is never a float here: a float cannot hold 0.15 exactly, and summing millions of
rounded costs drifts. Prices are written by people in USD per million tokens (``"2.50"``)
and stored as integer *micro-USD per million tokens* (2.50 → 2_500_000). Because a price
in USD per million tokens is numerically the price in micro-USD per token, a cost in
micro-USD is ``tokens * price_field / 1_000_000``: one integer division per request, rounded
up once, so a budget is never under-charged by rounding.

Prices may carry at most 6 decimals (a millionth of a dollar per million tokens), which
keeps every value exact. Floats are accepted only because YAML turns ``2.5`` into one;
their shortest decimal form must also fit in 6 decimals, anything else is rejected rather
than silently rounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Final

MICRO: Final = 1_000_000
"""Micro-units per unit (micro-USD per USD) and tokens per price unit (per million)."""
MAX_DECIMALS: Final = 6
MAX_USD: Final = Decimal(1_000_000_000)
"""Sanity bound on any single price or amount: well above any real value."""

Amount = Decimal | str | int | float
"""What a policy file may give for a USD amount; converted exactly or rejected."""


def usd_to_micro(value: Amount, what: str = "amount") -> int:
    """An exact USD amount with at most 6 decimals, as integer micro-USD.

    Raises :class:`ValueError` (naming ``what``) for negative, non-finite, oversized or
    over-precise values and :class:`TypeError` for anything that is not a number or string.
    """
    amount = _decimal(value, what)
    if not amount.is_finite() or amount < 0 or amount > MAX_USD:
        raise ValueError(f"{what}: expected a USD amount between 0 and {MAX_USD}, got {value!r}")
    micro = amount.scaleb(MAX_DECIMALS)
    if micro != micro.to_integral_value():
        raise ValueError(f"{what}: at most {MAX_DECIMALS} decimals allowed, got {value!r}")
    return int(micro)


def micro_to_usd(micro: int) -> str:
    """Micro-USD as a plain decimal string (``1_500`` → ``"0.0015"``), e.g. for headers."""
    text = format(Decimal(micro).scaleb(-MAX_DECIMALS), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices, each in integer micro-USD per million tokens.

    Build from USD with :meth:`from_usd`; the fields are already-exact integers.
    """

    input: int
    cached_input: int
    """Price of prompt tokens served from the provider's cache (usually discounted)."""
    output: int
    cache_write: int | None = None
    """Price of prompt tokens written to the provider's cache (Anthropic bills them above
    the input price); ``None``: the input price."""
    cache_write_1h: int | None = None
    """Price of those written to Anthropic's 1-hour cache; ``None``: twice the input price,
    as Anthropic bills them."""

    @property
    def hour_write(self) -> int:
        """What a token written to the 1-hour cache costs (:attr:`cache_write_1h`)."""
        return 2 * self.input if self.cache_write_1h is None else self.cache_write_1h

    def __post_init__(self) -> None:
        for name in ("cache_write", "cache_write_1h"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"Price.{name} must be a non-negative int, got {value!r}")
        for name in ("input", "cached_input", "output"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"Price.{name} must be a non-negative int, got {value!r}")

    @classmethod
    def from_usd(
        cls,
        *,
        input: Amount,
        output: Amount,
        cached_input: Amount | None = None,
        cache_write: Amount | None = None,
        cache_write_1h: Amount | None = None,
    ) -> Price:
        """Prices in USD per million tokens; cached input and cache writes default to the
        input price."""
        micro_input = usd_to_micro(input, "input price")
        return cls(
            input=micro_input,
            cached_input=(
                micro_input
                if cached_input is None
                else usd_to_micro(cached_input, "cached_input price")
            ),
            output=usd_to_micro(output, "output price"),
            cache_write=None
            if cache_write is None
            else usd_to_micro(cache_write, "cache_write price"),
            cache_write_1h=None
            if cache_write_1h is None
            else usd_to_micro(cache_write_1h, "cache_write_1h price"),
        )


FREE: Final = Price(input=0, cached_input=0, output=0)


def cost_micro_usd(
    price: Price,
    input_tokens: int,
    cached_input_tokens: int,
    output_tokens: int,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
) -> int:
    """Cost of one request in micro-USD, rounded up once.

    ``input_tokens`` is every prompt token *including* the cached ones and those written
    to the cache, as OpenAI reports ``prompt_tokens`` (Anthropic reports cache reads and
    writes apart: pass their sum); ``cached_input_tokens`` of them are charged at the
    cached price and ``cache_write_tokens`` at the cache-write price instead,
    ``cache_write_1h_tokens`` of those at the 1-hour cache's.
    """
    special = cached_input_tokens + cache_write_tokens
    if (
        input_tokens < 0
        or output_tokens < 0
        or cached_input_tokens < 0
        or cache_write_tokens < 0
        or not 0 <= cache_write_1h_tokens <= cache_write_tokens
        or special > input_tokens
    ):
        raise ValueError(
            "token counts must be >= 0 with cached + cache-written <= input and the 1-hour "
            f"writes among the written, got input={input_tokens} cached={cached_input_tokens} "
            f"written={cache_write_tokens} (1h {cache_write_1h_tokens}) output={output_tokens}"
        )
    write = price.input if price.cache_write is None else price.cache_write
    write_1h = price.hour_write
    scaled = (
        (input_tokens - special) * price.input
        + cached_input_tokens * price.cached_input
        + (cache_write_tokens - cache_write_1h_tokens) * write
        + cache_write_1h_tokens * write_1h
        + output_tokens * price.output
    )
    return -(-scaled // MICRO)


def _decimal(value: Amount, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, Decimal | str | int | float):
        raise TypeError(f"{what}: expected a number or a decimal string, got {value!r}")
    if isinstance(value, float):
        # repr() is the shortest string that round-trips, i.e. what the author wrote.
        value = repr(value)
    try:
        return Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise ValueError(f"{what}: not a decimal number: {value!r}") from None

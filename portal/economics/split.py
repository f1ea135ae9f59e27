"""Input vs output cost: the one rule that splits a deployment's cost between the tokens it read (prefill) and
the tokens it wrote (decode), so a price book's input and output prices can each be checked against cost.

The operator chooses the rule (docs/economics.md):
- time: by the measured time its requests spent in prefill and in decode (vLLM V1's
  request_prefill_time_seconds and request_decode_time_seconds sums). Where the engine exports neither, the
  deployment falls back to token counts and is counted as not measured.
- tokens: by token counts: every token, read or written, costs the same.
- weighted: by token counts, an output token weighing `output_weight` input tokens (a price book's ratio).
The split of every deployment is made on its own and then summed, so a model served by engines with and without
phase times never mixes their bases. Money stays Decimal; the two parts add up to the cost exactly.
"""

from dataclasses import dataclass
from decimal import Decimal

from django.db import models

from portal.economics.costmodel import MILLION, ZERO

PER_MTOK_PLACES = Decimal("0.0001")


class SplitRule(models.TextChoices):
    TIME = "time", "measured prefill vs decode time"
    TOKENS = "tokens", "token counts"
    WEIGHTED = "weighted", "token counts, output weighted"


@dataclass
class TokenTypeCost:
    """A scope's cost split into input and output, with the tokens of each and how much rests on measured time."""

    input_cost: Decimal = ZERO
    output_cost: Decimal = ZERO
    input_tokens: int = 0
    output_tokens: int = 0
    measured_tokens: int = 0  # tokens of deployments split by their measured phase times
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def input_per_million(self) -> Decimal | None:
        return _per_million(self.input_cost, self.input_tokens)

    @property
    def output_per_million(self) -> Decimal | None:
        return _per_million(self.output_cost, self.output_tokens)

    @property
    def prefill_share(self) -> float | None:
        """Of the time the requests spent in prefill or decode, the share in prefill (None: not exported)."""
        total = self.prefill_seconds + self.decode_seconds
        return self.prefill_seconds / total if total else None

    @property
    def measured_share(self) -> float | None:
        tokens = self.input_tokens + self.output_tokens
        return self.measured_tokens / tokens if tokens else None

    def add(self, other: "TokenTypeCost") -> None:
        for name in ("input_cost", "output_cost", "input_tokens", "output_tokens", "measured_tokens",
                     "prefill_seconds", "decode_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _per_million(cost: Decimal, tokens: int) -> Decimal | None:
    return (cost / tokens * MILLION).quantize(PER_MTOK_PLACES) if tokens else None


def cost_split(*, cost: Decimal, input_tokens: int, output_tokens: int, prefill_seconds: float,
               decode_seconds: float, rule: str, output_weight: Decimal = Decimal(1)) -> TokenTypeCost:
    """One deployment's cost over a period split by `rule`. The input part is computed and the output part is
    the rest, so input + output == cost to the last digit."""
    measured = rule == SplitRule.TIME and prefill_seconds > 0 and decode_seconds > 0
    if measured:
        # Decimal from the float's repr: the shares are exact ratios of what was stored.
        prefill, decode = Decimal(repr(prefill_seconds)), Decimal(repr(decode_seconds))
        input_share = prefill / (prefill + decode)
    else:
        weight = output_weight if rule == SplitRule.WEIGHTED else Decimal(1)
        weighted = input_tokens + weight * output_tokens
        input_share = Decimal(input_tokens) / weighted if weighted else ZERO
    input_cost = cost * input_share
    return TokenTypeCost(input_cost=input_cost, output_cost=cost - input_cost, input_tokens=input_tokens,
                         output_tokens=output_tokens,
                         measured_tokens=input_tokens + output_tokens if measured else 0,
                         prefill_seconds=prefill_seconds, decode_seconds=decode_seconds)

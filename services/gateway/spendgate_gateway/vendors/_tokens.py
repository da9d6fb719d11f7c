"""What the LLM vendors share: exact token prices and an upper bound of input tokens.

Prices are integers of micro-USD per million tokens, parsed exactly from the price files'
decimal USD strings (``"2.50"`` per million tokens -> ``2_500_000``). A cost is the sum of
tokens times price, rounded up to a whole micro once, at the end.

The input bound (docs/vendors.md, "Estimating input tokens"): every tokenizer these
vendors use splits text into non-empty pieces of its UTF-8 bytes, so a text never has
more tokens than bytes. The scan below adds up the UTF-8 bytes of every string in the
request body, keys included (the keys more than pay for the few formatting tokens per
message), counts every number as one token (embedding inputs may be token ids), counts
each image at the model's most expensive image, and notes content it cannot see (stored
files, earlier responses): then only the model's context window bounds the input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from spendgate_common.money import parse_usd

ModelT = TypeVar("ModelT")

TOKENS_PER_PRICE_UNIT = 1_000_000
# How the input scan treats one JSON object of a request body.
PartKind = Literal["text", "image", "unseen"]


@dataclass(frozen=True, slots=True)
class PriceTable(Generic[ModelT]):
    """A vendor's model prices from one version of its price file."""

    version: str
    models: Mapping[str, ModelT]

    def model(self, name: str) -> ModelT | None:
        return self.models.get(name)

    @classmethod
    def with_aliases(
        cls, file: str, version: str, models: dict[str, ModelT], aliases: Mapping[str, str]
    ) -> PriceTable[ModelT]:
        """The table with each alias priced as the listed model it names; raises
        ValueError for an alias of an unlisted model or one that shadows a listed one."""
        listed = frozenset(models)
        for alias, target in aliases.items():
            if target not in models or alias in listed:
                raise ValueError(f"{file} aliases.{alias}: must name a listed model")
            models[alias] = models[target]
        return cls(version, models)


def micros_per_million_tokens(usd: str, *, field_name: str) -> int:
    """A price file's ``"2.50"`` (USD per million tokens) as micro-USD per million tokens.

    Raises :class:`~spendgate_common.errors.InvalidAmountError` for anything that is not
    an exact non-negative decimal with at most six decimals (fails the gateway's start).
    """
    return parse_usd(usd, field=field_name, allow_zero=True)


def cost_micros(*tokens_and_prices: tuple[int, int]) -> int:
    """Sum of ``tokens * micros_per_million_tokens``, in micro-USD, rounded up once."""
    total = 0
    for tokens, price in tokens_and_prices:
        assert tokens >= 0, tokens
        assert price >= 0, price
        total += tokens * price
    return -(-total // TOKENS_PER_PRICE_UNIT)


@dataclass(slots=True)
class InputScan:
    """What one walk over a request body found (see the module docstring)."""

    text_bytes: int = 0
    numbers: int = 0
    images: int = 0
    # Why part of the input is invisible to us, e.g. "file" or "previous_response_id".
    unseen: list[str] = field(default_factory=list)
    # Anthropic prompt-caching marks: the TTLs asked for ("5m" when none is given).
    cache_ttls: set[str] = field(default_factory=set)

    def tokens_max(
        self, *, overhead_tokens: int, image_tokens_max: int, context_window_tokens: int
    ) -> int:
        """The input bound: never above the context window, the window when content is unseen."""
        if self.unseen:
            return context_window_tokens
        total = overhead_tokens + self.text_bytes + self.numbers + self.images * image_tokens_max
        return min(total, context_window_tokens)


def scan_input(body: object, classify: Callable[[dict[str, object]], PartKind]) -> InputScan:
    """Walk a decoded JSON body (iteratively: depth is bounded only by the body's size).

    ``classify`` looks at every JSON object: ``"image"`` counts it as one image,
    ``"unseen"`` as content we cannot see; neither is read further (so a base64 image is
    not counted as text). ``"text"`` reads it like any other object.
    """
    scan = InputScan()
    stack: list[object] = [body]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            scan.text_bytes += _utf8_length(value)
        elif isinstance(value, dict):
            kind = classify(value)
            if kind == "image":
                scan.images += 1
                continue
            if kind == "unseen":
                scan.unseen.append(str(value.get("type")))
                continue
            for key, item in value.items():
                scan.text_bytes += _utf8_length(key)
                if key == "cache_control" and isinstance(item, dict):
                    ttl = item.get("ttl")
                    scan.cache_ttls.add(ttl if isinstance(ttl, str) else "5m")
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            scan.numbers += 1
    return scan


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))

"""One module per vendor; :data:`VENDORS` maps the proxy path's first segment to it."""

from spendgate_gateway.vendors._base import (
    Call,
    Estimate,
    Outcome,
    Settlement,
    StreamMeter,
    UnpricedCallError,
    Vendor,
)
from spendgate_gateway.vendors.anthropic import Anthropic
from spendgate_gateway.vendors.openai import OpenAI
from spendgate_gateway.vendors.stripe import Stripe

VENDORS: dict[str, Vendor] = {"stripe": Stripe(), "openai": OpenAI(), "anthropic": Anthropic()}

__all__ = [
    "VENDORS",
    "Call",
    "Estimate",
    "Outcome",
    "Settlement",
    "StreamMeter",
    "UnpricedCallError",
    "Vendor",
]

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
from spendgate_gateway.vendors.resend import Resend
from spendgate_gateway.vendors.stripe import Stripe
from spendgate_gateway.vendors.twilio import Twilio

# Twilio here has no settings: it serves keys, settling and errors; the estimate step uses
# one configured from the settings (vendors/_pricer.py).
VENDORS: dict[str, Vendor] = {
    "stripe": Stripe(),
    "openai": OpenAI(),
    "anthropic": Anthropic(),
    "twilio": Twilio(),
    "resend": Resend(),
}

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

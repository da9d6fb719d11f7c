"""Small local look-alikes of vendor APIs, for trying Spendgate out and for tests.

They are real HTTP servers that speak enough of each vendor's wire format for the
vendor's official SDK to work against them. They also record every request they receive
(``GET /_fake/requests``), so a test can prove what did and did not reach the vendor.
"""

from __future__ import annotations

import uvicorn

from spendgate_cli.fake_vendors.anthropic import create_anthropic_app
from spendgate_cli.fake_vendors.openai import create_openai_app
from spendgate_cli.fake_vendors.resend import create_resend_app
from spendgate_cli.fake_vendors.stripe import create_stripe_app
from spendgate_cli.fake_vendors.twilio import create_twilio_app

FAKE_VENDORS = {
    "stripe": create_stripe_app,
    "openai": create_openai_app,
    "anthropic": create_anthropic_app,
    "twilio": create_twilio_app,
    "resend": create_resend_app,
}


def serve(vendor: str, host: str, port: int) -> None:
    """Run the fake ``vendor`` on ``host:port`` until interrupted."""
    factory = FAKE_VENDORS.get(vendor)
    if factory is None:
        raise SystemExit(f"no fake vendor named {vendor!r} (known: {', '.join(FAKE_VENDORS)})")
    print(f"fake {vendor} listening on http://{host}:{port}", flush=True)
    uvicorn.run(factory(), host=host, port=port, log_level="warning", access_log=False)


__all__ = ["FAKE_VENDORS", "serve"]

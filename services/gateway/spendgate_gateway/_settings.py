"""The gateway's settings, read once at start from ``SPENDGATE_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

from spendgate_common.errors import ConfigurationError
from spendgate_common.settings import CommonSettings, Env
from spendgate_gateway.vendors._fixed import NO_FIXED_COSTS, FixedCosts, parse_fixed_costs
from spendgate_gateway.vendors.twilio import TWILIO_DEFAULTS, TwilioSettings

# Vendors the gateway knows; each reads SPENDGATE_<VENDOR>_BASE_URL and _API_KEY.
VENDOR_DEFAULT_BASE_URLS = {
    "stripe": "https://api.stripe.com",
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "twilio": "https://api.twilio.com",
    "resend": "https://api.resend.com",
}

# Ledger requests in flight per partition (SPENDGATE_GATEWAY_LEDGER_INFLIGHT_MAX): calls
# beyond it wait and leave together in the next request. 2 measured best on one hot
# budget (bench/ledger, 2026-12-07: 15,232 pairs/s and open-loop p99 40 ms, against
# 13,658 and 44 ms with 4, 14,656 and 59 ms with 1): fewer, larger batches.
LEDGER_INFLIGHT_PER_PARTITION_DEFAULT = 2


@dataclass(frozen=True, slots=True)
class VendorSettings:
    name: str
    base_url: str
    # None when not configured: calls to this vendor are refused with vendor_not_configured.
    api_key: str | None = None


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    common: CommonSettings
    admin_token: str
    host: str
    port: int
    vendors: dict[str, VendorSettings]
    ledger_timeout: timedelta
    # Requests in flight to the ledger per partition; beyond it calls are coalesced.
    ledger_inflight_per_partition_max: int
    # How long a proxied call's settle may wait to ride along with the partition's next
    # ledger command (0: sent at once).
    settle_linger: timedelta
    body_bytes_max: int
    key_ttl_default: timedelta
    upstream_connect_timeout: timedelta
    upstream_read_timeout: timedelta
    upstream_connections_max: int
    # Idle upstream connections kept per vendor (at most upstream_connections_max).
    upstream_keepalive_max: int
    # Proxy calls in progress beyond which a call is refused 503 overloaded.
    proxy_inflight_max: int
    shutdown_deadline: timedelta
    # Twilio's account SID and call limit (vendors/twilio.py).
    twilio: TwilioSettings = TWILIO_DEFAULTS
    # SPENDGATE_FIXED_COSTS: what calls that no estimator prices cost (vendors/_fixed.py).
    fixed_costs: FixedCosts = NO_FIXED_COSTS

    @classmethod
    def from_env(cls, env: Env) -> GatewaySettings:
        admin_token = env.text("SPENDGATE_ADMIN_TOKEN")
        if len(admin_token) < 16:
            raise ConfigurationError("SPENDGATE_ADMIN_TOKEN", "must be at least 16 characters")
        vendors = {
            name: VendorSettings(
                name=name,
                base_url=env.url(f"SPENDGATE_{name.upper()}_BASE_URL", default).rstrip("/"),
                api_key=env.optional_text(f"SPENDGATE_{name.upper()}_API_KEY"),
            )
            for name, default in VENDOR_DEFAULT_BASE_URLS.items()
        }
        twilio = TwilioSettings.from_env(env, vendors["twilio"].api_key)
        twilio_token = vendors["twilio"].api_key
        if twilio_token is not None:
            # Twilio's credential is the pair, sent upstream as Basic auth.
            credential = f"{twilio.account_sid}:{twilio_token}"
            vendors["twilio"] = replace(vendors["twilio"], api_key=credential)
        return cls(
            common=CommonSettings.from_env(env),
            admin_token=admin_token,
            host=env.text("SPENDGATE_GATEWAY_HOST", "127.0.0.1"),
            port=env.integer("SPENDGATE_GATEWAY_PORT", 8080, minimum=0, maximum=65_535),
            vendors=vendors,
            ledger_timeout=env.milliseconds(
                "SPENDGATE_GATEWAY_LEDGER_TIMEOUT_MS", 2_000, minimum=50, maximum=60_000
            ),
            ledger_inflight_per_partition_max=env.integer(
                "SPENDGATE_GATEWAY_LEDGER_INFLIGHT_MAX",
                LEDGER_INFLIGHT_PER_PARTITION_DEFAULT,
                minimum=1,
                maximum=64,
            ),
            settle_linger=env.milliseconds(
                "SPENDGATE_GATEWAY_SETTLE_LINGER_MS", 5, minimum=0, maximum=1_000
            ),
            body_bytes_max=env.integer(
                "SPENDGATE_GATEWAY_BODY_BYTES_MAX", 1_048_576, minimum=1_024, maximum=64 * 1_048_576
            ),
            key_ttl_default=env.seconds(
                "SPENDGATE_KEY_TTL_DEFAULT_SECONDS", 30 * 86_400, minimum=60, maximum=3_650 * 86_400
            ),
            upstream_connect_timeout=env.milliseconds(
                "SPENDGATE_UPSTREAM_CONNECT_TIMEOUT_MS", 5_000, minimum=100, maximum=60_000
            ),
            upstream_read_timeout=env.milliseconds(
                "SPENDGATE_UPSTREAM_READ_TIMEOUT_MS", 60_000, minimum=100, maximum=600_000
            ),
            upstream_connections_max=env.integer(
                "SPENDGATE_UPSTREAM_CONNECTIONS_MAX", 100, minimum=1, maximum=10_000
            ),
            upstream_keepalive_max=env.integer(
                "SPENDGATE_UPSTREAM_KEEPALIVE_MAX", 20, minimum=0, maximum=10_000
            ),
            proxy_inflight_max=env.integer(
                "SPENDGATE_GATEWAY_INFLIGHT_MAX", 512, minimum=1, maximum=100_000
            ),
            shutdown_deadline=env.seconds(
                "SPENDGATE_SHUTDOWN_DEADLINE_SECONDS", 20, minimum=1, maximum=600
            ),
            twilio=twilio,
            fixed_costs=parse_fixed_costs(
                env.optional_text("SPENDGATE_FIXED_COSTS"), VENDOR_DEFAULT_BASE_URLS
            ),
        )

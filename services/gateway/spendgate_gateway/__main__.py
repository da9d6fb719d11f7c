"""``python -m spendgate_gateway``: serve the gateway on SPENDGATE_GATEWAY_HOST:PORT."""

from __future__ import annotations

import sys

import uvicorn

from spendgate_common.errors import ConfigurationError
from spendgate_common.runtime import TELEMETRY_FLUSH_DEADLINE, configure_logging, start_telemetry
from spendgate_common.settings import Env
from spendgate_gateway._app import create_app
from spendgate_gateway._settings import GatewaySettings


def main() -> None:
    configure_logging("gateway")
    env = Env()
    try:
        settings = GatewaySettings.from_env(env)
        telemetry = start_telemetry("gateway", env)
    except ConfigurationError as error:
        sys.exit(f"spendgate gateway: configuration error: {error}")
    config = uvicorn.Config(
        create_app(settings, telemetry),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.shutdown_deadline.total_seconds()),
    )
    try:
        uvicorn.Server(config).run()
    finally:
        telemetry.shutdown(TELEMETRY_FLUSH_DEADLINE)


if __name__ == "__main__":
    main()

"""``python -m spendgate_gateway``: serve the gateway on SPENDGATE_GATEWAY_HOST:PORT."""

from __future__ import annotations

import sys

import uvicorn

from spendgate_common.errors import ConfigurationError
from spendgate_common.runtime import configure_logging
from spendgate_common.settings import Env
from spendgate_gateway._app import create_app
from spendgate_gateway._settings import GatewaySettings


def main() -> None:
    configure_logging("gateway")
    try:
        settings = GatewaySettings.from_env(Env())
    except ConfigurationError as error:
        sys.exit(f"spendgate gateway: configuration error: {error}")
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.shutdown_deadline.total_seconds()),
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()

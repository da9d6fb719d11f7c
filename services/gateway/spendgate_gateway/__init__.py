"""Spendgate gateway: stateless HTTP proxy and control-plane API (see docs/api.md)."""

from spendgate_gateway._app import create_app
from spendgate_gateway._settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]

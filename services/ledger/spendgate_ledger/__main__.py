"""``python -m spendgate_ledger``: one ledger replica against the configured NATS and Postgres."""

from __future__ import annotations

import asyncio
import sys

from spendgate_common.errors import ConfigurationError
from spendgate_common.runtime import configure_logging, run_until_signalled
from spendgate_common.settings import Env
from spendgate_ledger._service import LedgerService
from spendgate_ledger._settings import LedgerSettings


def main() -> None:
    configure_logging("ledger")
    try:
        settings = LedgerSettings.from_env(Env())
    except ConfigurationError as error:
        sys.exit(f"spendgate ledger: configuration error: {error}")
    service = LedgerService(settings, exit_on_crash=True)
    asyncio.run(run_until_signalled(service.start, service.stop))


if __name__ == "__main__":
    main()

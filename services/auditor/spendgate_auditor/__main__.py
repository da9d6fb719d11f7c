"""``python -m spendgate_auditor``: the auditor against the configured NATS and Postgres."""

from __future__ import annotations

import asyncio
import sys

from spendgate_auditor._service import AuditorService
from spendgate_auditor._settings import AuditorSettings
from spendgate_common.errors import ConfigurationError
from spendgate_common.runtime import configure_logging, run_until_signalled
from spendgate_common.settings import Env


def main() -> None:
    configure_logging("auditor")
    try:
        settings = AuditorSettings.from_env(Env())
    except ConfigurationError as error:
        sys.exit(f"spendgate auditor: configuration error: {error}")
    service = AuditorService(settings, exit_on_crash=True)
    asyncio.run(run_until_signalled(service.start, service.stop))


if __name__ == "__main__":
    main()

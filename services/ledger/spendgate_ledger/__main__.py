"""``python -m spendgate_ledger``: one ledger replica against the configured NATS and Postgres."""

from __future__ import annotations

from spendgate_common.runtime import service_main
from spendgate_ledger._service import LedgerService
from spendgate_ledger._settings import LedgerSettings


def main() -> None:
    service_main(
        "ledger",
        lambda env, telemetry: LedgerService(
            LedgerSettings.from_env(env), exit_on_crash=True, telemetry=telemetry
        ),
    )


if __name__ == "__main__":
    main()

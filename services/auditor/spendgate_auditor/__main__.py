"""``python -m spendgate_auditor``: the auditor against the configured NATS and Postgres."""

from __future__ import annotations

from spendgate_auditor._service import AuditorService
from spendgate_auditor._settings import AuditorSettings
from spendgate_common.runtime import service_main


def main() -> None:
    service_main(
        "auditor",
        lambda env, telemetry: AuditorService(
            AuditorSettings.from_env(env), exit_on_crash=True, telemetry=telemetry
        ),
    )


if __name__ == "__main__":
    main()

"""The ``spendgate`` command: run the stack locally, run one service, audit, migrate.

Subcommands import the service they run only when chosen, so ``spendgate --help`` is fast
and a service's dependencies are loaded only by the process that runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import date, timedelta
from pathlib import Path

from spendgate_common.errors import ConfigurationError, SpendgateError
from spendgate_common.limits import PARTITION_COUNT_MAX
from spendgate_common.settings import Env

# Bound of the single connection ``spendgate migrate`` opens.
MIGRATE_CONNECT_TIMEOUT = timedelta(seconds=10)
FAKE_VENDORS = ("stripe", "openai", "anthropic", "twilio", "resend")
FAKE_VENDOR_PORT_DEFAULT = 12111  # stripe-mock's port, so stripe-mock habits carry over


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``spendgate`` script; exits with the subcommand's code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        sys.exit(2)
    try:
        code: int = args.run(args)
    except ConfigurationError as error:
        sys.exit(f"spendgate {args.command}: configuration error: {error}")
    except SpendgateError as error:
        sys.exit(f"spendgate {args.command}: {error}")
    sys.exit(code)


# ----------------------------------------------------------------------------- commands


def _up(args: argparse.Namespace) -> int:
    from spendgate_cli._stack import LocalStack, UpOptions

    options = UpOptions(
        host=args.host,
        port=args.port,
        state_dir=Path(args.state_dir),
        partition_count=args.partitions,
    )
    return LocalStack(options).run()


def _gateway(args: argparse.Namespace) -> int:
    from spendgate_gateway.__main__ import main as gateway_main

    gateway_main()
    return 0


def _ledger(args: argparse.Namespace) -> int:
    from spendgate_ledger.__main__ import main as ledger_main

    ledger_main()
    return 0


def _auditor(args: argparse.Namespace) -> int:
    # The auditor is being written alongside this command; "unused-ignore" keeps mypy
    # quiet both before and after its __main__ module exists.
    from spendgate_auditor.__main__ import (  # type: ignore[import-not-found, unused-ignore]
        main as auditor_main,
    )

    auditor_main()
    return 0


def _fake_vendor(args: argparse.Namespace) -> int:
    from spendgate_cli.fake_vendors import (  # type: ignore[import-not-found, unused-ignore]
        serve,
    )

    serve(args.vendor, args.host, args.port)
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from spendgate_auditor.verify import verify_main

    return verify_main(
        _database_url(args),
        partition=args.partition,
        from_seq=args.from_seq,
        public_keys=args.public_keys,
    )


def _report(args: argparse.Namespace) -> int:
    from spendgate_auditor.report import report_main

    return report_main(
        _database_url(args),
        args.by,
        since=args.since,
        tenant=args.tenant,
        output_format=args.format,
    )


def _migrate(args: argparse.Namespace) -> int:
    applied, current = asyncio.run(_apply_migrations(_database_url(args)))
    if applied:
        print(f"applied migrations {', '.join(str(version) for version in applied)}")
    else:
        print(f"schema is up to date (version {current})")
    return 0


async def _apply_migrations(database_url: str) -> tuple[list[int], int]:
    """Apply missing migrations; return (versions applied now, latest version)."""
    import asyncpg

    from spendgate_common.migrate import apply_migrations
    from spendgate_common.pg import translate_errors

    async with translate_errors(f"migrate {_without_password(database_url)}"):
        connection = await asyncpg.connect(
            database_url, timeout=MIGRATE_CONNECT_TIMEOUT.total_seconds()
        )
        try:
            applied = await apply_migrations(connection)
            current = await connection.fetchval(
                "SELECT coalesce(max(version), 0) FROM schema_migrations"
            )
        finally:
            await connection.close()
    return applied, int(current)


def _database_url(args: argparse.Namespace) -> str:
    if args.database_url:
        url: str = args.database_url
        return url
    try:
        return Env().url("SPENDGATE_DATABASE_URL")
    except ConfigurationError as error:
        raise ConfigurationError(
            error.variable, f"{error.problem} (or pass --database-url)"
        ) from None


def _without_password(url: str) -> str:
    """``url`` with any password masked, for error messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# ------------------------------------------------------------------------------- parser


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65_535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {port}")
    return port


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def _partition_count(text: str) -> int:
    count = int(text)
    if not 1 <= count <= PARTITION_COUNT_MAX:
        raise argparse.ArgumentTypeError(
            f"partition count must be between 1 and {PARTITION_COUNT_MAX}, got {count}"
        )
    return count


_ENVIRONMENT_HELP = (
    "Configuration comes from SPENDGATE_* environment variables "
    "(SPENDGATE_NATS_URL, SPENDGATE_DATABASE_URL, SPENDGATE_ADMIN_TOKEN, ...)."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spendgate",
        description=(
            "Spendgate stops runaway AI agents from spending money before it is spent. "
            "Run the whole stack on this machine with 'spendgate up', or one service at a time."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="run NATS, Postgres, ledger, auditor and gateway locally (no Docker)",
        description=(
            "Start an embedded NATS (JetStream) and an embedded Postgres, then the ledger, "
            "auditor and gateway, and keep them running until Ctrl-C. Data, logs, ports "
            "and the generated admin token live in the state directory and are reused by "
            "the next run. SPENDGATE_* variables in your environment (for example "
            "SPENDGATE_STRIPE_BASE_URL and SPENDGATE_STRIPE_API_KEY) are passed to the "
            "services; SPENDGATE_ADMIN_TOKEN, when set, is used instead of a generated one."
        ),
    )
    up.add_argument("--port", type=_port, default=8080, help="gateway port (default: 8080)")
    up.add_argument(
        "--host", default="127.0.0.1", help="gateway listen address (default: 127.0.0.1)"
    )
    up.add_argument(
        "--state-dir",
        default=".spendgate",
        help="where data, logs, ports and the admin token live (default: .spendgate)",
    )
    up.add_argument(
        "--partitions",
        type=_partition_count,
        default=None,
        metavar="N",
        help=(
            "number of ledger partitions, fixed when the state directory is first used "
            "(default: the recorded count, else SPENDGATE_PARTITION_COUNT, else 64)"
        ),
    )
    up.set_defaults(run=_up)

    for name, run, summary in (
        ("gateway", _gateway, "the HTTP gateway (proxy and /v1 control-plane API)"),
        ("ledger", _ledger, "one ledger replica (owns partitions, writes the event log)"),
        ("auditor", _auditor, "the auditor (hash chains and rollups from the event stream)"),
    ):
        service = commands.add_parser(
            name,
            help=f"run {summary} in the foreground",
            description=f"Run {summary} in the foreground until SIGTERM or Ctrl-C. "
            + _ENVIRONMENT_HELP,
        )
        service.set_defaults(run=run)

    fake = commands.add_parser(
        "fake-vendor",
        help="run a fake vendor API on loopback, for tests and demos",
        description=(
            "Serve a fake of a vendor's API that behaves like the real one for the calls "
            "Spendgate proxies, without spending money. Point the gateway at it with "
            "SPENDGATE_<VENDOR>_BASE_URL."
        ),
    )
    fake.add_argument("vendor", choices=FAKE_VENDORS, help="which vendor to fake")
    fake.add_argument(
        "--port",
        type=_port,
        default=FAKE_VENDOR_PORT_DEFAULT,
        help=f"port to listen on (default: {FAKE_VENDOR_PORT_DEFAULT})",
    )
    fake.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    fake.set_defaults(run=_fake_vendor)

    audit = commands.add_parser(
        "audit",
        help="audit commands (verify the signed hash chains)",
        description="Audit commands.",
    )
    audit_commands = audit.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND")
    audit_commands.required = True
    verify = audit_commands.add_parser(
        "verify",
        help="verify every partition's hash chain and signatures against the event log",
        description=(
            "Recompute every partition's hash chain from the event log and compare it with "
            "the auditor's chain and its Ed25519-signed checkpoints. Exits 1 when anything "
            "was deleted, edited, inserted or reordered, or a signature does not verify; 2 "
            "when verification could not run. See docs/audit.md."
        ),
    )
    verify.add_argument(
        "--database-url", help="Postgres URL (default: SPENDGATE_DATABASE_URL)", default=None
    )
    verify.add_argument(
        "--partition", type=_non_negative, default=None, metavar="P", help="only partition P"
    )
    verify.add_argument(
        "--from",
        dest="from_seq",
        type=_positive,
        default=None,
        metavar="SEQ",
        help=(
            "start at the newest signed checkpoint before SEQ (its signature checked, its "
            "link trusted) instead of seq 1"
        ),
    )
    verify.add_argument(
        "--public-keys",
        type=Path,
        default=None,
        metavar="FILE",
        help=(
            "trust only these public keys: the JSON of GET /v1/audit/keys, or PEM / base64 "
            "keys one per line (default: the keys registered in the database)"
        ),
    )
    verify.set_defaults(run=_audit_verify)

    report = commands.add_parser(
        "report",
        help="spend from the auditor's rollups, by run, fleet, vendor or day (CSV or JSON)",
        description=(
            "Print committed, reserved, overrun and denied amounts (micro-USD and USD) with "
            "counts from the auditor's rollups, one row per tenant and group. Days are local "
            "dates in each key's time zone. See docs/finance.md for the views and SQL."
        ),
    )
    report.add_argument("--by", choices=("run", "fleet", "vendor", "day"), required=True)
    report.add_argument(
        "--since", type=_day, default=None, metavar="YYYY-MM-DD", help="only days on or after"
    )
    report.add_argument("--tenant", default=None, help="only this tenant")
    report.add_argument("--format", choices=("csv", "json"), default="csv")
    report.add_argument(
        "--database-url", help="Postgres URL (default: SPENDGATE_DATABASE_URL)", default=None
    )
    report.set_defaults(run=_report)

    migrate = commands.add_parser(
        "migrate",
        help="apply the database migrations and exit",
        description=(
            "Apply the numbered SQL migrations that are missing (services also do this when "
            "they start). Safe to run concurrently and repeatedly."
        ),
    )
    migrate.add_argument(
        "--database-url", help="Postgres URL (default: SPENDGATE_DATABASE_URL)", default=None
    )
    migrate.set_defaults(run=_migrate)

    from spendgate_cli.admin_commands import add_parsers as add_admin_parsers

    add_admin_parsers(commands)
    return parser


if __name__ == "__main__":
    main()

"""``spendgate report``: spend from the auditor's rollups, by run, fleet, vendor or day.

Reads the finance views (docs/finance.md) in one read-only query and prints CSV or JSON:
one row per group (and tenant), with integer micro-USD amounts and their decimal USD
form. ``since`` keeps the days on or after a date (days are local to each key's zone).
"""

from __future__ import annotations

import asyncio
import csv
import io
import sys
from datetime import date, timedelta
from typing import TYPE_CHECKING, Literal

import asyncpg
import msgspec

from spendgate_common.errors import StoreUnavailableError
from spendgate_common.money import format_usd
from spendgate_common.pg import translate_errors

if TYPE_CHECKING:
    from typing import Any

GroupBy = Literal["run", "fleet", "vendor", "day"]
ReportFormat = Literal["csv", "json"]

CONNECT_TIMEOUT = timedelta(seconds=10)
STATEMENT_TIMEOUT = timedelta(seconds=60)
# Most rows one report prints (a bound on memory; narrow it with --since).
REPORT_ROWS_MAX = 100_000
EXIT_CODE_FAILED = 2

# The view and the group columns of each --by (constants: never built from input).
_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "run": ("finance_run_daily", ("tenant", "label")),
    "fleet": ("finance_fleet_daily", ("tenant", "fleet_label")),
    "vendor": ("finance_vendor_daily", ("tenant", "vendor")),
    "day": ("finance_tenant_daily", ("tenant", "day")),
}
AMOUNTS = (
    "committed_micros",
    "reserved_micros",
    "overrun_micros",
    "denied_micros",
    "granted_micros",
    "released_micros",
    "expired_micros",
)
COUNTS = ("granted_count", "committed_count", "denied_count")


def report_query(by: GroupBy) -> str:
    view, groups = _GROUPS[by]
    group_list = ", ".join(groups)
    sums = ", ".join(f"sum({column})::bigint AS {column}" for column in AMOUNTS + COUNTS)
    return " ".join(
        [
            f"SELECT {group_list}, {sums} FROM",
            view,
            "WHERE ($1::date IS NULL OR day >= $1) AND ($2::text IS NULL OR tenant = $2)",
            f"GROUP BY {group_list} ORDER BY {group_list} LIMIT {REPORT_ROWS_MAX}",
        ]
    )


async def report_rows(
    database_url: str, by: GroupBy, *, since: date | None = None, tenant: str | None = None
) -> list[dict[str, object]]:
    """The report's rows: group columns, then each amount in micros and USD, then counts."""
    async with translate_errors("connect for the report"):
        connection: asyncpg.Connection[Any] = await asyncpg.connect(
            database_url,
            timeout=CONNECT_TIMEOUT.total_seconds(),
            command_timeout=STATEMENT_TIMEOUT.total_seconds(),
        )
    try:
        async with translate_errors("report"), connection.transaction(readonly=True):
            records = await connection.fetch(report_query(by), since, tenant)
    finally:
        await connection.close()
    rows: list[dict[str, object]] = []
    for record in records:
        row: dict[str, object] = {}
        for column in _GROUPS[by][1]:
            value = record[column]
            row[column] = value.isoformat() if isinstance(value, date) else value
        for column in AMOUNTS:
            micros = int(record[column])
            row[column] = micros
            row[column.removesuffix("_micros") + "_usd"] = format_usd(micros)
        for column in COUNTS:
            row[column] = int(record[column])
        rows.append(row)
    return rows


def render(rows: list[dict[str, object]], by: GroupBy, output_format: ReportFormat) -> str:
    if output_format == "json":
        return msgspec.json.format(msgspec.json.encode(rows), indent=2).decode("utf-8") + "\n"
    header = list(rows[0]) if rows else [*_GROUPS[by][1], *_columns_after_groups()]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _columns_after_groups() -> list[str]:
    columns: list[str] = []
    for column in AMOUNTS:
        columns += [column, column.removesuffix("_micros") + "_usd"]
    return columns + list(COUNTS)


def report_main(
    database_url: str,
    by: GroupBy,
    *,
    since: date | None = None,
    tenant: str | None = None,
    output_format: ReportFormat = "csv",
) -> int:
    """Print the report to stdout; 0 on success, 2 when it could not be made (stderr)."""
    try:
        rows = asyncio.run(report_rows(database_url, by, since=since, tenant=tenant))
    except StoreUnavailableError as error:
        print(f"ERROR: cannot report: {error}", file=sys.stderr)
        return EXIT_CODE_FAILED
    except asyncpg.PostgresError as error:
        print(f"ERROR: cannot report: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_CODE_FAILED
    sys.stdout.write(render(rows, by, output_format))
    return 0

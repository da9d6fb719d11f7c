"""The published JSON Schema of finance events is the one generated from the msgspec types."""

from __future__ import annotations

from pathlib import Path

from spendgate_common import finance_v1

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "schemas" / "finance-v1.json"


def test_committed_finance_schema_equals_the_generated_one() -> None:
    assert SCHEMA_PATH.read_bytes() == finance_v1.json_schema(), (
        "docs/schemas/finance-v1.json is stale: regenerate it with"
        " python -m spendgate_common.finance_v1 > docs/schemas/finance-v1.json"
    )

"""The docs must match the code: every setting the code reads is in the README's table."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ["libs", "services"]
_VARIABLE = re.compile(r"\"(SPENDGATE_[A-Z0-9_]+)\"")
# SPENDGATE_* strings that are names of things, not settings.
NOT_SETTINGS = {"SPENDGATE_EVENTS", "SPENDGATE_FINANCE"}


def variables_in_code() -> set[str]:
    found: set[str] = set()
    for directory in SOURCE_DIRS:
        for path in (ROOT / directory).rglob("*.py"):
            found.update(_VARIABLE.findall(path.read_text("utf-8")))
    return found


def test_every_setting_read_by_the_code_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    documented = set(re.findall(r"`(SPENDGATE_[A-Z0-9_<>]+)`", readme))
    code = variables_in_code() - NOT_SETTINGS
    assert code, "found no settings in the code: the scan is broken"
    missing = sorted(code - documented)
    assert not missing, f"settings read by the code but not in README.md: {missing}"


def test_vendor_settings_follow_the_documented_pattern() -> None:
    from spendgate_gateway._settings import VENDOR_DEFAULT_BASE_URLS

    readme = (ROOT / "README.md").read_text("utf-8")
    assert "`SPENDGATE_<VENDOR>_BASE_URL`" in readme
    assert "`SPENDGATE_<VENDOR>_API_KEY`" in readme
    for vendor in VENDOR_DEFAULT_BASE_URLS:
        assert f"SPENDGATE_{vendor.upper()}_BASE_URL" in readme
        assert f"SPENDGATE_{vendor.upper()}_API_KEY" in readme

"""Spendgate auditor: SHA-256 hash chains over the committed event stream (docs/audit.md)."""

from spendgate_auditor._chain import GENESIS_LINK, ChainHead, link
from spendgate_auditor._service import AuditorService
from spendgate_auditor._settings import AuditorSettings
from spendgate_auditor.verify import VerifyReport, verify, verify_main

__all__ = [
    "GENESIS_LINK",
    "AuditorService",
    "AuditorSettings",
    "ChainHead",
    "VerifyReport",
    "link",
    "verify",
    "verify_main",
]

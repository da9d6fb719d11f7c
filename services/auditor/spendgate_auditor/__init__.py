"""Spendgate auditor: signed SHA-256 hash chains over the committed event stream, rollups
and the finance stream (docs/audit.md, docs/finance.md)."""

from spendgate_auditor._chain import GENESIS_LINK, ChainHead, link
from spendgate_auditor._service import AuditorService
from spendgate_auditor._settings import AuditorSettings
from spendgate_auditor._signing import checkpoint_message, key_id_of, new_private_key_pem
from spendgate_auditor.verify import VerifyReport, verify, verify_main

__all__ = [
    "GENESIS_LINK",
    "AuditorService",
    "AuditorSettings",
    "ChainHead",
    "VerifyReport",
    "checkpoint_message",
    "key_id_of",
    "link",
    "new_private_key_pem",
    "verify",
    "verify_main",
]

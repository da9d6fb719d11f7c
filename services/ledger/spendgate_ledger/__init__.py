"""Spendgate ledger: the only writer of budget state (see docs/ledger.md)."""

from spendgate_ledger._service import LedgerService
from spendgate_ledger._settings import LedgerSettings
from spendgate_ledger._state import Decision, PartitionState

__all__ = ["Decision", "LedgerService", "LedgerSettings", "PartitionState"]

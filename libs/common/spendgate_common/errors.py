"""Spendgate's exception tree, shared by all services.

    SpendgateError                     base of everything we raise on purpose
    ├── ConfigurationError             a setting is missing or malformed (fail fast at start)
    ├── InvalidRequestError            the caller sent something we refuse (HTTP 4xx)
    │   └── InvalidAmountError         an amount that is not a positive whole micro-USD
    ├── DependencyUnavailableError     NATS, the ledger or Postgres cannot be reached (HTTP 503)
    │   ├── LedgerUnavailableError     no reply from the ledger within the deadline
    │   └── StoreUnavailableError      Postgres refused or dropped the connection
    └── FencedError                    a partition owner lost its lease (its write was refused)

Each adapter (asyncpg, nats, httpx) translates its library's errors into these in exactly
one place; the gateway maps them to HTTP responses in one handler.
"""

from __future__ import annotations


class SpendgateError(Exception):
    """Base class of the errors Spendgate raises on purpose."""


class ConfigurationError(SpendgateError):
    """A setting is missing or malformed. ``variable`` names the environment variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class InvalidRequestError(SpendgateError):
    """The caller sent something we refuse. ``code`` is stable; ``message`` is for humans."""

    def __init__(self, code: str, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class InvalidAmountError(InvalidRequestError):
    """An amount that is not a positive whole number of micro-USD within bounds."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__("invalid_amount", f"{field} {problem}")
        self.field = field


class DependencyUnavailableError(SpendgateError):
    """A dependency cannot be reached; the caller should retry later (HTTP 503)."""

    code = "dependency_unavailable"


class LedgerUnavailableError(DependencyUnavailableError):
    """The ledger did not answer within the deadline, or NATS is down."""

    code = "ledger_unavailable"


class StoreUnavailableError(DependencyUnavailableError):
    """Postgres refused, dropped or timed out a statement."""

    code = "store_unavailable"


class FencedError(SpendgateError):
    """A partition's append was refused because another owner holds a newer epoch."""

    def __init__(self, partition: int, epoch: int) -> None:
        super().__init__(f"partition {partition}: lease epoch {epoch} is no longer current")
        self.partition = partition
        self.epoch = epoch

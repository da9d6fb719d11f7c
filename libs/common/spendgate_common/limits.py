"""Named bounds shared by more than one service. Each has a unit in its name.

A service's own bounds live in its settings; these are the ones that two services must
agree on, or that protect a wire format.
"""

from __future__ import annotations

# Largest amount a single reservation, commit or cap may carry: one billion USD.
# Far below 2**63 so that sums of many amounts cannot overflow Postgres bigint.
AMOUNT_MICROS_MAX = 1_000_000_000 * 1_000_000

# Most commands one NATS request may carry (the gateway coalesces up to this many).
COMMANDS_PER_REQUEST_MAX = 512

# Longest label (run id), tenant, vendor and idempotency key, in characters.
LABEL_CHARS_MAX = 128
TENANT_CHARS_MAX = 32
VENDOR_CHARS_MAX = 32
IDEMPOTENCY_KEY_CHARS_MAX = 255
OPERATION_CHARS_MAX = 256
PRICING_VERSION_CHARS_MAX = 64

# Partition count bounds (the count itself is a setting; see settings.py).
PARTITION_COUNT_MAX = 4096

# Longest hold a reserve may ask for: seven days, in milliseconds.
HOLD_MS_MAX = 7 * 86_400_000

# Most fleet labels one key may carry, and most vendors in one key's allow-list.
FLEET_LABELS_PER_KEY_MAX = 16
ALLOWED_VENDORS_PER_KEY_MAX = 32
# Most open budgets one tenant may have (every reserve checks the ones that apply).
BUDGETS_PER_TENANT_MAX = 1_000
# Most holds one sweep settles as expired (the rest wait for the next sweep).
SWEEP_EVENTS_MAX = 1_000

# Pages of the ledger's read-only list queries (ListKeys, ListBudgets, QueryRun): most
# items per page, the default, and a bound on a page's JSON size (a page stops before
# passing it, but always holds at least one item) so that a ledger reply stays far below
# NATS's max_payload. A cursor is opaque text of at most QUERY_CURSOR_CHARS_MAX.
QUERY_PAGE_ITEMS_MAX = 200
QUERY_PAGE_ITEMS_DEFAULT = 50
QUERY_PAGE_BYTES_MAX = 65_536
QUERY_CURSOR_CHARS_MAX = 1_024

# Event stream messages (spendgate_common.event_messages_v2): most events one message
# carries, and the body size past which a run is cut (a single larger event travels
# alone, within NATS's max_payload). A consumer's fetch of N messages holds at most
# N * EVENT_MESSAGE_EVENTS_MAX events.
EVENT_MESSAGE_EVENTS_MAX = 128
EVENT_MESSAGE_BYTES_MAX = 64 * 1024

"""The tenant -> partition function.

``partition = int.from_bytes(SHA-256(tenant as UTF-8)[0:8], "big") % partition_count``

It is stable across processes, machines and Python versions (unlike ``hash()``), and a
tenant's budgets all live in one partition, so a check across run, fleet, vendor and
tenant caps is one atomic in-memory step. Changing the partition count moves tenants
between partitions, so the count is fixed for the life of a deployment (docs/ledger.md).
"""

from __future__ import annotations

import hashlib


def partition_for_tenant(tenant: str, partition_count: int) -> int:
    """Return the partition (``0 <= p < partition_count``) that owns ``tenant``."""
    assert partition_count > 0
    digest = hashlib.sha256(tenant.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % partition_count

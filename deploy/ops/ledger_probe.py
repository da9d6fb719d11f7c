"""Kubelet probes of a ledger pod, judged from what the replica writes in Postgres.

The ledger serves no HTTP (it answers over NATS), so its probes run this script in its
container: ``python /app/ops/ledger_probe.py started|ready|live``. The replica is found by
the pod's host name: the ledger's default owner id is ``<host name>-<pid>-<random>``, so
SPENDGATE_LEDGER_OWNER_ID stays unset in Kubernetes. Times come from Postgres's ``now()``,
the clock the leases use.

* ``started``: the replica heartbeats (it reached Postgres and NATS, applied the
  migrations and ran its first lease round).
* ``ready``: it heartbeats and owns at least one partition, or every partition has a live
  owner (a replica beyond the fair shares waits as a standby and is ready too). During a
  rolling update a new replica is ready only once its peers handed it partitions.
* ``live``: fails only when Postgres answers and this replica's last heartbeat is older
  than :data:`LIVENESS_STALE_LEASES` lease times (at least :data:`LIVENESS_STALE_MIN`):
  its lease loop has stopped. When Postgres does not answer, the probe cannot tell and
  passes, because restarting every ledger while the database is away helps nobody (the
  ledger fails closed by itself, and its appends are fenced once its leases expire).

Exit status 0 passes, 1 fails, 2 is a configuration error; one line on stdout says why
(the kubelet shows it in the pod's events).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, get_args

import asyncpg

from spendgate_common.errors import ConfigurationError
from spendgate_common.pg import UNAVAILABLE_ERRORS
from spendgate_common.settings import Env
from spendgate_ledger import LedgerSettings

Check = Literal["started", "ready", "live"]

# Bounds of the probe's own connection and query (the kubelet's timeoutSeconds is 5).
CONNECT_TIMEOUT = timedelta(seconds=2)
QUERY_TIMEOUT = timedelta(seconds=2)
# A heartbeat older than this many lease times means the replica's lease loop stopped.
# Lease rounds run every quarter lease, so this is 24 missed rounds; replaying a
# partition on takeover blocks the loop for a while, hence the generous bound.
LIVENESS_STALE_LEASES = 6
LIVENESS_STALE_MIN = timedelta(seconds=60)

# One round trip. Owners are matched by prefix without LIKE (a host name has no
# wildcards, but the comparison should not depend on that).
_QUERY = """
SELECT
  (SELECT extract(epoch FROM now() - max(expires_at))::float8 FROM ledger_replicas
     WHERE left(owner, length($1)) = $1) AS heartbeat_expired_for_s,
  (SELECT count(*) FROM partition_leases
     WHERE left(owner, length($1)) = $1 AND expires_at > now()) AS owned,
  (SELECT count(*) FROM partition_leases
     WHERE owner IS NULL OR expires_at <= now()) AS unowned
"""


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What Postgres says about the replicas of this pod.

    ``heartbeat_expired_for`` is how long ago the newest heartbeat row expired (negative
    while it is live); None when this pod has no heartbeat row.
    """

    heartbeat_expired_for: timedelta | None
    owned: int
    unowned: int


def judge(check: Check, view: ReplicaView | None, lease: timedelta) -> tuple[bool, str]:
    """Pass or fail ``check`` for ``view`` (None: Postgres did not answer), and why."""
    if view is None:
        if check == "live":
            return True, "postgres unreachable: cannot judge liveness, passing"
        return False, "postgres unreachable"
    expired_for = view.heartbeat_expired_for
    heartbeating = expired_for is not None and expired_for < timedelta(0)
    if check == "live":
        if expired_for is None:
            return False, "no heartbeat row for this pod"
        age = expired_for + lease
        stale_after = max(LIVENESS_STALE_MIN, lease * LIVENESS_STALE_LEASES)
        if age > stale_after:
            return False, f"last heartbeat {age.total_seconds():.0f} s ago"
        return True, f"last heartbeat {max(age, timedelta(0)).total_seconds():.1f} s ago"
    if not heartbeating:
        return False, "no live heartbeat yet"
    if check == "started":
        return True, "heartbeating"
    if view.owned > 0:
        return True, f"owns {view.owned} partitions"
    if view.unowned == 0:
        return True, "standby: every partition has a live owner"
    return False, f"owns no partition yet ({view.unowned} without a live owner)"


async def read_view(database_url: str, owner_prefix: str) -> ReplicaView | None:
    """Query Postgres once; None when it is not reachable or does not answer in time."""
    try:
        connection = await asyncpg.connect(
            database_url,
            timeout=CONNECT_TIMEOUT.total_seconds(),
            command_timeout=QUERY_TIMEOUT.total_seconds(),
        )
    except UNAVAILABLE_ERRORS:
        return None
    try:
        row = await connection.fetchrow(_QUERY, owner_prefix)
    except UNAVAILABLE_ERRORS:
        return None
    except asyncpg.UndefinedTableError:
        # No ledger has applied the migrations yet: nothing heartbeats.
        return ReplicaView(heartbeat_expired_for=None, owned=0, unowned=0)
    finally:
        with contextlib.suppress(*UNAVAILABLE_ERRORS):
            await connection.close(timeout=CONNECT_TIMEOUT.total_seconds())
    assert row is not None
    expired_for_s = row["heartbeat_expired_for_s"]
    return ReplicaView(
        heartbeat_expired_for=None if expired_for_s is None else timedelta(seconds=expired_for_s),
        owned=int(row["owned"]),
        unowned=int(row["unowned"]),
    )


def owner_prefix() -> str:
    """The owner-id prefix of every ledger process of this pod (see the module doc)."""
    return f"{socket.gethostname()}-"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in get_args(Check):
        print(f"usage: ledger_probe.py {'|'.join(get_args(Check))}", file=sys.stderr)
        return 2
    check: Check = args[0]  # type: ignore[assignment]
    try:
        settings = LedgerSettings.from_env(Env())
    except ConfigurationError as error:
        print(f"configuration error: {error}")
        return 2
    view = asyncio.run(read_view(settings.database_url, owner_prefix()))
    passed, reason = judge(check, view, settings.lease)
    print(f"{check}: {'pass' if passed else 'fail'}: {reason}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

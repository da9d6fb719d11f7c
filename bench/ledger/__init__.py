"""The ledger benchmark: reserve + commit pairs per second on one hot budget.

``python -m bench.ledger --help`` (or ``make bench-ledger``) starts its own embedded NATS
and durable Postgres (fsync and synchronous_commit on), one ledger replica as a real
``python -m spendgate_ledger`` process, and load-generator processes that coalesce
commands per NATS request exactly as the gateway does (they use the gateway's
``LedgerClient``). It measures, in one run:

* closed loop, one hot budget: reserve + commit pairs per second and the reserve latency
  (request to reply, p50/p99) at several concurrency levels (outstanding pairs);
* the classic baseline at the same levels: one conditional
  ``UPDATE ... SET spent = spent + $1 WHERE id = $2 AND spent + $1 <= cap`` per request
  on one row, autocommit, through asyncpg pools;
* closed loop with 8 partitions busy at once (8 tenants, one budget each);
* open loop at half of the hot-budget peak: reserve latency measured from the intended
  send time (no coordinated omission).

It prints a table, checks the acceptance criterion of the ledger issue, and writes JSON
to ``bench/results/ledger-<timestamp>.json`` and ``bench/results/ledger-latest.json``.

``python -m bench.ledger.footprint`` measures, against the same system, what a reservation
costs in bytes (Postgres table, index, WAL; JetStream), memory (ledger and NATS), CPU when
batches are small, and the time to recover a partition: the sizing figures of
docs/deploy.md (see :mod:`bench.ledger.footprint`).
"""

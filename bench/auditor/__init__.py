"""Auditor catch-up benchmark (``make bench-auditor``, ``python -m bench.auditor``).

Writes ``--events`` realistic ledger events (keys, budgets, grants, commits with
overruns, releases, denials, expiries) over ``--partitions`` partitions into a fresh
``events`` table and a fresh ``SPENDGATE_EVENTS`` stream, exactly as the ledger and its
relay would (version 2 messages of ``--events-per-message`` events: 1 by default, as a
thinly spread fleet's appends, the auditor's worst case), on an embedded NATS and a
durable embedded Postgres. Then it starts one
auditor process and times it from its start until it has caught up: every event chained,
signed, rolled up, and every finance event published. It prints a table and writes
``bench/results/auditor-<timestamp>.json`` and ``auditor-latest.json``.

The issue's acceptance figure: 100,000 events in under 30 s on a 2-core machine.
"""

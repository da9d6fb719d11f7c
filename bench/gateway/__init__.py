"""The gateway benchmark: the latency one gateway process adds to a call.

``python -m bench.gateway --help`` (or ``make bench-gateway``) starts an embedded NATS, a
durable Postgres and one ledger process (the ledger benchmark's cluster), a minimal
Stripe-like upstream (:mod:`bench.gateway._upstream`) and one gateway process
(``python -m spendgate_gateway``: uvicorn, one worker). For each rate it runs an open loop
(calls sent on a fixed schedule from separate load-generator processes, latency counted
from the scheduled send time) straight at the upstream and then through the gateway with
1 or N vault keys, and reports the gateway's p50 / p99 minus the direct ones at the same
rate. Then it searches for the highest rate one gateway holds with an added p99 within
10 ms. It prints a table and writes ``bench/results/gateway-<timestamp>.json`` and
``gateway-latest.json``. See ``bench/gateway/README.md``.
"""

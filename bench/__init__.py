"""Spendgate's benchmarks (``make bench-ledger``); results go to ``bench/results/`` (ignored)."""

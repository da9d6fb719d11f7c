"""Spendgate tests. A package, so that tests can import ``tests.harness``."""

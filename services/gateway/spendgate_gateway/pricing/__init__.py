"""Versioned price data, one JSON file per vendor next to this module.

Every file has a top-level ``"version"`` (e.g. ``"openai-2026-11-01"``); the estimate
records it with the reservation, so finance can tell which prices a hold was based on.
A price change is a new version in a commit, never an edit in place of a live version.
Files are read once, at import of the vendor module, and decoded into the vendor's own
``msgspec.Struct`` so a malformed file fails the gateway's start, not a call.
"""

from __future__ import annotations

from importlib import resources
from typing import TypeVar

import msgspec

T = TypeVar("T")


def load_pricing(name: str, shape: type[T]) -> T:
    """Decode ``pricing/<name>.json`` into ``shape``; raises ``msgspec.ValidationError``."""
    data = resources.files(__name__).joinpath(f"{name}.json").read_bytes()
    return msgspec.json.decode(data, type=shape, strict=True)

"""Where every benchmark's JSON goes: ``bench/results/<name>-<timestamp>.json`` (ignored by git)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_results(document: object, results_dir: Path, name: str) -> Path:
    """Write ``<name>-<UTC timestamp>.json`` and ``<name>-latest.json``; return the first.

    ``document`` is anything msgspec encodes (Structs, dicts, lists), indented for people.
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    body = msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = results_dir / f"{name}-{stamp}.json"
    path.write_bytes(body)
    (results_dir / f"{name}-latest.json").write_bytes(body)
    return path

"""Shipped data (task and retention prompt sets), how it is generated, and how examples become batches."""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def read_retention(name: str) -> list[dict]:
    """A retention prompt set shipped in ``reft_lab/data/retention/<name>.jsonl``."""
    path = DATA_DIR / "retention" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

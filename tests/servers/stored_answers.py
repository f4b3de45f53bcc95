"""An oracle for ``detaudit matrix`` verdicts, read straight from an axis run's
samples.sqlite: which answers (output, chosen tokens and the text of their logprobs)
each level gave. Which shapes change the default kernels' bits depends on the CPU's
torch kernels, so tests check each verdict against what was stored, both ways."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path


def answers(run_folder: Path, axis: str) -> dict[tuple[str, object], set]:
    """{(group, unit): answers}; unit is the cache axis's prompt variant (``item``),
    compared only with itself, and None on every other axis."""
    uri = f"file:{Path(run_folder) / 'samples.sqlite'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        rows = db.execute("SELECT \"group\", output, positions, extra FROM sample_rows "
                          "WHERE status = 'ok'").fetchall()
    found: dict[tuple[str, object], set] = {}
    for group, output, positions, extra in rows:
        chosen = tuple((p["token"], p["logprob_text"]) for p in json.loads(positions or "[]"))
        unit = json.loads(extra or "{}").get("item") if axis == "cache" else None
        found.setdefault((group, unit), set()).add((output, chosen))
    return found


def varies(run_folder: Path, axis: str, levels: list[str]) -> bool:
    """Did a non-baseline level give an answer its baseline never gave?"""
    found = answers(run_folder, axis)
    base, *others = (f"{axis}={level}" for level in levels)
    for (group, unit), seen in found.items():
        if group in others and seen - found.get((base, unit), set()):
            return True
    return False

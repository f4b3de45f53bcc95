"""Damage a stored run's rows the way an edit or a broken disk would, wherever the
run's format keeps the field: format 2 stores a positions text once in positions_texts
(shared by every sample that has it) and raw bodies in raw_bodies, so a damaged text
there is a new entry that only the chosen samples name."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def set_field(run_dir: Path, indices: tuple[int, ...], column: str, value) -> None:
    """As ``UPDATE samples SET column = value WHERE idx IN indices`` on a format-1 run."""
    marks = ", ".join("?" * len(indices))
    conn = sqlite3.connect(Path(run_dir) / "samples.sqlite")
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(samples)")}
        if column == "positions" and "positions_id" in columns:
            entry = conn.execute("INSERT INTO positions_texts (digest, text) "
                                 "VALUES (randomblob(16), ?)", (value,)).lastrowid
            conn.execute(f"UPDATE samples SET positions_id = ? WHERE idx IN ({marks})",
                         (entry, *indices))
        elif column == "raw" and "raw" not in columns:
            conn.executemany("INSERT OR REPLACE INTO raw_bodies (idx, raw) VALUES (?, ?)",
                             [(i, value) for i in indices])
        else:
            conn.execute(f'UPDATE samples SET "{column}" = ? WHERE idx IN ({marks})',
                         (value, *indices))
        conn.commit()
    finally:
        conn.close()  # the WAL is folded back: the folder looks as a finished run's

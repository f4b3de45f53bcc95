"""The load-sweep probe: ``detaudit run --probe load-sweep`` against ``detaudit serve``
(filler requests hold each load level) and in process (level L = a batch of L + 1)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from detaudit.load import level_of, level_ranges, local_batch_sizes, parse_levels
from detaudit.probes import ProbeError, load_probe
from tests.serve.conftest import detaudit, json_out
from tests.servers import stored_answers


def groups(summary: dict) -> dict[str, dict]:
    return {g["group"]: g for g in summary["groups"]}


def token(group: dict, label: str) -> dict:
    return next(t for t in group["tokens"] if t["label"] == label)


def stored(run_dir: str) -> list[tuple]:
    with sqlite3.connect(Path(run_dir) / "samples.sqlite") as db:
        return db.execute('SELECT idx, "group", status FROM samples ORDER BY idx').fetchall()


def stored_heads(run_dir: Path) -> dict[str, set[str]]:
    """{group: the logprob texts of "Heads" at the first position}, read from the store."""
    found: dict[str, set[str]] = {}
    with sqlite3.connect(Path(run_dir) / "samples.sqlite") as db:
        for group, positions in db.execute('SELECT "group", positions FROM sample_rows WHERE status = \'ok\''):
            top = json.loads(positions)[0]["top"]
            found.setdefault(group, set()).update(t["logprob_text"] for t in top if t["token"] == "Heads")
    return found


def stored_extras(run_dir: Path, group: str) -> list[dict]:
    with sqlite3.connect(Path(run_dir) / "samples.sqlite") as db:
        return [json.loads(extra) for (extra,) in db.execute(
            'SELECT extra FROM samples WHERE "group" = ? ORDER BY idx', (group,))]


def test_levels_and_indices():
    assert parse_levels("0, 1,4,16") == [0, 1, 4, 16]
    for bad in ("", "a,b", "1,-2"):
        with pytest.raises(ProbeError, match="--levels"):
            parse_levels(bad)
    levels = [0, 2, 8]
    assert [level_of(i, levels, 3)[1] for i in range(9)] == [0, 0, 0, 2, 2, 2, 8, 8, 8]
    assert local_batch_sizes(levels) == [1, 3, 9]
    # the ranges the budget counts agree with level_of, remainder in the last level
    import dataclasses
    probe = load_probe("load-sweep")
    probe = dataclasses.replace(probe, load=dataclasses.replace(probe.load, levels=levels))
    for n in (9, 10, 2):
        by_range = [level for start, stop, level in level_ranges(probe, n) for _ in range(start, stop)]
        assert by_range == [level_of(i, levels, max(1, n // 3))[1] for i in range(n)]


def test_default_kernels_alone_give_one_value_and_the_verdict_matches_what_load_stored(
        server_default, tmp_path):
    """Alone, the target always runs in the same batch shape: one value. Beside fillers
    of varied lengths, plain torch kernels may reduce in another order; whether that
    changes the bits depends on the CPU's torch kernels (on one machine the batched
    value was the same for every target, on another it differed), so the counts and
    the verdict are checked against the logprobs read straight from samples.sqlite."""
    proc = detaudit("run", "--probe", "load-sweep", "--model", "tiny", "--base-url", server_default.url,
                    "--levels", "0,4", "--n", "6", "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json_out(proc)
    by_level = groups(summary)
    assert list(by_level) == ["load=0", "load=4"]
    assert by_level["load=0"]["n"] == by_level["load=4"]["n"] == 6
    assert token(by_level["load=0"], "Heads")["distinct_logprobs"] == 1
    folder = Path(summary["run"]["dir"])
    heads = stored_heads(folder)
    for level in ("load=0", "load=4"):
        assert token(by_level[level], "Heads")["distinct_logprobs"] == len(heads[level])
    assert token(summary, "Heads")["distinct_logprobs"] == len(heads["load=0"] | heads["load=4"])
    assert summary["deterministic"] is not stored_answers.varies(folder, "load", ["0", "4"])
    # every target at level 4 was sent while fillers were in flight
    assert [extra["fillers_in_flight"] > 0 for extra in stored_extras(folder, "load=4")] == [True] * 6
    rows = stored(summary["run"]["dir"])
    assert [(i, g) for i, g, _ in rows] == [(i, "load=0" if i < 6 else "load=4") for i in range(12)]
    # the fillers that held level 4 stayed within what --dry-run counts for the run
    dry = detaudit("run", "--probe", "load-sweep", "--model", "tiny", "--base-url", server_default.url,
                   "--levels", "0,4", "--n", "6", "--dry-run", "--json")
    assert 0 < summary["run"]["fillers"]["sent"] <= json_out(dry)["filler_requests_max"]


@pytest.mark.slow
def test_batch_invariant_kernels_give_one_value_at_every_level(server_invariant, small_load_probe, tmp_path):
    proc = detaudit("run", "--probe", str(small_load_probe), "--model", "tiny",
                    "--base-url", server_invariant.url, "--levels", "0,3", "--n", "3",
                    "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json_out(proc)
    assert summary["deterministic"] is True
    for group in groups(summary).values():
        assert group["n"] == 3 and group["errors"] == 0
        assert all(t["distinct_logprobs"] == 1 for t in group["tokens"])
    heads = next(t for t in summary["tokens"] if t["label"] == "Heads")
    assert heads["distinct_logprobs"] == 1 and heads["n"] == 6


def test_in_process_level_is_a_batch_of_fillers_plus_target(tmp_path):
    proc = detaudit("run", "--probe", "load-sweep", "--kernels", "default", "--levels", "0,3",
                    "--n", "2", "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json_out(proc)
    assert summary["run"]["backend"]["batch_sizes"] == [1, 4]
    assert [g["group"] for g in summary["groups"]] == ["load=0", "load=3"]
    with sqlite3.connect(Path(summary["run"]["dir"]) / "samples.sqlite") as db:
        extras = db.execute("SELECT idx, extra FROM samples ORDER BY idx").fetchall()
    sizes = [json.loads(extra)["batch_size"] for _, extra in extras]
    assert sizes == [1, 1, 4, 4]


def test_levels_flag_misuse_is_a_usage_error(tmp_path):
    wrong_probe = detaudit("run", "--probe", "coin-flip", "--levels", "0,1", "--out", str(tmp_path))
    assert wrong_probe.returncode == 2 and "load-sweep" in wrong_probe.stderr
    bad = detaudit("run", "--probe", "load-sweep", "--levels", "zero", "--out", str(tmp_path))
    assert bad.returncode == 2 and "--levels" in bad.stderr and "Traceback" not in bad.stderr

"""``detaudit matrix`` against a real ``detaudit serve`` on 127.0.0.1: with
batch-invariant kernels no axis moves the numbers (streamed answers included); with the default kernels the
load, cache (with the server's prefix cache on) and n axes do, and the cache axis
does not where the server has no prefix cache (the nonce alone moves nothing)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.serve.conftest import Server, detaudit, json_out
from tests.servers import stored_answers

SERVED_AXES = "load,cache,max-tokens,top-logprobs,stream,n"


@pytest.fixture(scope="module")
def cached_invariant():
    server = Server("--kernels", "batch-invariant", "--prefix-cache")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cached_default():
    server = Server("--kernels", "default", "--prefix-cache")
    yield server
    server.stop()


def matrix(server: Server, out: Path, *args: str) -> dict:
    proc = detaudit("matrix", "--model", "tiny", "--base-url", server.url, "--out", str(out),
                    "--json", "--quiet", *args)
    assert proc.returncode == 0, proc.stderr
    return json_out(proc)


def by_axis(data: dict) -> dict[str, dict]:
    return {a["axis"]: a for a in data["axes"]}


def test_batch_invariant_kernels_vary_along_no_axis(cached_invariant, tmp_path):
    data = matrix(cached_invariant, tmp_path, "--axes", SERVED_AXES, "--n", "4")
    axes = by_axis(data)
    assert list(axes) == SERVED_AXES.split(",")
    for name, axis in axes.items():
        assert axis["varies"] is False, f"{name}: {axis['verdict']}"
        assert sum(axis["n"].values()) == 8 and not any(axis["errors"].values())
    assert axes["load"]["fillers"]["sent"] > 0  # the load level really had fillers beside it
    assert data["varies"] == []
    assert axes["cache"]["distinct"] == {"cold": 4, "warm": 4}  # one answer per nonce variant
    with sqlite3.connect(Path(axes["stream"]["run"]) / "samples.sqlite") as db:
        extras = [json.loads(e) for (e,) in db.execute("SELECT extra FROM samples ORDER BY idx")]
    streamed = [e.get("stream_chunks", 0) > 0 for e in extras]
    assert streamed == [False] * 5 + [True] * 4  # warm-up and stream=false whole, stream=true as events


def test_default_kernels_verdicts_under_load_cache_and_n(cached_default, tmp_path):
    """Whether a batch shape changes the default kernels' bits is up to the CPU's torch
    kernels (and, under load, to timing), so each verdict is checked against the stored
    answers, both ways; at least one of the three axes must move the numbers."""
    # 12 targets under load, so that a loaded machine still puts fillers beside one
    data = matrix(cached_default, tmp_path, "--axes", "load,cache,n", "--n", "12")
    axes = by_axis(data)
    folder = Path(data["matrix"]["dir"])
    for name in ("load", "cache", "n"):
        expected = stored_answers.varies(folder / name, name, axes[name]["levels"])
        assert axes[name]["varies"] is expected, f"{name}: {axes[name]['verdict']}"
        assert axes[name]["moves"]["logprobs"] is expected or axes[name]["moves"]["outputs"]
    assert data["varies"] == [name for name in ("load", "cache", "n") if axes[name]["varies"]]
    assert data["varies"], [a["verdict"] for a in data["axes"]]
    # the JSON shape the issue names, levels baseline first
    for axis in data["axes"]:
        assert set(axis) >= {"axis", "levels", "distinct", "varies"}
        assert set(axis["distinct"]) == set(axis["levels"]) and axis["levels"][0] == axis["baseline"]
    assert axes["load"]["levels"] == ["0", "4"] and axes["cache"]["levels"] == ["cold", "warm"]
    assert axes["n"]["levels"] == ["1", "4"]
    assert axes["load"]["new"]["4"] >= 1
    # what is stored: matrix.json is what --json printed; each axis is a run detaudit reads
    assert json.loads((folder / "matrix.json").read_text()) == data
    report = json_out(detaudit("report", str(folder / "n"), "--json"))
    assert [g["group"] for g in report["groups"]] == ["n=1", "n=4", "warmup"]
    assert [g["n"] for g in report["groups"]] == [12, 12, 1]
    with sqlite3.connect(folder / "n" / "samples.sqlite") as db:
        extras = [json.loads(e) for (e,) in db.execute("SELECT extra FROM samples ORDER BY idx")]
    choices = [(e["request"], e["choice"]) for e in extras if e.get("level") == "4"]
    assert choices == [(r, c) for r in range(3) for c in range(4)]  # 12 choices of 3 requests
    with sqlite3.connect(folder / "cache" / "samples.sqlite") as db:
        rows = [json.loads(e) for (e,) in db.execute("SELECT extra FROM samples ORDER BY idx")]
    assert [(r["level"], r["item"]) for r in rows[:4]] == [("cold", 0), ("warm", 0), ("cold", 1), ("warm", 1)]
    assert rows[0]["nonce"] == f"[{data['matrix']['nonce_run']}-0] "
    # --dry-run counted every request the load axis could send, fillers included
    dry = json_out(detaudit("matrix", "--model", "tiny", "--base-url", cached_default.url, "--axes",
                            "load,cache,n", "--n", "12", "--dry-run", "--json"))
    assert dry["requests"] == 1 + 12 + 12 + 12 + 12 + 1 + 12 + 3  # warm-ups, levels, n=4: 3 requests
    assert 0 < axes["load"]["fillers"]["sent"] <= dry["filler_requests_max"]


def test_the_cache_axis_does_not_vary_without_a_prefix_cache(server_default, tmp_path):
    """Default kernels, no prefix cache: cold and warm run the same computation."""
    axis = matrix(server_default, tmp_path, "--axes", "cache", "--n", "4")["axes"][0]
    assert axis["varies"] is False and axis["distinct"] == {"cold": 4, "warm": 4}


def test_local_engine_axes_are_refused_against_an_endpoint(cached_invariant, tmp_path):
    proc = detaudit("matrix", "--model", "tiny", "--base-url", cached_invariant.url,
                    "--axes", "load,batch-size", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "batch-size axis is the local engine's" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing started

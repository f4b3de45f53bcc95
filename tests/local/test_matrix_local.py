"""``detaudit matrix`` in process, on the bundled engine: the local axes (batch-size,
batch-position, prefill-chunk) beside load, cache, max-tokens, top-logprobs and n.
With batch-invariant kernels no axis varies; with the default kernels each verdict
agrees with the stored answers, and some batch axis moves the numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import detaudit
from tests.servers import stored_answers
from tests.servers.serve_process import ROOT, cli_env

LOCAL_AXES = ["load", "cache", "max-tokens", "top-logprobs", "n", "batch-size", "batch-position",
              "prefill-chunk"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detaudit.cli", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def test_batch_invariant_kernels_vary_along_no_local_axis(tmp_path):
    matrix = detaudit.matrix(n=3, out=tmp_path)
    data = matrix.summary()
    assert matrix.axes == LOCAL_AXES  # every axis that applies in process (no stream)
    for axis in data["axes"]:
        assert axis["varies"] is False, f"{axis['axis']}: {axis['verdict']}"
        assert axis["n"] == {level: 3 for level in axis["levels"]}
    levels = {a["axis"]: a["levels"] for a in data["axes"]}
    assert levels["batch-position"] == ["first", "last"] and levels["prefill-chunk"][0] == "off"
    assert data["matrix"]["status"] == "complete" and data["varies"] == []
    # each axis is a stored run with one group per level (and the warm-up)
    run = matrix.run("batch-size")
    groups = [g["group"] for g in run.summary()["groups"]]
    assert groups == ["batch-size=1", "batch-size=4", "warmup"]
    sizes = run.manifest["backend"]["batch_sizes"]
    assert sizes == [1, 4] and matrix.run("cache").manifest["backend"]["prefix_cache"] is True
    # an axis run is sent by the matrix alone: a resume of it is refused, the folder untouched
    before = sorted(p.name for p in (matrix.path / "load").iterdir())
    proc = cli("run", "--resume", str(matrix.path / "load"))
    assert proc.returncode == 2 and "axis of a detaudit matrix" in proc.stderr
    assert sorted(p.name for p in (matrix.path / "load").iterdir()) == before


def test_default_kernels_verdicts_match_the_stored_answers(tmp_path):
    """Which batch shapes change the default kernels' bits is up to the CPU's torch kernels
    (on one machine batches of 2-3 rows did and 4-16 did not), so the verdict of every axis
    is checked against the answers stored for it, both ways, and at least one of the five
    batch axes must move the numbers."""
    proc = cli("matrix", "--kernels", "default", "--n", "4", "--quiet", "--json", "--out", str(tmp_path),
               "--axes", "load,batch-size,batch-position,prefill-chunk,n", "--level", "load=2",
               "--level", "batch-size=2", "--level", "batch-position=5", "--level", "prefill-chunk=3")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    matrix = detaudit.open_matrix(next(tmp_path.glob("matrix-*")))
    for axis in data["axes"]:
        expected = stored_answers.varies(matrix.path / axis["axis"], axis["axis"], axis["levels"])
        assert axis["varies"] is expected, f"{axis['axis']}: {axis['verdict']}"
    assert any(axis["varies"] for axis in data["axes"]), [a["verdict"] for a in data["axes"]]
    levels = {a["axis"]: a["levels"] for a in data["axes"]}
    assert levels == {"load": ["0", "2"], "batch-size": ["1", "2"], "batch-position": ["first", "last"],
                      "prefill-chunk": ["off", "3"], "n": ["1", "4"]}
    table = cli("matrix", "--kernels", "default", "--n", "2", "--quiet", "--out", str(tmp_path / "table"),
                "--axes", "batch-size,max-tokens", "--level", "batch-size=2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    shown = detaudit.open_matrix(next((tmp_path / "table").glob("matrix-*"))).summary()["axes"][0]
    assert any(line.split()[:1] == ["batch-size"] and shown["verdict"] in line for line in lines)
    assert any(line.split()[:1] == ["max-tokens"] and "1 vs 16" in line for line in lines)
    assert "Matrix folder: " in table.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    cases = {
        ("--axes", "load,bogus"): "unknown axis 'bogus'",
        ("--axes", "stream"): "the stream axis needs an endpoint",
        ("--axes", "load", "--level", "load=many"): "--level load=many: give a whole number",
        ("--axes", "load", "--level", "n=2"): "the n axis is not measured",
        ("--axes", "cache", "--level", "cache=hot"): "the cache axis has fixed levels",
        ("--axes", "cache", "--nonce", "fixed text"): "--nonce 'fixed text': use {i}",
        ("--axes", "load", "--level", "load"): "write AXIS=VALUE",
        ("--axes", "max-tokens", "--probe", "coin-flip", "--api", "completions"): None,  # fine: dry run
    }
    for args, message in cases.items():
        proc = cli("matrix", *args, "--out", str(tmp_path), "--dry-run")
        if message is None:
            assert proc.returncode == 0, proc.stderr
            continue
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list(tmp_path.iterdir())


def test_dry_run_and_max_cost_count_every_request(tmp_path):
    remote = ("--model", "gpt-4o-mini", "--base-url", "http://127.0.0.1:9/v1", "--n", "10",
              "--axes", "load,n,max-tokens")
    dry = cli("matrix", *remote, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    count = json.loads(dry.stdout)
    rows = {(r["axis"], r["level"]): r for r in count["levels"]}
    assert rows[("load", "warmup")]["requests"] == 1 and rows[("load", "4")]["filler_requests_max"] == 80
    assert rows[("n", "4")]["requests"] == 3 and rows[("n", "4")]["choices_per_request"] == 4
    assert rows[("max-tokens", "16")]["completion_tokens_per_request_max"] == 16
    assert count["requests"] == 3 * 1 + 10 + 10 + 10 + 3 + 10 + 10
    assert count["requests_total_max"] == count["requests"] + 80 and count["cost_usd_max"] > 0
    over = cli("matrix", *remote, "--max-cost", str(count["cost_usd_max"] / 2), "--out", str(tmp_path))
    assert over.returncode == 2 and "may cost up to" in over.stderr
    assert not list(tmp_path.iterdir())

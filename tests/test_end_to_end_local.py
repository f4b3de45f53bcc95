"""The claim detaudit's engine exists to show, end to end through the real CLI,
runner, store and analysis: the coin-flip probe on the bundled tiny model, its
repeats run in batches of varying sizes beside filler requests, gives exactly
one logprob per tracked token with batch-invariant kernels, and more than one
with the default (CPU BLAS) kernels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

BATCH_SIZES = "1,2,5,8,13"


def run_coin_flip(tmp_path, kernels: str, n: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "detaudit.cli", "run", "--n", str(n), "--kernels", kernels,
         "--batch-sizes", BATCH_SIZES, "--concurrency", "4", "--out", str(tmp_path / kernels),
         "--quiet", "--json"],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_coin_flip_n200_batch_invariant_gives_one_logprob_per_tracked_token(tmp_path):
    summary = run_coin_flip(tmp_path, "batch-invariant", n=200)

    assert summary["n"] == 200 and summary["errors"] == 0
    labels = {t["label"] for t in summary["tokens"]}
    assert labels == {"Heads", "Tails"}
    for token in summary["tokens"]:
        assert token["n"] == 200 and token["missing"] == 0
        assert token["distinct_logprobs"] == 1, token
        assert token["clusters"] == 1
        assert token["prob"]["range"] == 0.0
    assert summary["outputs"]["distinct"] == 1
    # every batch size really was used, 40 repeats each
    groups = {g["group"]: g["n"] for g in summary["groups"]}
    assert groups == {size: 40 for size in BATCH_SIZES.split(",")}
    assert len(summary["fingerprints"]) == 1


def test_coin_flip_default_kernels_move_with_the_batch(tmp_path):
    summary = run_coin_flip(tmp_path, "default", n=20)

    heads = next(t for t in summary["tokens"] if t["label"] == "Heads")
    assert heads["distinct_logprobs"] > 1
    assert heads["prob"]["range"] > 0.0

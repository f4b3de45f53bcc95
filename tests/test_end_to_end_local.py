"""The claim detaudit's engine exists to show, end to end through the real CLI,
runner, store and analysis: the coin-flip probe on the bundled tiny model, its
repeats run in batches of varying sizes beside filler requests, gives exactly
one logprob per tracked token with batch-invariant kernels, and more than one
with the default (CPU BLAS) kernels. Both batch-invariant implementations that
run on a CPU are checked: the exact-order torch ops the engine picks there, and
the Triton kernels under the interpreter. Other BLAS core types and thread
counts: tests/kernels/test_blas_conditions.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

BATCH_SIZES = "1,2,5,8,13"


def detaudit(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detaudit.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def run_coin_flip(tmp_path, kernels: str, n: int, impl: str = "auto", sizes: str = BATCH_SIZES) -> dict:
    out = detaudit("run", "--n", str(n), "--kernels", kernels, "--kernel-impl", impl,
                   "--batch-sizes", sizes, "--concurrency", "4", "--out", str(tmp_path / f"{kernels}-{impl}"),
                   "--quiet", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def assert_one_value_per_token(summary: dict, n: int, sizes: str) -> None:
    assert summary["n"] == n and summary["errors"] == 0
    assert {t["label"] for t in summary["tokens"]} == {"Heads", "Tails"}
    for token in summary["tokens"]:
        assert token["n"] == n and token["missing"] == 0
        assert token["distinct_logprobs"] == 1, token
        assert token["clusters"] == 1
        assert token["prob"]["range"] == 0.0
    assert summary["outputs"]["distinct"] == 1
    groups = {g["group"]: g["n"] for g in summary["groups"]}  # every batch size really was used
    assert groups == {size: n // len(sizes.split(",")) for size in sizes.split(",")}
    assert len(summary["fingerprints"]) == 1


@pytest.mark.slow
def test_coin_flip_n200_batch_invariant_gives_one_logprob_per_tracked_token(tmp_path):
    summary = run_coin_flip(tmp_path, "batch-invariant", n=200)
    assert summary["run"]["backend"]["kernel_impl"] == "cpu-exact"
    assert_one_value_per_token(summary, 200, BATCH_SIZES)


@pytest.mark.slow
def test_coin_flip_triton_kernels_under_the_interpreter_give_one_logprob(tmp_path):
    """The GPU's kernels, run by Triton's interpreter with a dot that avoids numpy's BLAS."""
    summary = run_coin_flip(tmp_path, "batch-invariant", n=6, impl="triton", sizes="1,3,8")
    assert summary["run"]["backend"]["kernel_impl"] == "triton-interpreter"
    assert_one_value_per_token(summary, 6, "1,3,8")


def test_coin_flip_default_kernels_move_with_the_batch(tmp_path):
    summary = run_coin_flip(tmp_path, "default", n=20)
    assert summary["run"]["backend"]["kernel_impl"] == "torch"
    heads = next(t for t in summary["tokens"] if t["label"] == "Heads")
    assert heads["distinct_logprobs"] > 1
    assert heads["prob"]["range"] > 0.0


@pytest.mark.slow
def test_the_main_job_with_no_flags_says_what_ran_and_shows_the_contrast(tmp_path):
    """`detaudit run` as the README's first command runs it: its default n and batch sizes
    give one value with batch-invariant kernels and several with --kernels default."""
    invariant = detaudit("run", "--out", str(tmp_path / "bi"))
    assert invariant.returncode == 0, invariant.stderr
    assert "Deterministic: 100 successful samples" in invariant.stdout
    facts = " ".join(invariant.stdout.split())
    assert "batch-invariant kernels (cpu-exact on cpu, float32)" in facts  # which path ran
    assert "batch sizes 1, 3, 8, 32" in facts
    assert "n = 100 on the CPU" in invariant.stderr

    default = detaudit("run", "--kernels", "default", "--out", str(tmp_path / "default"), "--json")
    assert default.returncode == 0, default.stderr
    summary = json.loads(default.stdout)
    assert summary["n"] == 100 and summary["run"]["backend"]["batch_sizes"] == [1, 3, 8, 32]
    assert not summary["deterministic"]
    assert all(t["distinct_logprobs"] > 1 for t in summary["tokens"])

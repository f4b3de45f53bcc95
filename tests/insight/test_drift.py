"""``detaudit compare NEW --baseline A B ...`` on real runs of the bundled engine, both
ways: a run of the same endpoint is not flagged even where a plain ``compare A B`` of two
baseline runs is, and a changed model is. Distances are recomputed here from the rows
read straight from SQLite (scipy's Wasserstein distance; the MMD by its definition)."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy import stats

import detaudit
from detaudit import session
from detaudit.defaults import LOCAL_MODEL
from local_backend.config import resolve_model_dir
from tests.insight.conftest import cli, stored_rows
from tests.servers.serve_process import Server


def changed_model(root: Path, factor: float) -> Path:
    """The bundled model with its final norm scaled by ``factor`` (logits x factor, as a
    temperature of 1/factor), in a folder that is also called tiny: the endpoint serves
    another model under the same name."""
    source = resolve_model_dir(LOCAL_MODEL)
    folder = root / f"x{factor:g}" / "tiny"
    shutil.copytree(source, folder)
    weights = load_file(source / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * np.float32(factor)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def coin_runs(tmp_path_factory) -> dict[str, Path]:
    """The coin flip with the default (batch-dependent) kernels: baseline runs each at one
    batch size, as one endpoint under other loads on other days; NEW at yet another;
    and the same at a model changed by 2% (final norm x 1.02)."""
    out = tmp_path_factory.mktemp("coin")

    def run(sizes: str, model: str | None = None) -> Path:
        return detaudit.run(n=16, out=out, kernels="default", batch_sizes=sizes, model=model).path

    return {"a": run("1"), "b": run("8"), "c": run("3"), "new": run("13"),
            "changed": run("13", str(changed_model(out, 1.02)))}


def _json(*args) -> tuple[int, dict]:
    result = cli("compare", *args, "--json")
    assert result.exit_code in (0, 4), result.stderr
    return result.exit_code, json.loads(result.stdout)


def _heads(run: Path) -> np.ndarray:
    """Heads' logprob per sample, from the stored text (float.hex for the local engine)."""
    texts = [next(e["logprob_text"] for e in r["positions"][0]["top"] if e["token"] == "Heads")
             for r in stored_rows(run)]
    return np.array([float.fromhex(t) if "0x" in t else float(t) for t in texts])


def test_another_load_is_within_the_floor_where_a_plain_compare_flags_it(coin_runs):
    a, b, c, new = (coin_runs[k] for k in ("a", "b", "c", "new"))
    plain = cli("compare", a, c)
    assert plain.exit_code == 4, "the baseline runs must differ for this test to mean anything"
    code, report = _json(new, "--baseline", a, b, c)
    assert code == 0 and report["differs"] is False
    assert (report["new"], report["baseline"]) == (str(new), [str(a), str(b), str(c)])
    heads = next(s for s in report["statistics"] if s["name"] == "logprob of Heads")
    pooled = np.concatenate([_heads(r) for r in (a, b, c)])
    assert heads["new_distance"] == pytest.approx(stats.wasserstein_distance(_heads(new), pooled),
                                                  rel=1e-9, abs=1e-15)
    for i, run in enumerate((a, b, c)):
        rest = np.concatenate([_heads(r) for r in (a, b, c) if r != run])
        assert heads["floor"]["leave_one_out"][i] == pytest.approx(
            stats.wasserstein_distance(_heads(run), rest), rel=1e-9, abs=1e-15)
    assert heads["floor"]["between_runs"] > 0  # the runs do differ from each other
    assert heads["new_distance"] < heads["floor"]["bound"] and not heads["differs"]
    assert heads["p_samples"] is not None and heads["p_runs"] > 0.05
    text = cli("compare", new, "--baseline", a, b, c)
    assert text.exit_code == 0 and "No drift beyond the noise floor" in text.stdout


def test_a_changed_model_is_flagged_beyond_the_floor(coin_runs):
    a, b, c, changed = (coin_runs[k] for k in ("a", "b", "c", "changed"))
    code, report = _json(changed, "--baseline", a, b, c)
    assert code == 4 and report["differs"] is True
    tests = {s["name"]: s for s in report["statistics"]}
    assert set(tests) == {"outputs", "logprob of Heads", "logprob of Tails"}
    heads = tests["logprob of Heads"]
    assert heads["differs"] and heads["p_holm"] < 0.05
    assert heads["new_distance"] > 100 * heads["floor"]["bound"]
    assert heads["new_distance"] == pytest.approx(
        stats.wasserstein_distance(_heads(changed), np.concatenate([_heads(r) for r in (a, b, c)])),
        rel=1e-9)
    assert tests["outputs"]["differs"] is False  # Heads every time, before and after
    assert report["fingerprints_new"] != report["fingerprints_baseline"][0]
    text = cli("compare", changed, "--baseline", a, b, c)
    assert text.exit_code == 4 and "Differs" in text.stdout and "noise floor" in text.stdout


def test_baseline_runs_after_the_flag_or_the_flag_repeated_are_the_same(coin_runs):
    a, b, c, new = (coin_runs[k] for k in ("a", "b", "c", "new"))
    _, once = _json(new, "--baseline", a, b, c)
    _, repeated = _json(new, "--baseline", a, "--baseline", b, "--baseline", c)
    assert once == repeated
    assert once["baseline_runs"] == 3 and once["permutations"] == 2000 and once["seed"] == 0


def test_bad_input_is_one_line_and_exit_2(coin_runs, tmp_path):
    a, b, new = coin_runs["a"], coin_runs["b"], coin_runs["new"]
    other_probe = detaudit.run(n=2, out=tmp_path, batch_sizes="1", prompt="Flip two coins.").path
    cases = {
        "one baseline run measures no noise floor": ("--baseline", a),
        "is NEW itself": ("--baseline", a, new),
        "is given twice": ("--baseline", a, a),
        "nope": ("--baseline", a, tmp_path / "nope"),
        "cannot be compared": ("--baseline", a, other_probe),
    }
    for expected, args in cases.items():
        result = cli("compare", new, *args)
        assert result.exit_code == 2, (expected, result.stdout)
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    three = cli("compare", new, a, b)
    assert three.exit_code == 2 and "--baseline" in three.stderr


# --- completions: the MMD on sampled sentences from a real `detaudit serve` -----------------

SEA = """name = "sea"
kind = "fixed-seed"
description = "Sampled at temperature 1, each sample under its own seed: a distribution of sentences."
[request]
messages = [{ role = "user", content = "Write one sentence about the sea." }]
max_tokens = 8
temperature = 1.0
logprobs = true
top_logprobs = 5
"""


class SeedPerSample:
    """The run's real backend, each sample's request sent with seed ``first + index``.

    Unseeded draws would make this test pass or fail by chance (a same-distribution run
    flagged at p < alpha, as one run in twenty would be). Seeded draws on batch-invariant
    kernels make each sample a function of (model, prompt, seed) alone, whatever batch it
    runs in at concurrency 32, so every run below is the same on every try; the seeds of
    different runs never overlap, so their samples are as independent as unseeded ones."""

    def __init__(self, backend, first: int):
        self.backend, self.first = backend, first

    async def complete(self, probe, index: int):
        return await self.backend.complete(probe.with_overrides(seed=self.first + index), index)

    def __getattr__(self, name: str):
        return getattr(self.backend, name)


SEA_N = 200


@pytest.fixture(scope="module")
def sea_runs(tmp_path_factory) -> dict[str, object]:
    """Four baseline runs and NEW from one server, and one run from a server whose model
    is sharper (logits x 3: temperature 1/3 in effect), under the same model name; each
    run draws under its own seeds (``SeedPerSample``), the sharper one under NEW's."""
    out = tmp_path_factory.mktemp("sea")
    probe = out / "sea.toml"
    probe.write_text(SEA)
    sharper = str(changed_model(out, 3.0))
    with ThreadPoolExecutor(2) as starting:  # both start at once
        servers = list(starting.map(lambda args: Server(*args), [(), ("--model", sharper)]))
    try:
        def run(server: Server, first_seed: int) -> Path:
            prepared = session.prepare(str(probe), model="tiny", base_url=server.url, n=SEA_N)
            store, backend, concurrency = session.start(prepared, out, concurrency=32)
            try:
                result = session.execute(prepared.probe, SeedPerSample(backend, first_seed),
                                         store, prepared.n, concurrency)
                assert (result.status, result.ok) == ("complete", SEA_N), result
            finally:
                store.close()
            return store.path

        runs = {"baseline": [run(servers[0], i * SEA_N) for i in range(4)],
                "new": run(servers[0], 4 * SEA_N), "changed": run(servers[1], 4 * SEA_N)}
    finally:
        for server in servers:
            server.stop()
    return runs


def _sequences(run: Path) -> list[tuple[str, ...]]:
    return [tuple(p["token"] for p in r["positions"]) for r in stored_rows(run) if r["status"] == "ok"]


def _mmd_by_definition(xs, ys) -> tuple[float, float]:
    """Pad with None, Gram matrices of the share of agreeing positions, then the unbiased
    MMD^2 and the plug-in MMD straight from their formulas."""
    length = max(map(len, xs + ys))
    grid = lambda s: np.array([list(t) + [None] * (length - len(t)) for t in s], dtype=object)  # noqa: E731
    x, y = grid(xs), grid(ys)
    gram = lambda u, v: (u[:, None, :] == v[None, :, :]).mean(axis=-1)  # noqa: E731
    kxx, kyy, kxy = gram(x, x), gram(y, y), gram(x, y)
    n, m = len(xs), len(ys)
    unbiased = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * kxy.mean())
    return unbiased, float(np.sqrt(kxx.mean() + kyy.mean() - 2 * kxy.mean()))


def test_sampled_completions_same_distribution_no_alarm_and_a_sharper_model_an_alarm(sea_runs):
    baseline = sea_runs["baseline"]
    # seeded, yet a distribution: most of NEW's sentences are unlike each other
    assert len(set(_sequences(sea_runs["new"]))) > SEA_N // 2
    code, same = _json(sea_runs["new"], "--baseline", *baseline)
    assert code == 0 and same["differs"] is False, same["statistics"]
    (mmd,) = [s for s in same["statistics"] if s["name"] == "token sequences"]
    assert [s["name"] for s in same["statistics"]][0] == "token sequences"  # in place of outputs
    assert mmd["distance"] == "MMD, Hamming" and mmd["test"].startswith("unbiased MMD^2")
    pooled = [seq for run in baseline for seq in _sequences(run)]
    unbiased, plug_in = _mmd_by_definition(_sequences(sea_runs["new"]), pooled)
    assert mmd["test_statistic"] == pytest.approx(unbiased, abs=1e-12)
    assert mmd["new_distance"] == pytest.approx(plug_in, abs=1e-12)
    assert mmd["p_samples"] > 0.001 and mmd["p_runs"] > 0.05

    code, changed = _json(sea_runs["changed"], "--baseline", *baseline)
    assert code == 4 and changed["differs"] is True
    (mmd,) = [s for s in changed["statistics"] if s["name"] == "token sequences"]
    assert mmd["differs"] and mmd["p_samples"] < 0.001 and mmd["p_runs"] < 0.05
    assert mmd["new_distance"] > mmd["floor"]["bound"]

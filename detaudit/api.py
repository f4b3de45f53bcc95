"""The Python API: what a notebook, a script or a user's own pytest test calls.

    import detaudit

    run = detaudit.run(n=20)                 # the bundled engine, coin flip
    run.summary()["tokens"][0]["distinct_values"]
    run.samples()                            # pandas: one row per sample and tracked token
    detaudit.open_run(run.path).summary()    # a stored run, as `detaudit report --json`
    run.html("report.html")                  # as `detaudit report RUN --html report.html`
    m = detaudit.matrix(axes="load,n")       # the invariance matrix (`detaudit matrix`)
    m.summary()["axes"][0]["varies"]; m.run("load").summary()

It goes through ``detaudit.session``, as ``detaudit run`` and ``detaudit gate`` do, so a
run made here has the same manifest, request path and summary as one made there, and
``detaudit report`` / ``--resume`` read it like any other. Nothing is printed but the
session's notes on stderr (``progress=True`` adds the progress bar).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detaudit import session
from detaudit.backends.base import DEFAULT_REQUEST_TIMEOUT_S
from detaudit.defaults import DEFAULT_PROBE, DEFAULT_THRESHOLD_PCT
from detaudit.runner import RunFailed, RunResult
from detaudit.store import RunStore
from detaudit.terminal import stderr

if TYPE_CHECKING:
    import pandas as pd

    from detaudit.analysis import Analysis
    from detaudit.analysis.crosscheck import Crosscheck

# keyword arguments of ``run`` beyond its named ones, as the flags of ``detaudit run``
PREPARE_OPTIONS = ("api", "api_key_env", "backend", "kernels", "kernel_impl", "batch_sizes",
                   "levels", "max_level", "prompt", "max_tokens", "temperature", "seed",
                   "top_logprobs", "no_logprobs", "stream")
MATRIX_OPTIONS = ("nonce", "api", "api_key_env", "backend", "kernels", "kernel_impl", "prompt",
                  "max_level")
SEND_OPTIONS = ("concurrency", "max_attempts", "request_timeout", "max_errors", "rpm", "tpm",
                "progress")


class Run:
    """A stored run (``results/<run-id>/``): its folder, its JSON summary and its samples.
    Each call reads the store afresh, so a run still being written shows what is there."""

    def __init__(self, path: str | Path, result: RunResult | None = None):
        self.path = Path(path)
        self.result = result  # the session that made it, for a Run from ``detaudit.run``

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def manifest(self) -> dict[str, Any]:
        """The run's manifest.json (see docs/ARCHITECTURE.md, Store)."""
        with RunStore.open_read_only(self.path) as store:
            return dict(store.manifest)

    def summary(self, threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> dict[str, Any]:
        """Exactly the object ``detaudit run --json`` prints (for a Run from
        ``detaudit.run``) or ``detaudit report --json`` prints (for ``open_run``)."""
        with RunStore.open_read_only(self.path) as store:
            return session.summary(store, threshold_pct, self.result)

    def analysis(self, threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> "Analysis":
        """The analysis as dataclasses (``detaudit.analysis.Analysis``)."""
        with RunStore.open_read_only(self.path) as store:
            return session.analyze_store(store, threshold_pct)

    def html(self, path: str | Path, threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> Path:
        """Write the report as one self-contained HTML file (``detaudit report RUN --html
        FILE``) and return its path; a folder that does not exist or cannot be written
        raises ``detaudit.html_report.HtmlReportError``."""
        from detaudit.html_report import check_destination, write_report

        check_destination(path)
        with RunStore.open_read_only(self.path) as store:
            analysis = session.analyze_store(store, threshold_pct)
            data = session.summary(store, threshold_pct, self.result, analysis=analysis)
            return write_report(path, analysis, data, store.manifest)

    def samples(self) -> "pd.DataFrame":
        """One row per (sample, tracked token): index, slot, label, token, position,
        logprob (NaN when the token is not in that sample's top-k), logprob_text,
        system_fingerprint, output, group (docs/ARCHITECTURE.md, Analysis frames)."""
        with RunStore.open_read_only(self.path) as store:
            return session.frames_of(store).tracked

    def crosscheck(self, reference: str | Path, **options: Any) -> "CrosscheckReport":
        """``detaudit.crosscheck(self, reference, **options)``: this run's logprobs against
        a teacher-forced reference forward pass."""
        return crosscheck(self, reference, **options)


def open_run(path: str | Path) -> Run:
    """A run folder made by ``detaudit run``, ``gate`` or ``detaudit.run``; a folder that
    is not one raises ``detaudit.store.StoreError`` saying why."""
    with RunStore.open_read_only(path):
        pass
    return Run(path)


def run(probe: str = DEFAULT_PROBE, model: str | None = None, base_url: str | None = None,
        n: int | None = None, out: str | Path = "results", **overrides: Any) -> Run:
    """Send ``probe`` (a built-in name or a .toml file) ``n`` times and store every
    answer under ``out``; returns the stored ``Run``.

    Without ``model`` (or with ``"tiny"`` or a model folder) the bundled engine runs in
    process; with ``base_url`` any OpenAI-compatible server. ``overrides`` are the
    flags of ``detaudit run``: api, api_key_env, backend, kernels, kernel_impl,
    batch_sizes, levels, max_level, prompt, max_tokens, temperature, seed, top_logprobs,
    no_logprobs (a text-only audit, for servers without logprobs), stream (True:
    server-sent events, False: whole answers; endpoints only), concurrency,
    max_attempts, request_timeout, max_errors, rpm, tpm, and progress (a progress bar
    on stderr). Bad input raises ``detaudit.UsageProblem`` (or the probe's
    ``ProbeError``); a run that stopped (endpoint down, every request failed) raises
    ``detaudit.RunFailed``, whose ``run`` is the stored, resumable run.
    """
    unknown = sorted(set(overrides) - set(PREPARE_OPTIONS) - set(SEND_OPTIONS))
    if unknown:
        raise TypeError(f"detaudit.run() got unknown options {', '.join(unknown)}; it takes "
                        f"{', '.join(PREPARE_OPTIONS + SEND_OPTIONS)}")
    send = {key: overrides.pop(key) for key in SEND_OPTIONS if key in overrides}
    max_attempts = send.get("max_attempts", 5)
    error_limit = session.parse_max_errors(send.get("max_errors"))
    session.check_request_timeout(send.get("request_timeout"))
    prepared = session.prepare(probe, model=model, base_url=base_url, n=n, **overrides)
    timeout = send.get("request_timeout") or DEFAULT_REQUEST_TIMEOUT_S
    limits = session.rate_limits(prepared.probe, prepared.config, send.get("rpm"), send.get("tpm"))
    store, backend, concurrency = session.start(
        prepared, Path(out), concurrency=send.get("concurrency"), timeout=timeout,
        max_attempts=max_attempts, max_errors=send.get("max_errors"), limits=limits,
        command=["detaudit.run", prepared.probe.name])
    progress = stderr if send.get("progress") else None
    try:
        result = session.execute(prepared.probe, backend, store, prepared.n, concurrency,
                                 max_attempts, progress, limits, error_limit)
    finally:
        store.close()
    stored = Run(store.path, result)
    if result.status == "failed" or result.ok == 0:
        why = result.reason or f"no request succeeded ({result.errors:,} errors)"
        failure = RunFailed(f"{why}; the run is stored in {store.path} (finish it with "
                            f"detaudit run --resume {store.path})")
        failure.run = stored
        raise failure
    return stored


class Matrix:
    """A stored invariance matrix (``results/matrix-<id>/``): its summary (``matrix.json``,
    what ``detaudit matrix --json`` prints) and one stored ``Run`` per axis."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Matrix({str(self.path)!r})"

    def summary(self) -> dict[str, Any]:
        from detaudit import matrix_session

        return matrix_session.read(self.path)

    @property
    def axes(self) -> list[str]:
        return [axis["axis"] for axis in self.summary()["axes"]]

    def run(self, axis: str) -> Run:
        """The stored run of one axis (its groups are the levels)."""
        return open_run(self.path / axis)


def open_matrix(path: str | Path) -> Matrix:
    """A matrix folder made by ``detaudit matrix`` or ``detaudit.matrix``."""
    matrix = Matrix(path)
    matrix.summary()  # StoreError when it is not one
    return matrix


def matrix(probe: str = DEFAULT_PROBE, model: str | None = None, base_url: str | None = None,
           n: int | None = None, out: str | Path = "results", *, axes: str | list[str] | None = None,
           levels: dict[str, Any] | None = None, max_cost: float | None = None,
           prices: str | Path | None = None, request_timeout: float | None = None,
           max_attempts: int = 5, progress: bool = False, **options: Any) -> Matrix:
    """Measure ``probe``'s request along ``axes`` (default: every one that applies), ``n``
    samples per level, and store each axis as a run under ``out/matrix-<id>/``.

    ``levels``: the non-baseline level per axis, e.g. ``{"load": 8, "n": 2}`` (as
    ``--level``); ``options``: nonce, api, api_key_env, backend, kernels, kernel_impl,
    prompt, max_level, as the flags of ``detaudit matrix``. ``max_cost``: refuse
    (``UsageProblem``) when the estimate exceeds it. An axis run that failed raises
    ``detaudit.RunFailed``; a level without data shows as ``varies: None``.
    """
    from detaudit import matrix_session

    unknown = sorted(set(options) - set(MATRIX_OPTIONS))
    if unknown:
        raise TypeError(f"detaudit.matrix() got unknown options {', '.join(unknown)}; it takes "
                        f"axes, levels, max_cost, prices, request_timeout, max_attempts, progress, "
                        f"{', '.join(MATRIX_OPTIONS)}")
    session.check_request_timeout(request_timeout)
    plan = matrix_session.prepare(probe, model=model, base_url=base_url, n=n, axes=axes,
                                  levels=levels, **options)
    if max_cost is not None:
        matrix_session.check_budget(matrix_session.count(plan, Path(prices) if prices else None),
                                    max_cost)
    folder, _ = matrix_session.execute(
        plan, Path(out), timeout=request_timeout or DEFAULT_REQUEST_TIMEOUT_S,
        max_attempts=max_attempts, progress=stderr if progress else None,
        command=["detaudit.matrix", plan.probe.name], quiet=not progress)
    return Matrix(folder)


@dataclass
class CrosscheckReport:
    """``detaudit crosscheck``: the run, the reference, which samples were scored, and the
    statistics (``detaudit.analysis.crosscheck.Crosscheck``). ``to_dict()`` is what
    ``--json`` prints (without its ``gate``)."""

    run: dict[str, Any]
    reference: dict[str, Any]
    samples: dict[str, Any]
    stats: "Crosscheck"

    def to_dict(self) -> dict[str, Any]:
        from detaudit.analysis.crosscheck import BITWISE_RULE

        stats = self.stats.to_dict()
        head = {key: stats.pop(key) for key in ("tokens", "bitwise_equal", "max_abs_diff",
                                                "mean_abs_diff", "k3_kl", "pearson")}
        return {**head, **stats, "bitwise_rule": BITWISE_RULE, "run": self.run,
                "reference": self.reference, "samples": self.samples}


def crosscheck(run: "str | Path | Run", reference: str | Path, *, engine: str = "local",
               kernels: str | None = None, kernel_impl: str | None = None, dtype: str | None = None,
               device: str | None = None, worst: int | None = None) -> CrosscheckReport:
    """Teacher-force every stored completion of ``run`` through ``reference`` (a model
    folder, or "tiny") and compare its logprobs with the server's: bitwise-equal share,
    max and mean |Δ logprob|, k3 KL(server || reference), Pearson of the probabilities,
    per position and the ``worst`` tokens (default 10). ``engine``: "local" (the bundled engine with
    ``kernels``, ``kernel_impl``, ``dtype``) or "transformers" (float32 unless ``dtype``).
    A text-only run, a prompt the reference cannot rebuild, or no scorable sample raises
    ``detaudit.UsageProblem``."""
    from detaudit.analysis.crosscheck import compare
    from detaudit.reference import SKIP_REASONS, load_reference, probe_of, score_run

    path = run.path if isinstance(run, Run) else Path(run)
    with RunStore.open_read_only(path) as store:
        probe_of(store.manifest, str(path))  # a text-only run fails before a model loads
        model = load_reference(reference, engine, kernels=kernels, kernel_impl=kernel_impl,
                               dtype=dtype, device=device)
        scored = score_run(store, model)
        facts = session.run_info(store)
        facts["backend"] = session.backend_name(store.manifest)
    stats = compare(scored.frame) if worst is None else compare(scored.frame, worst=worst)
    if stats.tokens == 0:
        why = ", ".join(f"{count} {reason} ({SKIP_REASONS[reason]})"
                        for reason, count in scored.skipped.items()) or "no sample stored"
        example = f"; e.g. {scored.problems[0]}" if scored.problems else ""
        raise session.UsageProblem(f"{path}: no sampled token could be scored: {why}{example}"
                                   "; is --reference the model that was served?")
    return CrosscheckReport(run=facts, reference=model.describe(), samples=scored.accounting(),
                            stats=stats)

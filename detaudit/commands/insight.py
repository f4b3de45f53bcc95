"""``detaudit compare``, ``plot`` and ``tokens``, plus the dry run and cost cap of ``run``.

The command functions live here and ``detaudit.commands`` registers them with
``register(app, guard)``, where ``guard`` is its error wrapper (expected errors become
one red line and an exit code). Exit codes: 0 ok; 1 failed; 2 usage;
``compare`` exits ``EXIT_DIFFER`` (4) when the runs differ significantly (with
``--baseline``: when NEW differs beyond the baseline runs' noise floor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from detaudit.defaults import DEFAULT_THRESHOLD_PCT, is_local_model
from detaudit.terminal import fail, print_json, threshold_option

if TYPE_CHECKING:
    from detaudit.analysis import Analysis, Frames
    from detaudit.records import SampleColumns

EXIT_DIFFER = 4


# --- loading a run folder or an analysed file -----------------------------------------------

@dataclass
class Source:
    """A stored run or a CSV/JSONL file, as frames (and its samples as columns, for a run)."""

    path: Path
    frames: "Frames"
    samples: "SampleColumns | None"
    manifest: dict[str, Any] | None

    @property
    def probe_kind(self) -> str | None:
        if self.manifest is not None:
            return self.manifest.get("probe", {}).get("kind")
        return "outcome" if self.frames.samples["output"].notna().any() else None

    @property
    def outcome_labels(self) -> list[str]:
        from detaudit.analysis.summary import OUTCOME_KINDS

        if self.manifest is not None:
            if self.probe_kind not in OUTCOME_KINDS:
                return []
            return list(self.manifest.get("probe", {}).get("track", {}).get("outcomes") or
                        [t["label"] for t in self.manifest.get("tracked") or []])
        return [t["label"] for t in self.frames.tracked_tokens] or \
            list(dict.fromkeys(self.frames.tracked["label"].astype(str)))

    @property
    def probe(self) -> dict[str, Any] | None:
        return self.manifest.get("probe") if self.manifest is not None else None

    @property
    def tracked(self) -> list[dict[str, Any]]:
        """The tracked tokens to match against another run's: as resolved from the data,
        except for a ``positions = "all"`` run, whose per-position slots come from what
        it generated (the manifest's entry stands for them)."""
        listed = (self.manifest or {}).get("tracked") or []
        if any(t.get("position") == "all" for t in listed):
            return listed
        return self.frames.tracked_tokens

    def analyze(self, threshold_pct: float) -> "Analysis":
        from detaudit.analysis import analyze

        return analyze(self.frames, threshold_pct=threshold_pct, probe_kind=self.probe_kind)


def load_source(path: Path) -> Source:
    """A run folder (results/<run-id>) or a CSV/JSONL file for ``detaudit analyze``."""
    from detaudit import session
    from detaudit.ingest import load_table
    from detaudit.store import RunStore

    if path.is_file():
        return Source(path, load_table(path), None, None)
    with RunStore.open_read_only(path) as store:
        samples = store.sample_columns()
        frames = session.frames_of(store, samples)
        manifest = dict(store.manifest)
    return Source(path, frames, samples, manifest)


# --- compare ---------------------------------------------------------------------------------

COMPARE_EXAMPLES = """\
[bold]Examples[/]

  detaudit compare results/<monday> results/<tuesday>
  detaudit compare results/<run-id> gpt4o-2024.csv --alpha 0.01 --json
  detaudit compare results/<today> --baseline results/<mon> results/<tue> results/<wed>
  detaudit compare results/<today> --baseline results/<mon> --baseline results/<tue> --json

Exit codes: 0 no significant difference, 4 the runs differ (with --baseline: NEW differs
beyond the noise floor), 1 failed, 2 usage error.
"""


def compare(
    runs: List[Path] = typer.Argument(..., metavar="RUN", show_default=False,
                                      help="A B: two runs or analysed files (CSV/JSONL). With "
                                           "--baseline: NEW first; runs after it are baseline "
                                           "runs too."),
    baseline: Optional[List[Path]] = typer.Option(
        None, "--baseline", show_default=False,
        help="Baseline run (two or more: --baseline A B C, or --baseline A --baseline B): "
             "test NEW against the noise floor they measure."),
    alpha: float = typer.Option(0.05, help="Significance level (0 < alpha < 1), after Holm's "
                                           "correction across the tests."),
    permutations: int = typer.Option(2000, min=1, help="With --baseline: permutations per "
                                                       "test (p-values are at least 1/(N+1))."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Did the outputs or the tracked-token logprobs change between runs?

    [bold]compare A B[/]: outputs by chi-square (Fisher's exact test for small 2x2 tables, a
    permutation test for other sparse tables); logprobs by two-sample Kolmogorov-Smirnov
    per tracked token; Holm-corrected together. Outcome shares: B - A with a 95% interval.

    [bold]compare NEW --baseline A B ...[/]: does NEW differ by more than the k baseline runs
    differ from each other? Statistics: the outputs (total variation distance; for
    completions the token sequences instead: MMD, Hamming kernel) and each tracked token
    (Wasserstein-1 distance of its logprobs). Per statistic, d = distance of NEW from the
    pooled baseline, and:
    p_samples: permutation test of NEW vs the pooled baseline (for completions the MMD test
    of Model Equality Testing: unbiased MMD^2, permutation p-value);
    floor, from the baseline runs alone: floor^2 = tau^2 (1 + 1/k) + noise^2, where
    tau^2 = max(0, (k-1)/k mean(d_i^2 - m_i)), d_i = distance of baseline run i from the
    other baseline runs, m_i = its mean square under permutation, noise^2 = the m_i
    rescaled to NEW's size;
    p_runs = P(|t_(k-1)| >= d / floor) (the prediction interval of one more run: NEW must
    be 12.7 floors away with 2 baseline runs, 4.3 with 3, 2.8 with 5, at alpha 0.05).
    A statistic differs when max(p_runs, p_samples), Holm-corrected, is below alpha.

    Exits 4 when the runs differ significantly, 0 when they do not.
    """
    from detaudit.analysis.compare import compare as compare_frames, incomparable
    from detaudit.report_insight import render_comparison

    if not 0.0 < alpha < 1.0:
        fail(f"--alpha {alpha:g}: give a significance level between 0 and 1, e.g. 0.05", 2)
    if baseline:
        compare_baseline(runs[0], [*baseline, *runs[1:]], alpha, permutations, json_out)
        return
    if len(runs) != 2:
        fail(f"compare takes two runs (compare A B) or a new run and two or more baseline runs "
             f"(compare NEW --baseline A B); got {len(runs)} run(s) and no --baseline", 2)
    run_a, run_b = runs
    a, b = load_source(run_a), load_source(run_b)
    problem = incomparable(a.probe, b.probe, a.tracked, b.tracked)
    if problem:
        fail(f"{run_a} and {run_b} cannot be compared: {problem}. Compare two runs of one "
             "probe (the same request and tracked tokens)", 2)
    labels = [label for label in a.outcome_labels if label in b.outcome_labels]
    result = compare_frames(a.frames, b.frames, alpha=alpha, outcome_labels=labels)
    if result.n_a == 0 or result.n_b == 0:
        empty = run_a if result.n_a == 0 else run_b
        fail(f"{empty}: no successful samples to compare; see detaudit report {empty}", 1)
    if json_out:
        print_json({"a": str(run_a), "b": str(run_b), **result.to_dict()})
    else:
        render_comparison(result, Console(highlight=False), str(run_a), str(run_b))
    if result.differ:
        raise typer.Exit(EXIT_DIFFER)


def compare_baseline(new_path: Path, baseline_paths: list[Path], alpha: float,
                     permutations: int, json_out: bool) -> None:
    """``compare NEW --baseline A B ...``: NEW against the noise floor of its baseline."""
    from detaudit.analysis.compare import incomparable
    from detaudit.analysis.drift import drift
    from detaudit.report_drift import render_drift

    if len(baseline_paths) < 2:
        fail(f"--baseline {baseline_paths[0]}: one baseline run measures no noise floor; give "
             "two or more runs of the same probe (compare NEW --baseline A B)", 2)
    seen = {new_path.resolve()}
    for path in baseline_paths:
        if path.resolve() in seen:
            what = "is NEW itself" if path.resolve() == new_path.resolve() else "is given twice"
            fail(f"--baseline {path} {what}; each baseline run must be another run", 2)
        seen.add(path.resolve())
    new = load_source(new_path)
    baselines = [load_source(path) for path in baseline_paths]
    for path, other in zip(baseline_paths, baselines):
        problem = incomparable(new.probe, other.probe, new.tracked, other.tracked)
        if problem:
            fail(f"{new_path} and baseline {path} cannot be compared: {problem}. Give runs of "
                 "one probe (the same request and tracked tokens)", 2)
    for path, source in zip([new_path, *baseline_paths], [new, *baselines]):
        if not (source.frames.samples["status"] == "ok").any():
            fail(f"{path}: no successful samples to compare; see detaudit report {path}", 1)
    kinds = {source.probe_kind for source in [new, *baselines]}
    result = drift(new.frames, [b.frames for b in baselines], alpha=alpha,
                   permutations=permutations, probe_kind=kinds.pop() if len(kinds) == 1 else None)
    if json_out:
        print_json({"new": str(new_path), "baseline": [str(p) for p in baseline_paths],
                    **result.to_dict()})
    else:
        render_drift(result, Console(highlight=False), str(new_path),
                     [str(p) for p in baseline_paths])
    if result.differs:
        raise typer.Exit(EXIT_DIFFER)


# --- plot ------------------------------------------------------------------------------------

PLOT_EXAMPLES = """\
[bold]Examples[/]

  detaudit plot results/<run-id> -o coin-flip.png
  detaudit plot gpt4o-heads.csv -o clusters.svg --threshold-pct 0.001
"""


def plot(
    run: Path = typer.Argument(..., help="Run folder or analysed file (CSV/JSONL)."),
    output: Path = typer.Option(..., "--output", "-o", help="Picture to write: .png, .svg or .pdf."),
    threshold_pct: float = typer.Option(DEFAULT_THRESHOLD_PCT, min=0.0, callback=threshold_option,
                                        help="Cluster gap, in percentage points of probability."),
    title: Optional[str] = typer.Option(None, help="Title above the picture [default: probe x n]."),
    json_out: bool = typer.Option(False, "--json", help="Print {\"plot\": PATH} on stdout."),
) -> None:
    """Draw a run: each tracked token's distinct probabilities, and where completions diverge.

    Stems at every distinct probability (height: count), stacked by system_fingerprint,
    clusters shaded, a log-odds axis on top; completion probes add a histogram of
    first-divergence positions. The path of the picture is printed on stdout.
    """
    from detaudit.plot import PlotError, plot_analysis

    source = load_source(run)
    analysis = source.analyze(threshold_pct)
    if title is None:
        m = source.manifest
        title = f"{m['probe']['name']} x {m['n']:,}: {m.get('backend', {}).get('model', '')}" \
            if m else str(run)
    try:
        written = plot_analysis(analysis, output, title=title)
    except PlotError as exc:
        fail(str(exc), 2)
    if json_out:
        print_json({"plot": str(written)})
    else:
        typer.echo(f"Plot written to {written}")


# --- tokens ----------------------------------------------------------------------------------

TOKENS_EXAMPLES = """\
[bold]Examples[/]

  detaudit tokens Tails --model gpt-4o      [dim]# T + ails[/]
  detaudit tokens " Heads" --model gpt-3.5-turbo --json
  detaudit tokens Tails --model tiny        [dim]# the bundled engine's tokenizer[/]
"""


@dataclass
class Split:
    tokenizer: str
    ids: list[int]
    tokens: list[str]
    first_token: str | None  # what a run tracks for an outcome label ``text``


def split_text(text: str, model: str) -> Split:
    """How ``model``'s tokenizer splits ``text``, and the first token a run would track
    for it (the very function the runner calls: ``Backend.first_token``'s logic)."""
    from detaudit import tokenization

    if is_local_model(model):
        return _split_local(text, model)
    name = tokenization.encoding_name(model)
    encoding = tokenization.load_encoding(name) if name else None
    if encoding is None:
        fail(f"no tokenizer is known for {model!r}: tiktoken knows OpenAI models (gpt-4o, "
             "gpt-4o-mini, gpt-3.5-turbo...), and 'tiny' or a model folder uses the local "
             "engine's tokenizer", 2)
    ids = encoding.encode(text, disallowed_special=())
    tokens = [encoding.decode_single_token_bytes(i).decode("utf-8", errors="replace") for i in ids]
    return Split(encoding.name, ids, tokens, tokenization.first_token(text, model))


def _split_local(text: str, model: str) -> Split:
    from local_backend.config import resolve_model_dir
    from local_backend.tokenizer import Tokenizer

    folder = resolve_model_dir(model)
    if not (folder / "tokenizer.json").is_file():
        fail(f"{folder}: no tokenizer.json, so text cannot be split for this model", 2)
    tokenizer = Tokenizer(folder)
    ids = tokenizer.encode(text, add_special_tokens=False)
    first = tokenizer.first_generated_token(text)  # what LocalBackend.first_token tracks
    return Split(f"{model} (tokenizer.json)", ids, [tokenizer.token_text(i) for i in ids],
                 None if first is None else tokenizer.token_text(first))


def tokens(
    text: str = typer.Argument(..., help="Text to split, e.g. an outcome label such as Tails."),
    model: str = typer.Option("gpt-4o", help="OpenAI model name (tiktoken), or 'tiny' / a model "
                                             "folder for the local engine."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Show how a model's tokenizer splits TEXT, and which first token a run tracks for it."""
    split = split_text(text, model)
    if json_out:
        print_json({"text": text, "model": model, "tokenizer": split.tokenizer,
                     "tokens": [{"id": i, "text": t} for i, t in zip(split.ids, split.tokens)],
                     "first_token": split.first_token})
        return
    console = Console(highlight=False)
    typer.echo(f"{text!r} under {split.tokenizer}: {len(split.ids)} token(s)")
    table = Table("#", "id", "token", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, (token_id, token) in enumerate(zip(split.ids, split.tokens)):
        table.add_row(str(i), str(token_id), repr(token))
    console.print(table, markup=False)
    typer.echo(" + ".join(split.tokens) if split.tokens else "(no tokens)")
    typer.echo(f"A run tracks an outcome labelled {text!r} by its first token: "
               f"{split.first_token!r}")


# --- run: dry run and cost cap ----------------------------------------------------------------

def cost_plan(probe: Any, config: dict[str, Any], requests: int, prices: Path | None,
              fillers: int = 0):
    """The cost estimate of a run; a bad price file is a usage error (exit 2)."""
    from detaudit.cost import PriceError, plan_run

    try:
        return plan_run(probe, config, requests, prices, fillers)
    except PriceError as exc:
        fail(str(exc), 2)


def dry_run(plan: Any, request: dict[str, Any], json_out: bool) -> None:
    """Print what ``run`` would send and what it would cost; send nothing."""
    from detaudit.report_insight import render_plan

    if json_out:
        print_json({"dry_run": True, "request": request, **plan.to_dict()})
        return
    fillers = f", beside at most {plan.fillers:,} filler requests" if plan.fillers else ""
    typer.echo(f"Request (sent {plan.requests:,} times{fillers}):")
    typer.echo(json.dumps(request, indent=2, ensure_ascii=False))
    render_plan(plan, Console(highlight=False))


def affordable(cost: Any, requests: Any, max_cost: float, store: Any = None):
    """(end index, plan) of what fits under --max-cost (``detaudit.budget``); exit 2
    when not even one request, with its fillers, does."""
    from detaudit.budget import affordable_prefix
    from detaudit.cost import PriceError

    try:
        end, session = affordable_prefix(requests, cost, max_cost, store)
    except PriceError as exc:
        fail(str(exc), 2)
    if session.targets == 0 and requests.targets > 0:
        first = next(s for s in requests.segments if s.missing)
        each = cost.per_request_usd + cost.per_filler_usd * first.fillers_each
        with_fillers = f", with its {first.fillers_each:,} filler requests" if first.fillers_each else ""
        fail(f"--max-cost {max_cost:g} USD does not cover one request (at most "
             f"{each:.6g} USD each{with_fillers}); raise --max-cost", 2)
    return end, session


def register(app: typer.Typer, guard: Callable[[Callable], Callable]) -> None:
    """Add compare, plot and tokens to the CLI app, wrapped in its error guard."""
    app.command(epilog=COMPARE_EXAMPLES)(guard(compare))
    app.command(epilog=PLOT_EXAMPLES)(guard(plot))
    app.command(epilog=TOKENS_EXAMPLES)(guard(tokens))

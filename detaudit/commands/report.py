"""``detaudit report``, ``export``, ``analyze`` and ``probes``: reading stored runs and
recorded files (no request is sent), and the report rendering ``run`` shares. The
session layer and the analysis are imported by the commands that use them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from detaudit.defaults import DEFAULT_THRESHOLD_PCT
from detaudit.probes import builtin_names, load_probe
from detaudit.terminal import print_json, stderr, threshold_option

if TYPE_CHECKING:
    from detaudit.analysis import Analysis

def render(analysis: "Analysis", manifest: dict[str, Any] | None, title: str | None = None) -> None:
    """The rich terminal report of an analysis, titled by the run (probe x n on where)."""
    from rich.console import Console

    from detaudit.report import render_report

    from detaudit import session

    if title is None and manifest is not None:
        title = f"{manifest['probe']['name']} x {manifest['n']:,} on {session.backend_name(manifest)}"
    render_report(analysis, Console(highlight=False), title=title,
                  facts=session.engine_facts(manifest) if manifest is not None else None)


def print_notes(notes: list[str]) -> None:
    """Notes belong to the report: stdout, under its tables."""
    from rich.console import Console

    out = Console(highlight=False)
    for note in notes:
        out.print(f"[yellow]note:[/] {note}", soft_wrap=True)


def report(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/<run-id>."),
    threshold_pct: float = typer.Option(DEFAULT_THRESHOLD_PCT, min=0.0, callback=threshold_option, help="Cluster gap, in percentage points of probability."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write the report as one self-contained HTML file (picture embedded) instead of printing it."),
) -> None:
    """Re-analyse a stored run (any threshold, no requests sent)."""
    from detaudit import session
    from detaudit.store import RunStore

    if html is not None:
        from detaudit.html_report import check_destination, write_report

        check_destination(html)  # before any work
    with RunStore.open_read_only(run_dir) as store:
        analysis = session.analyze_store(store, threshold_pct)
        data = session.summary(store, threshold_pct, analysis=analysis)
    if html is not None:
        write_report(html, analysis, data, store.manifest)
    status = data["run"]["status"]
    if status != "complete":
        stderr.print(f"[yellow]note:[/] this run is {status}; finish it with "
                     f"detaudit run --resume {run_dir}", highlight=False)
    if json_out:
        print_json(data)
        if html is not None:
            stderr.print(f"HTML report written to {html}", highlight=False)
    elif html is not None:
        typer.echo(f"HTML report written to {html}")
    else:
        render(analysis, store.manifest)
        print_notes(data["run"]["notes"])


def export(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/<run-id>."),
    clusters: Optional[Path] = typer.Option(None, help="Write one row per logprob cluster here."),
    samples: Optional[Path] = typer.Option(None, help="Write one row per sample here."),
    threshold_pct: float = typer.Option(DEFAULT_THRESHOLD_PCT, min=0.0, callback=threshold_option, help="Cluster gap, in percentage points of probability."),
) -> None:
    """Write a stored run as CSV files: clusters and/or samples."""
    from detaudit import session
    from detaudit.session import UsageProblem
    from detaudit.store import RunStore

    if clusters is None and samples is None:
        raise UsageProblem("nothing to export: give --clusters FILE.csv and/or --samples FILE.csv")
    with RunStore.open_read_only(run_dir) as store:
        analysis = session.analyze_store(store, threshold_pct)
    write_csvs(analysis, clusters, samples)


def analyze_file(
    file: Path = typer.Argument(..., help="CSV or JSONL, one row per sample, with a 'logprob' column."),
    token: Optional[str] = typer.Option(None, help="Analyse only the rows of this token."),
    threshold_pct: float = typer.Option(DEFAULT_THRESHOLD_PCT, min=0.0, callback=threshold_option, help="Cluster gap, in percentage points of probability."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    clusters: Optional[Path] = typer.Option(None, help="Also write the clusters CSV here."),
    samples: Optional[Path] = typer.Option(None, help="Also write the samples CSV here."),
) -> None:
    """Analyse logprobs recorded elsewhere (CSV or JSONL) like a stored run."""
    from detaudit.analysis import analyze
    from detaudit.analysis.insight import build_insight
    from detaudit.ingest import load_table

    frames = load_table(file, token=token)
    kind = "outcome" if frames.samples["output"].notna().any() else None
    analysis = analyze(frames, threshold_pct=threshold_pct, probe_kind=kind)
    analysis.insight = build_insight(frames)  # log-odds grid (a file has no top-k lists)
    if json_out:
        print_json({"file": str(file), **analysis.to_dict()})
    else:
        render(analysis, None, title=str(file))
    write_csvs(analysis, clusters, samples, quiet=json_out)


def write_csvs(analysis: "Analysis", clusters: Path | None, samples: Path | None,
                quiet: bool = False) -> None:
    from detaudit.export import write_clusters_csv, write_samples_csv
    from detaudit.session import UsageProblem

    for path, write in ((clusters, write_clusters_csv), (samples, write_samples_csv)):
        if path is None:
            continue
        try:
            write(analysis, path)
        except OSError as exc:
            raise UsageProblem(f"{path}: cannot write ({exc.strerror})") from None
        if quiet:
            stderr.print(f"wrote {path}", highlight=False)
        else:
            typer.echo(str(path))


def probes(json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """List the built-in probes: name, kind, defaults and what each measures."""
    rows = []
    for name in builtin_names():
        p = load_probe(name)
        rows.append({"name": p.name, "kind": p.kind, "api": p.api, "n": p.default_n,
                     "concurrency": p.default_concurrency, "description": p.description})
    if json_out:
        print_json({"probes": rows})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("probe", "kind", "n", "description", title="Built-in probes", title_justify="left")
    for r in rows:
        table.add_row(r["name"], r["kind"], f"{r['n']:,}", r["description"])
    Console().print(table)
    typer.echo("Use one with: detaudit run --probe NAME (or --probe FILE.toml)")




REPORT_EXAMPLES = ("[bold]Examples[/]\n\n  detaudit report results/<run-id>\n"
                   "  detaudit report results/<run-id> --threshold-pct 0.001 --json\n"
                   "  detaudit report results/<run-id> --html report.html")
EXPORT_EXAMPLES = ("[bold]Example[/]\n\n  detaudit export results/<run-id> --clusters clusters.csv "
                   "--samples samples.csv")
ANALYZE_EXAMPLES = ("[bold]Examples[/]\n\n  detaudit analyze gpt4o-heads.csv\n"
                    "  detaudit analyze logprobs.jsonl --token Heads --json\n"
                    "  detaudit analyze logprobs.csv --clusters clusters.csv")
PROBES_EXAMPLES = "[bold]Example[/]\n\n  detaudit probes --json"


def register(app: typer.Typer, guard: Callable[[Callable], Callable]) -> None:
    """Add report, export, analyze and probes to the CLI app, wrapped in its error guard."""
    app.command(epilog=REPORT_EXAMPLES)(guard(report))
    app.command(epilog=EXPORT_EXAMPLES)(guard(export))
    app.command("analyze", epilog=ANALYZE_EXAMPLES)(guard(analyze_file))
    app.command(epilog=PROBES_EXAMPLES)(guard(probes))

"""``detaudit report RUN --html FILE``: the report as one self-contained HTML file to share.

The same lines and tables as the terminal report (``detaudit.report.report_parts``, so
the two never drift apart), the run's facts from its manifest, the picture of
``detaudit plot`` as an embedded PNG, and the JSON summary. Nothing in it points
outside the file: styles are inline, the picture is a ``data:`` URI, there is no
script, and a Content-Security-Policy forbids any fetch, so opening it sends no
request. Every text that came from the run (outputs, tokens, fingerprints, the
prompt) is escaped: a model's answer that contains HTML is shown, never run.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shlex
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from detaudit import __version__
from detaudit.report import report_parts

if TYPE_CHECKING:
    from detaudit.analysis import Analysis

# No fetch of any kind; inline styles and data: images only.
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
       "form-action 'none'")
COLOURS = {"green": "g", "yellow": "y", "red": "r"}  # rich colours -> CSS classes

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; }
h2 { font-size: 1.1rem; margin: 1.8rem 0 .4rem; }
.facts-line, .dim { color: #59636e; }
.verdict { font-size: 1.15rem; font-weight: 600; }
table { border-collapse: collapse; margin: .3rem 0 .2rem; font-variant-numeric: tabular-nums; }
th, td { padding: .2rem .6rem; border-bottom: 1px solid #d1d9e0; vertical-align: top; }
th { text-align: left; background: #f6f8fa; font-weight: 600; }
td.num, th.num { text-align: right; white-space: nowrap; }
td.text { overflow-wrap: anywhere; }
caption { caption-side: bottom; text-align: left; color: #59636e; font-size: .9rem; }
table.run th { width: 11rem; }
pre { background: #f6f8fa; padding: .6rem; overflow-x: auto; font-size: .85rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d1d9e0; }
.b { font-weight: 600; } .g { color: #1a7f37; } .y { color: #9a6700; } .r { color: #cf222e; }
footer { margin-top: 2.5rem; color: #59636e; font-size: .85rem; }
"""


class HtmlReportError(ValueError):
    """The HTML file cannot be written there; the message says where and how to fix it."""


def check_destination(path: str | Path) -> Path:
    """Fail before any work when ``path`` cannot become the report: its folder must
    exist and be writable, and ``path`` must not be a folder."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise HtmlReportError(f"--html {path}: is a folder; give a file name, e.g. "
                              f"--html {path / 'report.html'}")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise HtmlReportError(f"--html {path}: {folder} {what}; create the folder first "
                              "or write the report elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise HtmlReportError(f"--html {path}: cannot write there (permission denied); "
                              "choose a folder you can write to")
    return path


def write_report(path: str | Path, analysis: "Analysis", summary: dict[str, Any],
                 manifest: dict[str, Any] | None = None) -> Path:
    """Write the HTML report of a stored run to ``path`` and return the path. The file
    appears whole or not at all (written beside it, then renamed)."""
    path = check_destination(path)
    text = render_html(analysis, summary, manifest)
    scratch = None
    try:
        fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(scratch, 0o644)
        os.replace(scratch, path)
    except OSError as exc:
        if scratch is not None:
            Path(scratch).unlink(missing_ok=True)
        raise HtmlReportError(f"--html {path}: cannot write there ({exc.strerror or exc}); "
                              "choose a folder you can write to") from None
    return path


def render_html(analysis: "Analysis", summary: dict[str, Any],
                manifest: dict[str, Any] | None = None) -> str:
    """The whole report as one HTML document (a string)."""
    from detaudit.session import backend_name, engine_facts

    title = "detaudit report"
    if manifest is not None:
        title = f"{manifest['probe']['name']} x {manifest['n']:,} on {backend_name(manifest)}"
    facts = engine_facts(manifest) if manifest is not None else None
    parts = report_parts(analysis, facts)
    head = [p for p in parts if not isinstance(p, Table)]  # facts, verdict, overview, warnings
    tables = [p for p in parts if isinstance(p, Table)]
    body = [f"<header><h1>{_esc(title)}</h1>"]
    verdict_at = (facts is not None) + bool(analysis.text_only)  # after those two lines
    for i, line in enumerate(head):
        css = "verdict" if i == verdict_at else "facts-line" if facts and i == 0 else ""
        body.append(f"<p class=\"{css}\">{_text_html(line)}</p>" if css
                    else f"<p>{_text_html(line)}</p>")
    body.append("</header>")
    if manifest is not None:
        body.append(_run_facts(manifest, summary))
    body.append(_picture(analysis, manifest))
    body.extend(_table_html(t) for t in tables)
    body.append("<section id=\"summary\"><h2>JSON summary</h2><details><summary>the object "
                "<code>detaudit report --json</code> prints</summary><pre>"
                + _esc(json.dumps(summary, indent=1, default=str)) + "</pre></details></section>")
    body.append(f"<footer>Written by detaudit {_esc(__version__)}. This file is self-contained: "
                "opening it sends no request.</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>detaudit: {_esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _run_facts(manifest: dict[str, Any], summary: dict[str, Any]) -> str:
    """What produced the run: probe, request, where it went, engine, n, dates, command."""
    from detaudit.session import backend_name, engine_facts

    probe = manifest.get("probe") or {}
    run = summary.get("run") or {}
    rows = [("run", manifest.get("run_id")), ("status", manifest.get("status")),
            ("probe", f"{probe.get('name')} ({probe.get('kind')}, {probe.get('api')} API)"),
            ("what it measures", probe.get("description")),
            ("sent to", backend_name(manifest)),
            ("model", (manifest.get("backend") or {}).get("model")),
            ("engine", engine_facts(manifest)),
            ("backend", _pairs(manifest.get("backend"))),
            ("n", f"{manifest.get('n', 0):,} requests, {manifest.get('concurrency', '?')} at a time"),
            ("results", f"{summary.get('ok', 0):,} ok, {summary.get('errors', 0):,} errors"),
            ("cluster gap", f"{summary.get('threshold_pct'):g} percentage points"),
            ("started", manifest.get("started_at")), ("ended", manifest.get("ended_at")),
            ("resumed", manifest.get("resumed_at")),
            ("fillers", _pairs(manifest.get("fillers"))),
            ("limits", _pairs(manifest.get("limits"))),
            ("command", shlex.join(str(a) for a in manifest.get("command") or []) or None),
            ("made by", f"detaudit {manifest.get('tool_version', '?')} "
                        f"(format {manifest.get('format_version', '?')})"),
            ("folder", run.get("dir"))]
    cells = "".join(f"<tr><th>{_esc(k)}</th><td class=\"text\">{_esc(v)}</td></tr>"
                    for k, v in rows if v not in (None, ""))
    notes = "".join(f"<li>{_esc(n)}</li>" for n in run.get("notes") or [])
    request = json.dumps(probe.get("request"), indent=1, ensure_ascii=False)
    return ("<section id=\"run\"><h2>Run</h2><table class=\"run\">" + cells + "</table>"
            + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
            + f"<details><summary>the request sent each time</summary><pre>{_esc(request)}"
              "</pre></details></section>")


def _pairs(mapping: Any) -> str | None:
    if not isinstance(mapping, dict) or not mapping:
        return None
    return "; ".join(f"{k}: {'-' if v is None else v}" for k, v in mapping.items())


def _picture(analysis: "Analysis", manifest: dict[str, Any] | None) -> str:
    """The ``detaudit plot`` picture as an embedded PNG, or a line saying why there is none."""
    from detaudit.plot import DPI, WIDTH_IN, PlotError, png_bytes

    title = None
    if manifest is not None:
        title = f"{manifest['probe']['name']} x {manifest['n']:,}: " \
                f"{(manifest.get('backend') or {}).get('model', '')}"
    try:
        data = png_bytes(analysis, title=title)
    except PlotError as exc:
        return f"<section id=\"picture\"><h2>Picture</h2><p class=\"dim\">No picture: {_esc(exc)}</p></section>"
    alt = ("Per tracked token, every distinct probability as a stem whose height is its count, "
           "clusters shaded, log-odds on the top axis")
    return (f"<section id=\"picture\"><h2>Picture</h2><figure><img width=\"{round(WIDTH_IN * DPI)}\" "
            f"alt=\"{_esc(alt)}\" src=\"data:image/png;base64,{base64.b64encode(data).decode()}\">"
            "</figure></section>")


def _table_html(table: Table) -> str:
    """A rich ``Table`` of the report as an HTML table: title, header, cells, caption."""
    columns = table.columns
    numeric = [c.justify == "right" for c in columns]
    head = "".join(f"<th class=\"{'num' if n else 'text'}\">{_cell_html(c.header)}</th>"
                   for c, n in zip(columns, numeric))
    rows = []
    for cells in zip(*(list(c.cells) for c in columns)):
        rows.append("<tr>" + "".join(f"<td class=\"{'num' if n else 'text'}\">{_cell_html(v)}</td>"
                                     for v, n in zip(cells, numeric)) + "</tr>")
    caption = f"<caption>{_cell_html(table.caption)}</caption>" if table.caption else ""
    return (f"<section><h2>{_cell_html(table.title or '')}</h2><table>{caption}"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _cell_html(cell: Any) -> str:
    """A cell in rich markup (or a ``Text``) as escaped HTML with its colours."""
    if isinstance(cell, Text):
        return _text_html(cell)
    return _text_html(Text.from_markup(str(cell)))


def _text_html(text: Text) -> str:
    """The plain text, escaped, with each styled stretch in a span of CSS classes."""
    plain = text.plain
    edges = sorted({0, len(plain), *(s.start for s in text.spans), *(s.end for s in text.spans)})
    out = []
    for start, end in zip(edges, edges[1:]):
        styles = [str(text.style)] + [str(s.style) for s in text.spans
                                      if s.start <= start and end <= s.end]
        classes = _classes(" ".join(styles))
        chunk = _esc(plain[start:end])
        out.append(f"<span class=\"{classes}\">{chunk}</span>" if classes else chunk)
    return "".join(out)


def _classes(style: str) -> str:
    words = style.split()
    found = [COLOURS[w] for w in words if w in COLOURS]
    return " ".join((["b"] if "bold" in words else []) + (["dim"] if "dim" in words else [])
                    + found[-1:])


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)

"""``detaudit report RUN --html FILE``: one self-contained file, looked at in a real
headless Chromium (offline, every request recorded), its figures checked against the
run's own JSON summary; text from the run is escaped; bad destinations are one line,
exit 2, and no file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import detaudit
from tests.browser import blank, open_offline
from tests.insight.conftest import cli, make_run
from tests.servers.fake_openai import State

# Every section of the page: its heading, then its rows as lists of cell texts.
SECTIONS_JS = """() => Array.from(document.querySelectorAll('section')).map(s => ({
    title: (s.querySelector('h2') || {innerText: ''}).innerText,
    rows: Array.from(s.querySelectorAll('tr')).map(r => Array.from(r.children).map(c => c.innerText))
}))"""
IMAGES_JS = """() => Array.from(document.images).map(i => ({
    complete: i.complete, width: i.naturalWidth, height: i.naturalHeight, src: i.src.slice(0, 22)}))"""


def detaudit_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detaudit", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A real run of the bundled engine (default kernels, three batch sizes) and the JSON
    summary ``detaudit run --json`` printed for it."""
    out = tmp_path_factory.mktemp("local")
    done = detaudit_cli("run", "--n", "24", "--kernels", "default", "--batch-sizes", "1,5,13",
                        "--concurrency", "4", "--out", str(out), "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    return Path(summary["run"]["dir"]), summary


def section(sections, title_start):
    """A table's title and rows (dicts keyed by its header row)."""
    (found,) = [s for s in sections if s["title"].startswith(title_start)]
    header, *rows = found["rows"]
    return found["title"], [dict(zip(header, row)) for row in rows]


def run_facts(sections) -> dict[str, str]:
    (found,) = [s for s in sections if s["title"] == "Run"]
    return dict(found["rows"])


def test_report_of_a_local_run_in_chromium_shows_the_runs_figures(local_run, tmp_path):
    run_dir, summary = local_run
    page_file = tmp_path / "report.html"
    done = detaudit_cli("report", str(run_dir), "--html", str(page_file))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"HTML report written to {page_file}"
    with open_offline(page_file) as visit:
        page = visit.page
        text = page.inner_text("body")
        sections = page.evaluate(SECTIONS_JS)
        images = page.evaluate(IMAGES_JS)
        verdict = page.inner_text("p.verdict")
        shot = page.screenshot(full_page=True)
        picture = page.locator("figure img").screenshot()
    # nothing but the file itself was asked for, and the page raised no error (CSP included)
    assert [u for u in visit.requests if not u.startswith("data:")] == [visit.url]
    assert visit.console_errors == []
    # the verdict and the run facts
    assert verdict.startswith("Deterministic" if summary["deterministic"] else "Nondeterministic")
    assert f"over {summary['ok']:,} successful samples" in verdict or summary["deterministic"]
    facts = run_facts(sections)
    assert facts["run"] == summary["run"]["id"] and facts["status"] == "complete"
    assert facts["n"].startswith(f"{summary['n']:,} requests")
    assert facts["results"] == f"{summary['ok']:,} ok, {summary['errors']:,} errors"
    assert facts["engine"].startswith("default kernels (torch on cpu")
    assert facts["command"].startswith("detaudit run --n 24 --kernels default")
    # every tracked token's figures, as the JSON summary has them
    _, tokens = section(sections, "Tracked tokens")
    assert len(tokens) == len(summary["tokens"]) == 2
    for token, row in zip(summary["tokens"], tokens):
        assert row["token"].startswith(token["label"])
        assert row["n"] == f"{token['n']:,}" and row["dist"] == f"{token['distinct_logprobs']:,}"
        assert row["clust"] == f"{token['clusters']:,}"
        assert row["mean P"] == f"{100 * token['prob']['mean']:.4f}"
        if token["distinct_logprobs"] > 1:
            _, clusters = section(sections, f"Clusters of P({token['label']}")
            assert sorted(r["count"] for r in clusters) == \
                sorted(f"{c['count']:,}" for c in token["cluster_list"])
            assert {r["centre %"] for r in clusters} == \
                {f"{c['centre_pct']:.6f}" for c in token["cluster_list"]}
    title, outputs = section(sections, "Outputs")
    assert title == f"Outputs ({summary['outputs']['distinct']:,} distinct)"
    assert [[r["output"], r["count"]] for r in outputs] == \
        [[o, f"{c:,}"] for o, c in summary["outputs"]["top"]]
    _, groups = section(sections, "By group")
    assert [r["group"] for r in groups] == [str(g["group"]) for g in summary["groups"]]
    # the picture is there, decoded, and drawn
    assert images == [{"complete": True, "width": 1080, "height": images[0]["height"],
                       "src": "data:image/png;base64,"}]
    assert images[0]["height"] > 500
    assert not blank(shot) and not blank(picture)
    assert "JSON summary" in text


class Tags(HTMLParser):
    """Every tag and attribute of a document, and the text of its <style>."""

    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.style = [], [], ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data


HOSTILE = '<img src="http://127.0.0.1:9/p"><script>x()</script>&amp;'  # under 60 characters


def test_html_from_the_run_is_shown_as_text_never_run_or_fetched(fake_openai, tmp_path):
    """An output and a fingerprint that are HTML: the page shows them literally, has no
    script, loads no image but the picture, and asks the network for nothing."""
    fake_openai.configure(states=[State([{HOSTILE: -0.1, "Heads": -2.5}], weight=3),
                                  State([{"Heads": -0.2}], weight=1)],
                          fingerprints=['fp_<b onmouseover="x()">1</b>'])
    run_dir = make_run(fake_openai, tmp_path / "results", "--n", "8")
    page_file = detaudit.open_run(run_dir).html(tmp_path / "hostile.html")
    tags = Tags()
    tags.feed(page_file.read_text(encoding="utf-8"))
    assert "script" not in tags.tags and "link" not in tags.tags and "iframe" not in tags.tags
    assert tags.tags.count("img") == 1
    for tag, name, value in tags.attrs:
        assert not name.startswith("on"), (tag, name)
        if name in ("src", "href", "action", "srcset", "poster"):
            assert value.startswith("data:"), (tag, name, value[:40])
    assert "url(" not in tags.style and "@import" not in tags.style
    with open_offline(page_file) as visit:
        page = visit.page
        text = page.inner_text("body")
        scripts = page.evaluate("() => document.scripts.length")
        images = page.evaluate("() => document.images.length")
        title = page.title()
    assert [u for u in visit.requests if not u.startswith("data:")] == [visit.url]
    assert scripts == 0 and images == 1 and title.startswith("detaudit: ")
    assert HOSTILE in text  # shown as the model sent it, escapes and all
    assert 'fp_<b onmouseover="x()">1</b>' in text


def test_html_into_a_missing_folder_is_one_line_exit_2_and_nothing_written(local_run, tmp_path):
    run_dir, _ = local_run
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("report", run_dir, "--html", tmp_path / "no-such-folder" / "report.html")
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-folder does not exist" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    result = cli("report", run_dir, "--html", tmp_path)  # a folder, not a file
    assert result.exit_code == 2 and "is a folder" in result.stderr and result.stdout == ""


def test_html_into_an_unwritable_place_is_one_line_exit_2(local_run, tmp_path):
    run_dir, _ = local_run
    if os.geteuid() == 0:  # root writes through permission bits; /sys refuses even root
        target = Path("/sys/detaudit-report.html")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "report.html"
    result = cli("report", run_dir, "--html", target)
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write there" in lines[0], result.stderr
    assert not target.exists()
    assert not list(target.parent.glob(f".{target.name}.*"))  # no scratch file left


def test_without_matplotlib_the_page_says_so_and_keeps_the_tables(fake_openai, tmp_path,
                                                                   monkeypatch):
    run_dir = make_run(fake_openai, tmp_path / "results", "--n", "8")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    text = detaudit.open_run(run_dir).html(tmp_path / "plain.html").read_text(encoding="utf-8")
    assert "No picture: detaudit plot needs matplotlib" in text and "<img" not in text
    assert "Tracked tokens" in text and "Outputs (" in text


def test_a_missing_browser_skips_unless_ci_requires_it(monkeypatch):
    import tests.browser as browser

    monkeypatch.setattr(browser, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("DETAUDIT_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Chromium is not installed"):
        browser.require_browser()
    monkeypatch.setenv("DETAUDIT_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="DETAUDIT_REQUIRE_BROWSER=1 but Chromium"):
        browser.require_browser()

"""detaudit plot renders real PNG and SVG files (matplotlib's Agg and SVG backends)."""

from __future__ import annotations

import struct
import sys
import xml.etree.ElementTree as ET

import matplotlib
import numpy as np
import pytest

from detaudit.plot import DPI, WIDTH_IN
from tests.insight.conftest import cli, make_run
from tests.servers.fake_openai import State, outcome_states

VALUES = [(-0.31326166, 5), (-0.3132617, 3), (-0.3140001, 2)]  # 3 distinct, 2 clusters


@pytest.fixture(autouse=True)
def headless(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.fixture
def coin_run(fake_openai, tmp_path):
    fake_openai.configure(states=outcome_states("Heads", VALUES, alternatives={"T": -1.3132617}),
                          fingerprints=["fp_a", "fp_b"])
    return make_run(fake_openai, tmp_path / "results", "--n", "40")


def test_png_of_a_coin_flip_run(coin_run, tmp_path):
    path = tmp_path / "pics" / "coin.png"
    result = cli("plot", coin_run, "-o", path)
    assert result.exit_code == 0, result.stderr
    assert f"Plot written to {path}" in result.stdout
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width == pytest.approx(WIDTH_IN * DPI, abs=2)
    assert height > 2 * 2.5 * DPI  # two token panels (Heads and Tails)
    assert len(data) > 20_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width) and float(np.std(pixels[..., :3])) > 0.05


def test_svg_shows_fingerprints_clusters_and_log_odds(coin_run, tmp_path):
    path = tmp_path / "coin.svg"
    result = cli("plot", coin_run, "-o", path, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f'{{"plot": "{path}"}}'
    text = path.read_text()
    root = ET.fromstring(text)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert path.stat().st_size > 20_000
    for expected in ("fp_a", "fp_b", "log-odds", "3 distinct probabilities in 2 cluster(s)"):
        assert expected in text  # matplotlib keeps text as <!-- comments --> beside the glyphs


def test_completion_probe_gets_a_first_divergence_histogram(fake_openai, tmp_path):
    story = [{"Once": -0.01}, {" upon": -0.02}, {" a": -0.03}, {" time": -0.04}]
    other = [{"Once": -0.01}, {" upon": -0.02}, {" the": -0.03}, {" sea": -0.04}]
    fake_openai.configure(states=[State(story, weight=3), State(other, weight=1)])
    run = make_run(fake_openai, tmp_path / "results", "--probe", "greedy-divergence", "--n", "8")
    path = tmp_path / "story.svg"
    result = cli("plot", run, "-o", path)
    assert result.exit_code == 0, result.stderr
    text = path.read_text()
    assert "First divergence" in text and "2 of 8 completions diverged" in text


def test_bad_file_name_and_missing_matplotlib_are_usage_errors(coin_run, tmp_path, monkeypatch):
    result = cli("plot", coin_run, "-o", tmp_path / "coin.jpg")
    assert result.exit_code == 2 and ".png" in result.stderr
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    result = cli("plot", coin_run, "-o", tmp_path / "coin.png")
    assert result.exit_code == 2 and "pip install 'detaudit[plot]'" in result.stderr
    assert not (tmp_path / "coin.png").exists()

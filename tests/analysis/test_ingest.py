"""detaudit analyze FILE: real CSV/JSONL files written in tmp_path, good and bad."""

import json
import os

import pytest

from detaudit.analysis import analyze
from detaudit.ingest import IngestError, load_table


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_keeps_the_text_and_judges_distinctness_by_float(tmp_path):
    path = write(tmp_path / "run.csv", "logprob,output,system_fingerprint,group\n"
                 "-0.1,Heads,fp_a,4\n-0.10,Heads,fp_a,4\n-0.2,Tails,fp_b,16\n,Tails,fp_b,16\n")
    frames = load_table(path)
    assert frames.tracked["logprob_text"].tolist()[:3] == ["-0.1", "-0.10", "-0.2"]
    result = analyze(frames, probe_kind=None)
    token = result.tokens[0]
    assert (token.n, token.missing, token.distinct_logprobs) == (4, 1, 2)
    assert result.fingerprints == {"fp_a": 2, "fp_b": 2}
    assert [g["group"] for g in result.groups] == ["4", "16"]
    assert result.outputs_distinct == 2


def test_jsonl_with_several_tokens_and_token_selection(tmp_path):
    lines = [{"index": i, "token": tok, "logprob": lp, "output": out}
             for i, (out, h, t) in enumerate([("Heads", -0.3, -1.5), ("Heads", -0.3, -1.5),
                                              ("Tails", -0.31, -1.4)])
             for tok, lp in (("Heads", h), ("T", t))]
    path = write(tmp_path / "run.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n")
    frames = load_table(path)
    assert [t["token"] for t in frames.tracked_tokens] == ["Heads", "T"]
    assert len(frames.samples) == 3
    result = analyze(frames, probe_kind=None)
    assert [t.distinct_logprobs for t in result.tokens] == [2, 2]
    only = load_table(path, token="T")
    assert only.tracked["token"].unique().tolist() == ["T"]
    assert only.tracked["logprob"].tolist() == [-1.5, -1.5, -1.4]


def test_jsonl_keeps_number_text_as_written(tmp_path):
    path = write(tmp_path / "run.jsonl", '{"logprob": -0.10}\n{"logprob": -0.1}\n{"logprob": 0}\n')
    frames = load_table(path)
    assert frames.tracked["logprob_text"].tolist() == ["-0.10", "-0.1", "0"]
    assert analyze(frames, probe_kind=None).tokens[0].distinct_logprobs == 2


@pytest.mark.parametrize("name, text, expected", [
    ("run.txt", "logprob\n-0.1\n", "unknown file type '.txt'"),
    ("run.csv", "", "no data rows"),
    ("run.csv", "logprob\n", "no data rows"),
    ("run.jsonl", "\n\n", "no data rows"),
    ("run.csv", "lp,output\n-0.1,Heads\n", "no 'logprob' column"),
    ("run.csv", "prob\n0.5\n", "convert probabilities"),
    ("run.csv", "logprob\n-0.1\nabc\n-0.2\nx1\n", "row 2 (line 3): 'abc'; row 4 (line 5): 'x1'"),
    ("run.csv", "logprob\n-0.1\n0.5\n", "positive in 1 row(s): row 2 (line 3): 0.5"),
    ("run.csv", "logprob\n-inf\n", "not a finite number"),
    ("run.jsonl", '{"logprob": -0.1}\n{"logprob": -0.1\n', "line 2 is not valid JSON"),
    ("run.jsonl", '[-0.1]\n', "line 1 is not a JSON object"),
])
def test_bad_files_give_clear_messages(tmp_path, name, text, expected):
    path = write(tmp_path / name, text)
    with pytest.raises(IngestError) as info:
        load_table(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(IngestError, match="no such file"):
        load_table(tmp_path / "absent.csv")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(IngestError, match="cannot read"):
        load_table(tmp_path / "dir.csv")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads everything")
def test_unreadable_file(tmp_path):
    path = write(tmp_path / "locked.csv", "logprob\n-0.1\n")
    path.chmod(0)
    with pytest.raises(IngestError, match="cannot read"):
        load_table(path)


def test_unknown_token_lists_the_tokens_present(tmp_path):
    path = write(tmp_path / "run.csv", "token,logprob\nHeads,-0.3\nT,-1.4\n")
    with pytest.raises(IngestError) as info:
        load_table(path, token="Tails")
    assert "'Tails' is not in the file" in str(info.value)
    assert "'Heads', 'T'" in str(info.value)
    no_column = write(tmp_path / "plain.csv", "logprob\n-0.3\n")
    with pytest.raises(IngestError, match="no 'token' column"):
        load_table(no_column, token="Heads")

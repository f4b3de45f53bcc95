"""Bad input through the real CLI: a clear message (what, where, how to fix), no
traceback, the right exit code, and nothing already stored lost."""

from __future__ import annotations

import json
import math

import pytest

from tests.reliability.helpers import MODEL, cli, manifest, only_run, remote, rows
from tests.servers.fake_openai import Fault, State


def no_traceback(result) -> None:
    assert "Traceback" not in result.stdout + result.stderr


def usage_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    no_traceback(result)
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


# --- the server answers, but not with a completion ----------------------------------------

# (fault, what the message says, attempts: a 200 that is no completion at all is a
# transport fault and retried; a completion without logprobs or a huge body is not)
BAD_ANSWERS = [
    (Fault("malformed_json"), "the body is not JSON", 2),
    (Fault("html", status=200), "nginx", 2),
    (Fault("empty_choices"), "the response has no choices", 2),
    (Fault("huge", size=40 * 2**20), "over 32 MiB", 1),
    (Fault("huge", size=40 * 2**20, chunked=True), "over 32 MiB", 1),
]


@pytest.mark.parametrize("fault, message, attempts", BAD_ANSWERS,
                         ids=["malformed", "html", "empty-choices", "huge", "huge-chunked"])
def test_bad_answers_are_stored_as_errors_and_good_samples_stay(fake_openai, tmp_path, fault,
                                                                message, attempts):
    fault.on = set(range(4, 100))  # the first four answers are good, the rest broken
    fake_openai.configure(faults=[fault])
    result = remote(fake_openai, tmp_path, "--n", "8", "--concurrency", "1", "--max-attempts", "2")
    assert result.exit_code == 0, result.stderr
    no_traceback(result)
    assert "bad_response" in result.stdout  # the report counts them by kind
    run_dir = only_run(tmp_path)
    stored = rows(run_dir, "SELECT idx, status, attempts, error_message FROM samples ORDER BY idx")
    assert [(i, s) for i, s, _, _ in stored] == [(i, "ok") for i in range(4)] + [(i, "error") for i in range(4, 8)]
    assert all(a == attempts for _, _, a, _ in stored[4:])
    assert all(message in m and fake_openai.url in m for *_, m in stored[4:]), stored[4][3]
    good = rows(run_dir, "SELECT raw FROM sample_rows WHERE status = 'ok'")
    assert all(raw == fake_openai.sent[i]["body"] for i, (raw,) in enumerate(good))


def test_the_minus_9999_sentinel_is_missing_not_a_logprob(fake_openai, tmp_path):
    # Top-k ranks from 1 on come back as -9999: "T" (rank 1) has no real value.
    fake_openai.configure(floor_from=1)
    result = remote(fake_openai, tmp_path, "--n", "6", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    heads, tails = summary["tokens"]
    assert tails["label"] == "Tails"
    assert tails["missing"] == 6 and tails["distinct_logprobs"] == 0
    assert heads["missing"] == 0 and heads["distinct_logprobs"] >= 1
    assert -9999.0 not in [v for t in summary["tokens"] for v in (t["logprob"]["min"], t["logprob"]["max"])]
    (note,) = summary["run"]["notes"]
    assert "-9999" in note and "6 samples" in note
    raw = rows(only_run(tmp_path), "SELECT raw FROM sample_rows LIMIT 1")[0][0]
    assert "-9999" in raw  # the body as received is kept
    report = cli("report", only_run(tmp_path))
    assert "-9999" in report.stdout and "missing" in report.stdout


def test_fewer_top_logprobs_than_asked_is_said_and_counted_missing(fake_openai, tmp_path):
    fake_openai.configure(top_cap=1)  # asked for 20, only the top one comes back
    result = remote(fake_openai, tmp_path, "--n", "5", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tokens"][1]["missing"] == 5
    (note,) = summary["run"]["notes"]
    assert "fewer top logprobs than asked" in note and "as few as 1" in note


# --- the server refuses -------------------------------------------------------------------

def half_done_run(fake, tmp_path):
    """A run of 10 with 5 good samples stored (the rest failed), to resume against a
    server that has meanwhile gone wrong."""
    fake.configure(faults=[Fault("status", status=400, on=set(range(5, 10)))])
    remote(fake, tmp_path, "--n", "10", "--concurrency", "1", "--max-attempts", "1")
    run_dir = only_run(tmp_path)
    good = rows(run_dir, "SELECT idx, raw FROM sample_rows WHERE status = 'ok' ORDER BY idx")
    assert [i for i, _ in good] == [0, 1, 2, 3, 4]
    return run_dir, good


def test_unknown_model_stops_with_a_hint_and_keeps_what_was_stored(fake_openai, tmp_path):
    run_dir, good = half_done_run(fake_openai, tmp_path)
    fake_openai.configure(models=["some-other-model"])
    result = cli("run", "--resume", run_dir, "--quiet")
    assert result.exit_code == 1
    no_traceback(result)
    assert "404" in result.stderr and f"model '{MODEL}' is not served" in result.stderr
    assert "--resume" in result.stderr
    assert len(fake_openai.received) == 1  # stopped at once, not after every index
    assert rows(run_dir, "SELECT idx, raw FROM sample_rows WHERE status = 'ok' ORDER BY idx") == good
    assert manifest(run_dir)["status"] == "failed"


def test_a_bad_key_stops_with_a_hint_and_keeps_what_was_stored(fake_openai, tmp_path):
    run_dir, good = half_done_run(fake_openai, tmp_path)
    fake_openai.configure(api_key="sk-the-right-one")
    result = cli("run", "--resume", run_dir, "--quiet", env={"OPENAI_API_KEY": "sk-wrong-key-1234"})
    assert result.exit_code == 1
    no_traceback(result)
    assert "401" in result.stderr and "check the API key" in result.stderr
    assert "sk-wrong-key-1234" not in result.stderr + result.stdout
    assert rows(run_dir, "SELECT idx, raw FROM sample_rows WHERE status = 'ok' ORDER BY idx") == good


def test_a_missing_key_on_resume_is_a_usage_error_and_keeps_the_run(tmp_path, fake_openai):
    remote(fake_openai, tmp_path, "--n", "3")
    run_dir = only_run(tmp_path)
    data = manifest(run_dir)
    data["backend_config"]["base_url"] = "https://api.example.com/v1"
    (run_dir / "manifest.json").write_text(json.dumps(data))
    result = cli("run", "--resume", run_dir, "--api-key-env", "DETAUDIT_UNSET_KEY")
    usage_error(result, "DETAUDIT_UNSET_KEY", "export DETAUDIT_UNSET_KEY")
    assert rows(run_dir, "SELECT COUNT(*) FROM samples WHERE status = 'ok'") == [(3,)]


# --- probe files ---------------------------------------------------------------------------

@pytest.mark.parametrize("content, needles", [
    (b"", ["name"]),
    (b'name = "x"\nwhat = 1\n[request]\nprompt = "p"\n', ["unknown key", "what"]),
    (b"\xff\xfe\x00binary", ["not a UTF-8 text file"]),
    (b'name = "x"\napi = "grpc"\n[request]\nprompt = "p"\n', ["api", "grpc"]),
    (b'name = "x"\n[request]\nmessages = [{ role = "user", content = "hi" }]\n[track]\nposition = -1\n',
     ["track.position"]),
])
def test_malformed_probe_files(tmp_path, content, needles):
    probe = tmp_path / "probe.toml"
    probe.write_bytes(content)
    usage_error(cli("run", "--model", MODEL, "--base-url", "http://127.0.0.1:9/v1",
                    "--probe", probe, "--out", tmp_path / "out"), str(probe), *needles)
    assert not (tmp_path / "out").exists()


def test_a_probe_path_that_is_a_folder(tmp_path):
    usage_error(cli("run", "--model", MODEL, "--base-url", "http://127.0.0.1:9/v1",
                    "--probe", tmp_path, "--out", tmp_path / "out"), str(tmp_path))


# --- files given to analyze ----------------------------------------------------------------

@pytest.mark.parametrize("name, content", [
    ("empty.csv", b""),
    ("header-only.csv", b"token,logprob\n"),
    ("no-logprob.csv", b"token,prob\nHeads,0.5\n"),
    ("words.csv", b"token,logprob\nHeads,abc\nHeads,-0.3\n"),
    ("binary.csv", b"\x00\x01\x02\xff\xfe"),
    ("broken.jsonl", b'{"logprob": -0.3}\n{"logprob": -0.3\n'),
    ("list.jsonl", b"[1, 2, 3]\n"),
    ("positive.csv", b"logprob\n0.5\n"),
    ("table.xlsx", b"PK\x03\x04"),
])
def test_bad_files_given_to_analyze(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    usage_error(cli("analyze", path), name)


def test_analyze_a_file_that_does_not_exist(tmp_path):
    result = cli("analyze", tmp_path / "nope.csv")
    assert result.exit_code == 2 and "nope.csv" in result.stderr
    no_traceback(result)


# --- run folders from another version ------------------------------------------------------

@pytest.mark.parametrize("version, needles", [
    (3, ["version 3", "newer detaudit"]),
    (0, ["version 0", "reads version(s) 1, 2"]),
    # a format-2 database under a manifest edited to say format 1
    (1, ["samples table lacks column(s) positions, raw", "format 1"]),
    ("1", ["format_version"]),
])
def test_run_folders_from_another_version(fake_openai, tmp_path, version, needles):
    remote(fake_openai, tmp_path, "--n", "2")
    run_dir = only_run(tmp_path)
    data = manifest(run_dir)
    data["format_version"] = version
    (run_dir / "manifest.json").write_text(json.dumps(data))
    for args in (["report", run_dir], ["run", "--resume", run_dir], ["export", run_dir,
                                                                       "--samples", tmp_path / "s.csv"]):
        usage_error(cli(*args), str(run_dir), *needles)
    assert rows(run_dir, "SELECT COUNT(*) FROM samples") == [(2,)]
    assert not (tmp_path / "s.csv").exists()


def test_a_corrupt_database_is_named(fake_openai, tmp_path):
    remote(fake_openai, tmp_path, "--n", "2")
    run_dir = only_run(tmp_path)
    for extra in run_dir.glob("samples.sqlite-*"):
        extra.unlink()
    (run_dir / "samples.sqlite").write_bytes(b"this is not sqlite" * 100)
    usage_error(cli("report", run_dir), "samples.sqlite")


# --- logprobs that are no numbers -------------------------------------------------------------

def test_nan_and_infinite_logprobs_are_bad_values_and_never_deterministic(fake_openai, tmp_path):
    # Heads is always chosen (the text never varies); 3 of 6 answers send its logprob as
    # NaN, and T's top-k entry comes back as -Infinity in every other answer of those.
    fake_openai.configure(states=[State([{"Heads": -0.31, "T": -1.31}]),
                                  State([{"Heads": math.nan, "T": -1.31}]),
                                  State([{"Heads": -0.31, "T": -1.31}]),
                                  State([{"Heads": math.nan, "T": -math.inf}])])
    result = remote(fake_openai, tmp_path, "--n", "6", "--json")
    assert result.exit_code == 0, result.stderr
    no_traceback(result)
    assert any("NaN" in s["logprobs"] for s in fake_openai.sent)  # the server did send them
    summary = json.loads(result.stdout)
    assert summary["deterministic"] is False
    assert summary["outputs"]["distinct"] == 1
    heads, tails = summary["tokens"]
    assert (heads["missing"], heads["bad_values"], heads["distinct_logprobs"]) == (0, 3, 1)
    assert (tails["missing"], tails["bad_values"]) == (0, 1)
    sent_bad = sum(t in ("NaN", "Infinity", "-Infinity") for s in fake_openai.sent for t in s["logprobs"])
    assert summary["bad_logprobs"] == {"samples": 3, "values": sent_bad}
    report = cli("report", only_run(tmp_path))
    assert report.exit_code == 0
    no_traceback(report)
    assert f"Nondeterministic: {sent_bad} NaN or infinite logprob(s) in 3 sample(s)" \
        in " ".join(report.stdout.split())
    assert "Deterministic" not in report.stdout

    config = tmp_path / "gate.toml"
    config.write_text(f'[endpoint]\nbase_url = "{fake_openai.url}"\nmodel = "{MODEL}"\n'
                      '[[check]]\nname = "coin"\nprobe = "coin-flip"\nn = 6\n')
    gated = cli("gate", "--config", config, "--json", "--out", tmp_path / "gate")
    assert gated.exit_code == 1, gated.stdout
    no_traceback(gated)
    check = json.loads(gated.stdout)["gate"]["checks"][0]
    assert check["status"] == "error" and "NaN or infinite" in check["message"]


# --- flags that used to end in a traceback ------------------------------------------------

@pytest.mark.parametrize("value", ["inf", "nan", "-1", "-inf"])
def test_a_threshold_that_is_not_a_finite_number_is_a_usage_error(fake_openai, tmp_path, value):
    remote(fake_openai, tmp_path / "runs", "--n", "2")
    run_dir = only_run(tmp_path / "runs")
    for args in (["report", run_dir], ["export", run_dir, "--samples", tmp_path / "s.csv"],
                 ["plot", run_dir, "-o", tmp_path / "p.png"],
                 ["run", "--model", MODEL, "--base-url", fake_openai.url, "--out", tmp_path / "new"],
                 ["gate", "--model", MODEL, "--base-url", fake_openai.url, "--out", tmp_path / "new"]):
        result = cli(*args, "--threshold-pct", value)
        usage_error(result, "--threshold-pct")
    assert not (tmp_path / "new").exists() and not (tmp_path / "s.csv").exists()
    assert len(fake_openai.received) == 2  # only the first run's requests were sent


@pytest.mark.parametrize("url, needles", [
    ("http://127.0.0.1:99999/v1", ["port '99999'", "1 to 65535"]),
    ("http://127.0.0.1:abc/v1", ["port 'abc'"]),
    ("http://[::1/v1", ["IPv6", "http://[::1]:8000/v1"]),
    ("http://[zz::1]/v1", ["not a valid address"]),
    ("ftp://127.0.0.1/v1", ["http or https", "'ftp'"]),
    ("http:///v1", ["names no host"]),
    ("http://user:hunter2@127.0.0.1:99999/v1", ["port '99999'"]),
])
def test_a_base_url_no_request_can_go_to_is_a_usage_error(tmp_path, url, needles):
    result = cli("run", "--model", MODEL, "--base-url", url, "--out", tmp_path / "out", "--quiet")
    usage_error(result, "--base-url", *needles)
    assert "hunter2" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()
    gated = cli("gate", "--model", MODEL, "--base-url", url, "--out", tmp_path / "out")
    usage_error(gated, *needles)
    from_env = cli("run", "--model", MODEL, "--out", tmp_path / "out", "--quiet",
                   env={"OPENAI_BASE_URL": url, "OPENAI_API_KEY": "sk-test"})
    usage_error(from_env, "base URL", *needles)
    assert not (tmp_path / "out").exists()

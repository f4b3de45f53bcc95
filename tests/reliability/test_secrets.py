"""The API key never lands anywhere: a recognisable key goes through a full audit with
failures (a 401 that echoes the key, 500s, dropped connections, retries), every
command that writes something runs, and then every file written and every line
printed is searched for it. Then each error kind on its own (200s that are no
completion, 4xx, 5xx, connection errors, bad URLs), a key pasted as --api-key-env,
and redact() itself."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from detaudit.redact import FRAGMENT, redact, register
from tests.reliability.helpers import (MODEL, cli, manifest, only_run, remote, rows, run_detaudit,
                                       subprocess_env)
from tests.servers.fake_openai import Fault

KEY = "sk-canary-DETAUDIT-7f3a9c21e4b85d60-SECRET"


def test_the_key_is_in_no_file_and_no_output(fake_openai, tmp_path):
    env = {"OPENAI_API_KEY": KEY}
    out = tmp_path / "results"
    printed: list[str] = []

    def run(*args):
        result = cli(*args, env=env)
        printed.extend([result.stdout, result.stderr])
        return result

    # 1. The server wants another key and echoes the one it got in its 401.
    fake_openai.configure(api_key="sk-the-servers-own-key", echo_key_in_errors=True)
    refused = run("run", "--model", MODEL, "--base-url", fake_openai.url, "--out", out / "refused",
                  "--n", "5", "--json")
    assert refused.exit_code == 1
    assert KEY in fake_openai.sent[0]["body"]  # the server did echo it: the test can fail

    # 2. The right key, with 500s, dropped connections and a 429 on the way.
    fake_openai.configure(api_key=KEY, seed=5, faults=[
        Fault("status", status=429, on={3}, headers={"retry-after-ms": "10"}, message=f"slow down {KEY}"),
        Fault("status", status=500, rate=0.15, headers={"Retry-After": "0"}),
        Fault("drop", rate=0.05),
    ])
    audit = run("run", "--model", MODEL, "--base-url", fake_openai.url, "--out", out / "audit",
                "--n", "40", "--concurrency", "4", "--max-attempts", "2", "--json")
    assert audit.exit_code == 0, audit.stderr
    run_dir = only_run(out / "audit")
    kinds = {k for (k,) in rows(run_dir, "SELECT error_kind FROM failed_attempts")}
    assert {"server_error", "connection", "rate_limit"} <= kinds  # failures went through

    # 3. Every command that reads the run and writes something.
    run("report", run_dir)
    run("report", run_dir, "--json")
    run("export", run_dir, "--clusters", tmp_path / "clusters.csv", "--samples", tmp_path / "samples.csv")
    run("analyze", tmp_path / "samples.csv", "--json")
    run("run", "--resume", run_dir, "--json")
    gate = run("gate", "--base-url", fake_openai.url, "--model", MODEL, "--out", out / "gate",
               "--junit", tmp_path / "junit.xml", "--json", "--max-distinct-logprobs", "5")
    assert gate.exit_code in (0, 1, 3), gate.stderr
    assert (tmp_path / "junit.xml").is_file()

    # 4. A real subprocess, so what it logs on stderr is what a user's terminal shows.
    proc = run_detaudit("run", "--model", MODEL, "--base-url", fake_openai.url,
                        "--out", out / "subprocess", "--n", "10", env=subprocess_env(**env))
    assert proc.returncode == 0, proc.stderr
    printed.extend([proc.stdout, proc.stderr])

    assert any(KEY in r["headers"].get("authorization", "") for r in fake_openai.received)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "samples.sqlite" for p in written) and len(written) >= 10
    leaks = [str(p) for p in written if KEY.encode() in p.read_bytes()]
    assert leaks == []
    assert [text for text in printed if KEY in text] == []
    # Not even a recognisable piece of it.
    assert not any(KEY[10:30].encode() in Path(p).read_bytes() for p in written)


# --- every error kind, one at a time ---------------------------------------------------------

# A key no pattern recognises (no sk-, no Bearer when echoed bare): only the registered
# secret can mask it, so these cases test redact() itself, not a lucky regex.
BARE = "c4n4ryDETAUDITc0ffee0d15ea5e0b5e55ed"
PIECE = BARE[6:22]  # a recognisable piece of it


def fault_every_request(fault: Fault) -> Fault:
    fault.rate, fault.headers = 1.0, {**fault.headers, "Retry-After": "0"}
    return fault


ECHOING = {  # faults whose bodies repeat the Authorization header, and the key bare
    "non-json-200": Fault("html", status=200, echo_auth=True),
    "cut-off-200": Fault("malformed_json", echo_auth=True),
    "error-in-200": Fault("error_200", echo_auth=True),
    "4xx": Fault("status", status=400, echo_auth=True),
    "5xx": Fault("status", status=503, echo_auth=True),
    "502-html": Fault("html", status=502, echo_auth=True),
}


def leaks(tmp_path: Path, printed: list[str], secret: str, piece: str) -> list[str]:
    """Every file under tmp_path and every printed text that holds the secret or a piece."""
    found = [str(p) for p in tmp_path.rglob("*") if p.is_file()
             and (secret.encode() in p.read_bytes() or piece.encode() in p.read_bytes())]
    return found + [t for t in printed if secret in t or piece in t]


@pytest.mark.parametrize("case", list(ECHOING))
def test_an_echoed_key_is_masked_on_every_error_path(fake_openai, tmp_path, case):
    fake_openai.configure(faults=[fault_every_request(ECHOING[case])])
    env = {"OPENAI_API_KEY": BARE}
    out = tmp_path / "results"
    first = cli("run", "--model", MODEL, "--base-url", fake_openai.url, "--out", out, "--n", "2",
                "--max-attempts", "2", "--concurrency", "1", env=env)
    assert first.exit_code == 1, first.stderr  # every sample failed
    assert all(BARE in s["body"] for s in fake_openai.sent)  # the server did echo it, bare
    run_dir = only_run(out)
    stored = rows(run_dir, "SELECT error_message, raw FROM failed_attempts")
    assert len(stored) >= 2 and all("***" in m for m, _ in stored)  # masked, not dropped
    printed = [first.stdout, first.stderr]
    for args in (("report", run_dir), ("report", run_dir, "--json"), ("run", "--resume", run_dir)):
        again = cli(*args, env=env)
        printed += [again.stdout, again.stderr]
    assert leaks(tmp_path, printed, BARE, PIECE) == []


def test_an_echoed_key_never_reaches_a_real_terminal(fake_openai, tmp_path):
    """A subprocess: its own fresh redact registry, its own stderr, as a user sees it."""
    fake_openai.configure(faults=[fault_every_request(Fault("error_200", echo_auth=True)),])
    proc = run_detaudit("run", "--model", MODEL, "--base-url", fake_openai.url,
                        "--out", tmp_path / "results", "--n", "2", "--max-attempts", "2",
                        env=subprocess_env(OPENAI_API_KEY=BARE))
    assert proc.returncode == 1, proc.stderr
    assert "an error came back with status 200" in proc.stderr
    assert BARE in fake_openai.sent[0]["body"]
    assert leaks(tmp_path, [proc.stdout, proc.stderr], BARE, PIECE) == []


def test_a_key_cut_in_half_by_a_short_message_is_masked(fake_openai, tmp_path):
    # The message shows the first 160 characters of the page: the key straddles the cut.
    fake_openai.configure(faults=[fault_every_request(Fault("html", status=200, echo_auth=True,
                                                            message="x" * 95))])
    result = remote(fake_openai, tmp_path, "--n", "1", "--max-attempts", "1",
                    env={"OPENAI_API_KEY": BARE})
    assert result.exit_code == 1
    assert "..." in result.stderr and "***" in result.stderr  # cut, and masked
    assert leaks(tmp_path, [result.stdout, result.stderr], BARE, BARE[:FRAGMENT]) == []


def test_connection_errors_and_bad_urls_show_no_key(fake_openai, tmp_path):
    env = {"OPENAI_API_KEY": BARE}
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    printed = []
    # Refused connections, with the key also in the URL's user:password.
    down = cli("run", "--model", MODEL, "--base-url", f"http://user:{BARE}@127.0.0.1:{port}/v1",
               "--out", tmp_path / "down", "--n", "2", "--max-attempts", "1", env=env)
    assert down.exit_code == 1 and "could not reach" in down.stderr
    assert manifest(only_run(tmp_path / "down"))["backend_config"]["base_url"] == \
        f"http://127.0.0.1:{port}/v1"
    # Dropped connections mid-request.
    fake_openai.configure(faults=[Fault("drop", rate=1.0)])
    dropped = remote(fake_openai, tmp_path / "dropped", "--n", "2", "--max-attempts", "1", env=env)
    assert dropped.exit_code == 1 and "connection" in dropped.stderr
    printed += [down.stdout, down.stderr, dropped.stdout, dropped.stderr]
    # URLs that cannot be used: refused before anything is sent or stored (exit 2).
    for url in (f"http://user:{BARE}@127.0.0.1:99999/v1", f"http://user:{BARE}@[::1/v1",
                f"ftp://user:{BARE}@127.0.0.1/v1", f"http://{BARE}@:8000/v1"):
        bad = cli("run", "--model", MODEL, "--base-url", url, "--out", tmp_path / "bad",
                  "--n", "1", env=env)
        assert bad.exit_code == 2, (url, bad.stderr)
        assert "--base-url" in bad.stderr and "Traceback" not in bad.stderr
        printed += [bad.stdout, bad.stderr]
    assert not (tmp_path / "bad").exists()
    assert leaks(tmp_path, printed, BARE, PIECE) == []


# --- --api-key-env takes a NAME -----------------------------------------------------------

@pytest.mark.parametrize("value", [KEY, BARE + "Xy9", "AIzaSyD3x9aB7cD8eF9gH0iJ1kL2mN3oP4qR5sT",
                                   "my key", "sk_live_51HxxDETAUDIT"])
def test_a_key_given_as_api_key_env_is_refused_unshown(fake_openai, tmp_path, value):
    result = cli("run", "--model", MODEL, "--base-url", fake_openai.url, "--out", tmp_path,
                 "--n", "1", "--api-key-env", value)
    assert result.exit_code == 2
    assert "NAME of an environment variable" in result.stderr
    assert value not in result.stdout + result.stderr
    assert not fake_openai.received and not any(tmp_path.iterdir())  # nothing sent or stored


def test_a_key_given_as_api_key_env_is_refused_on_resume_and_by_gate(fake_openai, tmp_path):
    done = remote(fake_openai, tmp_path / "runs", "--n", "2", "--json")
    assert done.exit_code == 0, done.stderr
    run_dir = only_run(tmp_path / "runs")
    before = (run_dir / "manifest.json").read_bytes()
    resumed = cli("run", "--resume", run_dir, "--api-key-env", KEY)
    config = tmp_path / "gate.toml"
    config.write_text(f'[endpoint]\nbase_url = "{fake_openai.url}"\nmodel = "{MODEL}"\n'
                      f'api_key_env = "{KEY}"\n[[check]]\nprobe = "coin-flip"\nn = 2\n')
    gate_flag = cli("gate", "--base-url", fake_openai.url, "--model", MODEL, "--api-key-env", KEY,
                    "--out", tmp_path / "gate")
    gate_file = cli("gate", "--config", config, "--out", tmp_path / "gate")
    for result in (resumed, gate_flag, gate_file):
        assert result.exit_code == 2, result.stderr
        assert "NAME of an environment variable" in result.stderr
        assert KEY not in result.stdout + result.stderr and KEY[10:30] not in result.stderr
    assert (run_dir / "manifest.json").read_bytes() == before
    assert not (tmp_path / "gate").exists()


def test_a_name_is_accepted_and_stored_as_a_name(fake_openai, tmp_path):
    fake_openai.configure(api_key=BARE)
    result = remote(fake_openai, tmp_path, "--n", "2", "--api-key-env", "MY_PROVIDER_API_KEY_2",
                    env={"MY_PROVIDER_API_KEY_2": BARE})
    assert result.exit_code == 0, result.stderr
    m = manifest(only_run(tmp_path))
    assert m["backend_config"]["api_key_env"] == "MY_PROVIDER_API_KEY_2"
    assert "MY_PROVIDER_API_KEY_2" in m["command"]
    assert BARE not in json.dumps(m)


# --- redact() itself ------------------------------------------------------------------------

def test_redact_masks_registered_secrets_and_credential_shapes():
    secret = "Zq8v2LmN0pR4sT6uW8xY1aB3cD5eF7gH"
    register(secret)
    assert redact(f"got {secret}!") == "got ***!"
    assert redact(f"cut: {secret[:14]}...") == "cut: ***..."  # a piece of it, at a cut
    assert redact(f"{secret[9:25]} mid") == "*** mid"
    assert redact("Authorization: Bearer abc.def-123_456") == "Authorization: Bearer ***"
    assert redact("key sk-proj-AbCdEf0123456789xyz") == "key sk-***"
    assert redact("http://me:pw@host:8000/v1") == "http://***@host:8000/v1"
    assert redact('{"api_key": "zzzz9999", "x": 1}') == '{"api_key": "***", "x": 1}'
    assert redact("x-api-key: qwerty123") == "x-api-key: ***"
    assert redact("db.password=hunter22 at /v1?secret=abcd1234") == "db.password=*** at /v1?secret=***"
    # Ordinary messages are left alone.
    for text in ("HTTP 503 from http://127.0.0.1:8000/v1: overloaded", "Bearer token required",
                 "the body is not JSON: '<html>'", "rate limited (slow down)",
                 "/etc/passwd: unknown file type", "results/secret: no such run folder",
                 "C:\\runs\\password: no such run folder"):
        assert redact(text) == text


def test_a_dummy_key_for_a_local_server_does_not_garble_messages(fake_openai, tmp_path):
    # "none" and "test" are what local servers get as keys; they are not secrets.
    fake_openai.configure(faults=[Fault("no_logprobs", rate=1.0)])
    result = remote(fake_openai, tmp_path, "--n", "1", env={"OPENAI_API_KEY": "none"})
    assert result.exit_code == 1
    assert "returned no logprobs" in result.stderr and "***" not in result.stderr

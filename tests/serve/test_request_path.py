"""One request path: a probe becomes the same engine request in process as through
`detaudit serve`, and gives the same logprob bits both ways (batch-invariant kernels).

In process, the local backend turns the probe into the OpenAI wire body
(detaudit/wire.py) and reads it with the server's own parser
(local_backend/server/protocol.py). Served, the OpenAI backend sends that body over
HTTP and `detaudit serve` runs the same parser. The first test checks the bodies
really are the same by catching what the OpenAI backend sends on a loopback server."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from detaudit.backends.local import LocalBackend
from detaudit.backends.openai_backend import OpenAIBackend
from detaudit.probes import Probe, builtin_names, load_probe
from local_backend.server.protocol import parse
from tests.serve.conftest import detaudit, json_out
from tests.servers.fake_openai import FakeOpenAI


def completions_probe() -> Probe:
    data = load_probe("greedy-divergence").to_dict()
    request = dict(data["request"])
    request["prompt"] = request.pop("messages")[0]["content"]
    data.update(api="completions", request=request)
    return Probe.from_dict(data, source="<completions variant>")


def engine_request(request) -> dict:
    fields = dataclasses.asdict(request)
    fields.pop("request_id")
    return fields


@pytest.fixture(scope="module")
def local() -> LocalBackend:
    return LocalBackend(kernels="default", batch_sizes=[1])


PROBES = [load_probe(name) for name in builtin_names()] + [completions_probe()]


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: f"{p.name}-{p.api}")
def test_every_probe_is_the_same_engine_request_in_process_and_served(local, probe):
    with FakeOpenAI() as fake:
        backend = OpenAIBackend("tiny", fake.url, api=probe.api, api_key_env="DETAUDIT_TEST_NO_KEY")

        async def send_one():
            try:
                await backend.complete(probe, 0)
            except Exception:  # the fake's answer does not matter here, only what it received
                pass
            finally:
                await backend.aclose()

        asyncio.run(send_one())
        sent = fake.received[0]["body"]
    served = parse(sent, probe.api, local.engine, local.model).requests[0]
    assert engine_request(local._request(probe)) == engine_request(served)


@pytest.mark.slow
def test_coin_flip_gives_the_same_bits_in_process_and_through_detaudit_serve(server_invariant, tmp_path):
    in_process = json_out(detaudit("run", "--n", "8", "--batch-sizes", "1,3,8", "--quiet", "--json",
                                   "--out", str(tmp_path / "local")))
    served = json_out(detaudit("run", "--model", "tiny", "--base-url", server_invariant.url, "--n", "8",
                               "--concurrency", "4", "--quiet", "--json", "--out", str(tmp_path / "served")))
    for summary in (in_process, served):
        assert summary["ok"] == 8 and all(t["distinct_logprobs"] == 1 for t in summary["tokens"])

    def values(summary: dict) -> dict[str, float]:
        out = {}
        for token in summary["tokens"]:
            text = token["distinct_values"][0]["logprob_text"]
            out[token["label"]] = float.fromhex(text) if "0x" in text else float(json.loads(text))
        return out

    # float.hex text in process, JSON number text served: the same float64, bit for bit.
    assert values(in_process) == values(served)

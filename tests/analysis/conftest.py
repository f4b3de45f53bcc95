"""Builders of real Sample records for the analysis tests."""

from __future__ import annotations

import pytest

from detaudit.analysis.frame import parse_logprob_text

from detaudit.records import Completion, Position, Sample, TokenLogprob


def coin_sample(index: int, output: str, heads: str | None, tails: str | None = None,
                fingerprint: str | None = "fp_a", group: str | None = None) -> Sample:
    """A one-token coin-flip answer; ``heads``/``tails`` are logprob texts (None: not in top-k)."""
    top = [TokenLogprob(tok, parse_logprob_text(text), text)
           for tok, text in (("Heads", heads), ("T", tails)) if text is not None]
    top.append(TokenLogprob("H", -9.5, "-9.5"))
    chosen = top[0]
    position = Position(token=chosen.token, logprob=chosen.logprob,
                        logprob_text=chosen.logprob_text, top=top)
    return Sample(index=index, status="ok",
                  completion=Completion(text=output, finish_reason="stop", positions=[position],
                                        model="m", system_fingerprint=fingerprint),
                  attempts=1, started_at=0.0, latency_s=0.01, group=group)


def text_sample(index: int, tokens: list[str], logprobs: list[float]) -> Sample:
    """A multi-token completion whose chosen tokens and logprobs are given."""
    positions = [Position(token=t, logprob=v, logprob_text=repr(v),
                          top=[TokenLogprob(t, v, repr(v))]) for t, v in zip(tokens, logprobs)]
    return Sample(index=index, status="ok",
                  completion=Completion(text="".join(tokens), positions=positions),
                  attempts=1, started_at=0.0, latency_s=0.01)


def error_sample(index: int, kind: str) -> Sample:
    return Sample(index=index, status="error", completion=None, attempts=3, started_at=0.0,
                  latency_s=1.0, error_kind=kind, error_message="boom")


@pytest.fixture
def make():
    """The builders, as a namespace: make.coin(...), make.text(...), make.error(...)."""
    class Builders:
        coin = staticmethod(coin_sample)
        text = staticmethod(text_sample)
        error = staticmethod(error_sample)
    return Builders


COIN_TRACKED = [{"label": "Heads", "token": "Heads", "position": 0},
                {"label": "Tails", "token": "T", "position": 0}]


@pytest.fixture
def coin_tracked():
    return [dict(t) for t in COIN_TRACKED]

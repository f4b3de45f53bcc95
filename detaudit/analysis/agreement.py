"""Agreement of the outputs' text: what a text-only audit measures.

Servers and providers that return no logprobs (``--no-logprobs``, or a probe with
``logprobs = false``) can still be audited by their text:

- TARr@N (total agreement rate, raw): the share of the N successful outputs equal to
  the most common raw output text.
- TARa@N (parsed): the share whose parsed answer equals the most common parsed answer.
  The probe's ``answer_regex`` parses an output: its first capture group if it has
  one, else the whole match (``re.search``). An output it does not match counts as
  disagreeing, so TARa@N <= 1 - unparsed / N.
- First divergence: where each output first departs from the most common one, in
  units of the model's tokenizer when it is known (``tokenize``), else in characters.

Pure: a samples frame in, an ``Agreement`` out; work is per distinct output, so the
cost does not grow with N.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from detaudit.analysis.divergence import first_divergence
from detaudit.analysis.frame import is_null

# What the analysis says about logprobs (``Analysis.logprobs``, JSON "logprobs").
REQUESTED = "requested"
NOT_REQUESTED = "not_requested"  # --no-logprobs, or a probe with logprobs = false
NOT_RETURNED = "not_returned"  # asked for, and the server sent none
NO_LOGPROBS_KIND = "no_logprobs"  # the error kind a backend gives that case (BackendError)


@dataclass
class Agreement:
    n: int  # successful outputs
    distinct_outputs: int
    reference_count: int  # outputs equal to the most common text
    tar_raw: float  # TARr@N; NaN when n == 0
    answer_regex: str | None = None
    parsed: int = 0  # outputs the regex matched
    distinct_answers: int = 0
    reference_answer: str | None = None
    answer_count: int = 0  # outputs whose answer is the most common answer
    tar_answer: float | None = None  # TARa@N; None without answer_regex
    # first divergence from the most common output (None: not computed)
    unit: str | None = None  # "token" | "character"
    tokenizer: str | None = None
    reference_length: int = 0  # in units
    diverged: int = 0
    positions: dict[int, int] = field(default_factory=dict)  # first divergence -> count
    min_position: int | None = None
    median_position: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.n, "distinct_outputs": self.distinct_outputs,
            "reference_count": self.reference_count, "tar_raw": self.tar_raw,
            "answer_regex": self.answer_regex, "tar_answer": self.tar_answer,
        }
        if self.answer_regex is not None:
            out["answers"] = {"parsed": self.parsed, "unparsed": self.n - self.parsed,
                              "distinct": self.distinct_answers,
                              "most_common": self.reference_answer, "count": self.answer_count}
        if self.unit is not None:
            out["first_divergence"] = {
                "unit": self.unit, "tokenizer": self.tokenizer,
                "reference_length": self.reference_length, "diverged": self.diverged,
                "histogram": {str(k): v for k, v in sorted(self.positions.items())},
                "min": self.min_position, "median": self.median_position,
            }
        return out


def logprobs_status(samples: pd.DataFrame, requested: bool) -> str:
    """``requested``, ``not_requested``, or ``not_returned`` when the probe asked for
    logprobs and the server answered without them (errors of kind ``no_logprobs``)."""
    if not requested:
        return NOT_REQUESTED
    if (samples["error_kind"] == NO_LOGPROBS_KIND).any():
        return NOT_RETURNED
    return REQUESTED


def parse_answer(pattern: re.Pattern[str], text: str) -> str | None:
    """The answer in ``text``: the first capture group, else the whole match; None if
    the pattern does not match (or its group took no part in the match)."""
    match = pattern.search(text)
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def agreement(samples: pd.DataFrame, answer_regex: str | None = None,
              tokenize: Callable[[str], Sequence[Any]] | None = None,
              tokenizer: str | None = None, divergence: bool = True) -> Agreement:
    """Agreement of the successful rows of a samples frame.

    ``tokenize`` splits a text into the model's tokens (``tokenizer`` names it); without
    it positions are characters. ``divergence=False`` leaves the first divergence out
    (runs with logprobs have it from their tokens: ``analysis.divergence``)."""
    # only the outputs of the successful rows (taking every column of a million rows costs more);
    # count them first, then make text of the few distinct ones (not of every row)
    raw = samples.loc[samples["status"] == "ok", "output"].value_counts(dropna=False, sort=False)
    texts = ["" if is_null(t) else str(t)
             for t in raw.index]
    counts = raw.groupby(pd.Index(texts, dtype=object), sort=False).sum() if len(raw) else \
        pd.Series([], dtype=np.int64)
    n = int(counts.sum())
    result = Agreement(n=n, distinct_outputs=len(counts), reference_count=0, tar_raw=math.nan,
                       answer_regex=answer_regex)
    if n == 0:
        return result
    # the most common text; among equals the first in text order, so the choice is stable
    reference, result.reference_count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    result.tar_raw = result.reference_count / n
    if answer_regex is not None:
        _answers(result, counts, re.compile(answer_regex))
    if divergence:
        _first_divergence(result, counts, reference, tokenize, tokenizer)
    return result


def _answers(result: Agreement, counts: pd.Series, pattern: re.Pattern[str]) -> None:
    answers: dict[str, int] = {}
    for text, count in counts.items():
        answer = parse_answer(pattern, text)
        if answer is not None:
            answers[answer] = answers.get(answer, 0) + int(count)
    result.parsed = sum(answers.values())
    result.distinct_answers = len(answers)
    result.tar_answer = 0.0
    if answers:
        result.reference_answer, result.answer_count = min(answers.items(),
                                                           key=lambda kv: (-kv[1], kv[0]))
        result.tar_answer = result.answer_count / result.n


def _first_divergence(result: Agreement, counts: pd.Series, reference: str,
                      tokenize: Callable[[str], Sequence[Any]] | None,
                      tokenizer: str | None) -> None:
    split = (lambda text: tuple(tokenize(text))) if tokenize is not None else tuple
    result.unit = "token" if tokenize is not None else "character"
    result.tokenizer = tokenizer if tokenize is not None else None
    ref_units = split(reference)
    result.reference_length = len(ref_units)
    for text, count in counts.items():
        if text == reference:
            continue
        at = first_divergence(split(text), ref_units)
        if at is None:  # another text with the same tokens (cannot happen for characters)
            continue
        result.positions[at] = result.positions.get(at, 0) + int(count)
    result.diverged = sum(result.positions.values())
    if result.positions:
        positions = np.repeat(list(result.positions), list(result.positions.values()))
        result.min_position = int(positions.min())
        result.median_position = float(np.median(positions))

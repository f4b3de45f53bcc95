"""Does an axis move the answers? The verdict of one ``detaudit matrix`` axis, from the
frames of its run. Pure: frames in, a dataclass out.

Each successful sample is reduced to its *answer*: the chosen tokens, the float64
bits of each chosen token's logprob, the bits of every tracked token's logprob and
the output text. On an axis that changes the answer's length (``max-tokens``) only
the first ``positions`` tokens count, and the output text is left out. A tracked
token missing from some sample's top-k (it may fall out of a top-5 that a top-20
keeps) is left out of every answer, and reported apart. On the ``cache`` axis
answers are compared per unit (the nonce variant), since the variants' prompts
differ on purpose.

    distinct[level]   bitwise-distinct answers at that level (per unit, summed)
    new[level]        of them, answers the baseline level never gave (per unit)
    varies            some non-baseline level gave an answer the baseline never gave
    moves             which part moved: "logprobs" (a logprob's bits, tokens kept)
                      and/or "outputs" (a token or the text)
    noisy             levels whose samples already disagree among themselves

Within-level noise alone is not a variation: a level whose answers are all among
the baseline's does not make the axis vary, however many of them there are (a
noisy baseline is reported as such). An axis with a level without one successful
sample has no verdict (``varies`` None).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping

import numpy as np
import pandas as pd

from detaudit.analysis.frame import Frames, tracked_slots


@dataclass
class AxisVerdict:
    axis: str
    levels: list[str]
    n: dict[str, int]  # successful samples per level
    errors: dict[str, int]
    distinct: dict[str, int]
    new: dict[str, int]  # per non-baseline level
    moves: dict[str, bool]  # {"logprobs": ..., "outputs": ...}
    noisy: list[str]
    varies: bool | None
    compared: str  # what an answer is made of, in words
    tokens: list[dict[str, Any]] = field(default_factory=list)  # per tracked token
    parts: dict[str, dict[str, int]] = field(default_factory=dict)  # distinct per level, per part

    @property
    def baseline(self) -> str:
        return self.levels[0]

    @property
    def verdict(self) -> str:
        """One phrase for the report: what moved, or that nothing did."""
        if self.varies is None:
            empty = [level for level in self.levels if not self.n.get(level)]
            return f"no data ({', '.join(empty)}: no successful sample)"
        if self.varies:
            moved = [part for part in ("logprobs", "outputs") if self.moves.get(part)]
            return "varies: " + " and ".join(moved)
        return "no change (noisy at every level)" if len(self.noisy) == len(self.levels) else \
            "no change" + (f" ({', '.join(self.noisy)} noisy)" if self.noisy else "")

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "levels": self.levels, "baseline": self.baseline,
                "distinct": self.distinct, "varies": self.varies, "verdict": self.verdict,
                "moves": self.moves, "new": self.new, "noisy": self.noisy, "n": self.n,
                "errors": self.errors, "compared": self.compared, "parts": self.parts,
                "tokens": self.tokens}


def compare_levels(frames: Frames, axis: str, levels: list[str], groups: list[str], *,
                   positions: int | None = None,
                   units: Mapping[int, Hashable] | None = None) -> AxisVerdict:
    """The verdict of one axis. ``levels`` (baseline first) are stored in ``groups``
    (the samples' group labels, in the same order); samples of other groups (the
    warm-up) are left out. ``positions``: compare only the first that many tokens
    (and no output text). ``units``: sample index -> what it is compared within."""
    samples = frames.samples
    wanted = samples[samples["group"].isin(groups)]
    ok = wanted[wanted["status"] == "ok"]
    level_of = dict(zip(groups, levels))
    slots = tracked_slots(frames)
    keep = [j for j, slot in enumerate(slots)
            if positions is None or _position(slot) < positions]
    tracked = _tracked_bits(frames.tracked, ok["index"], keep)
    complete = [j for j in keep if j in tracked and not tracked[j][1]]  # present in every sample
    answers: dict[str, list[tuple]] = {level: [] for level in levels}
    tokens_seen: dict[int, dict[str, set]] = {j: {level: set() for level in levels} for j in keep}
    for index, group, tokens, logprobs, output in zip(ok["index"].tolist(), ok["group"], ok["tokens"],
                                                      ok["logprobs"], ok["output"]):
        level = level_of[group]
        unit = units.get(index) if units is not None else None
        toks = tuple(tokens)[:positions] if positions is not None else tuple(tokens)
        bits = _bits(logprobs)[:len(toks)]
        marks = tuple(tracked[j][0].get(index) for j in complete)
        text = output if positions is None and isinstance(output, str) else None
        answers[level].append((unit, toks, bits, marks, text))
        for j in keep:
            value = tracked[j][0].get(index)
            if value is not None:
                tokens_seen[j][level].add((unit, value))
    base = levels[0]
    full = {level: set(rows) for level, rows in answers.items()}
    logprob_part = {level: {(u, t, b, m) for u, t, b, m, _ in rows} for level, rows in answers.items()}
    output_part = {level: {(u, t, x) for u, t, _, _, x in rows} for level, rows in answers.items()}
    counts = {level: int((wanted["group"] == group).sum()) for level, group in zip(levels, groups)}
    n = {level: len(rows) for level, rows in answers.items()}
    others = levels[1:]
    moves = {"logprobs": any(logprob_part[lv] - logprob_part[base] for lv in others),
             "outputs": any(output_part[lv] - output_part[base] for lv in others)}
    units_at = {level: len({row[0] for row in rows}) for level, rows in answers.items()}
    has_data = all(n[level] for level in levels)
    return AxisVerdict(
        axis=axis, levels=list(levels), n=n,
        errors={level: counts[level] - n[level] for level in levels},
        distinct={level: len(full[level]) for level in levels},
        new={level: len(full[level] - full[base]) for level in others},
        moves=moves,
        noisy=[level for level in levels if len(full[level]) > units_at[level]],
        varies=(moves["logprobs"] or moves["outputs"]) if has_data else None,
        compared=_compared(positions, len(complete), len(keep), units is not None),
        tokens=[{"label": slots[j]["label"], "position": _position(slots[j]),
                 "in_answers": j in complete,
                 "distinct": {level: len(seen) for level, seen in tokens_seen[j].items()},
                 "new": {level: len(tokens_seen[j][level] - tokens_seen[j][base]) for level in others}}
                for j in keep],
        parts={"token_sequences": {lv: len({(u, t) for u, t, *_ in rows}) for lv, rows in answers.items()},
               "logprob_vectors": {lv: len(logprob_part[lv]) for lv in levels},
               "outputs": {lv: len(output_part[lv]) for lv in levels}},
    )


def _position(slot: dict[str, Any]) -> int:
    position = slot.get("position")
    return position if isinstance(position, int) else 0


def _bits(logprobs: Any) -> tuple[int, ...]:
    return tuple(np.asarray(logprobs, dtype=np.float64).view(np.int64).tolist())


def _tracked_bits(tracked: pd.DataFrame, indices: pd.Series,
                  slots: list[int]) -> dict[int, tuple[dict[int, int], bool]]:
    """Per tracked slot: (sample index -> the float64 bits of its logprob, whether some
    sample lacks a finite value)."""
    wanted = set(indices.tolist())
    result = {}
    for j in slots:
        rows = tracked[(tracked["slot"] == j) & tracked["index"].isin(wanted)]
        values = rows["logprob"].to_numpy(np.float64)
        finite = np.isfinite(values)
        bits = dict(zip(rows["index"].to_numpy()[finite].tolist(),
                        values[finite].view(np.int64).tolist()))
        result[j] = (bits, bool((~finite).any()) or len(bits) < len(wanted))
    return result


def _compared(positions: int | None, in_answers: int, tracked: int, per_unit: bool) -> str:
    what = (f"the first {positions} token{'s' if positions != 1 else ''} and their logprob bits"
            if positions is not None else "tokens, their logprob bits and the output")
    if tracked:
        what += f", {in_answers} of {tracked} tracked token logprobs"
    return what + (", per nonce variant" if per_unit else "")

"""What one request produced, as every backend reports it and the store keeps it.

Logprobs carry two forms: ``logprob`` (the float) and ``logprob_text`` (the number
exactly as the server sent it in its JSON, or ``float.hex`` for the local engine),
so that "bitwise distinct" is judged on what was received, not on a re-rendering.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from operator import attrgetter
from typing import Any, Iterable, Iterator, Literal, Sequence


@dataclass(frozen=True)
class TokenLogprob:
    """One candidate token at one position (an entry of ``top_logprobs``)."""

    token: str
    logprob: float
    logprob_text: str
    bytes: list[int] | None = None


@dataclass(frozen=True)
class Position:
    """One generated position: the chosen token and the top-k candidates."""

    token: str
    logprob: float
    logprob_text: str
    top: list[TokenLogprob] = field(default_factory=list)
    bytes: list[int] | None = None


@dataclass
class Completion:
    """A backend's answer to one request."""

    text: str
    finish_reason: str | None = None
    positions: list[Position] = field(default_factory=list)
    model: str | None = None
    system_fingerprint: str | None = None
    # Backend-specific facts about how it was computed, e.g. {"batch_size": 8,
    # "batch_position": 3} for the local engine, {"load_level": 16} for load sweeps.
    extra: dict[str, Any] = field(default_factory=dict)
    # The response body as received (remote backends); kept for audits.
    raw: str | None = None


Status = Literal["ok", "error"]


@dataclass
class Sample:
    """One stored request of a run, successful or not (errors are never dropped)."""

    index: int
    status: Status
    completion: Completion | None
    attempts: int
    started_at: float  # unix time of the first attempt
    latency_s: float  # of the last attempt
    error_kind: str | None = None  # e.g. "rate_limit", "server_error", "timeout", "connection", "bad_response"
    error_message: str | None = None
    group: str | None = None  # label the analysis can split by (load level, batch size)


def position_to_dict(p: Position) -> dict[str, Any]:
    return asdict(p)


def position_from_dict(d: dict[str, Any]) -> Position:
    top = [TokenLogprob(**t) for t in d.get("top", [])]
    return Position(
        token=d["token"],
        logprob=d["logprob"],
        logprob_text=d["logprob_text"],
        top=top,
        bytes=d.get("bytes"),
    )


class Coded:
    """A column of few distinct values: row i holds ``values[codes[i]]``, values
    numbered in order of first appearance. A million rows of a handful of statuses,
    fingerprints or outputs are one int array and a short list, so the analysis
    spreads, compares and groups them without walking a million Python objects."""

    __slots__ = ("codes", "values")

    def __init__(self, codes: Any, values: list):
        import numpy as np

        codes = np.asarray(codes).reshape(-1)
        # any integer type (a store keeps a few values' codes in one byte each)
        self.codes = codes if codes.dtype.kind in "iu" else codes.astype(np.intp)
        self.values = list(values)

    @classmethod
    def of(cls, items: Iterable[Any]) -> "Coded":
        """``items`` coded. Values are told apart by type as well (1, 1.0 and True
        are three values), as a column of them would keep them."""
        items = list(items)
        numbering: dict[Any, int] = {}
        typed = not set(map(type, items)) <= {str, type(None)}
        keys = list(zip(map(type, items), items)) if typed else items
        codes = [numbering.setdefault(key, len(numbering)) for key in keys]
        values = [key[1] for key in numbering] if typed else list(numbering)
        return cls(codes, values)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> Any:
        return self.values[self.codes[i]]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tolist())

    def take(self, rows: Any) -> "Coded":
        """The rows at ``rows``; values kept as they are (``normalized`` drops unused ones)."""
        return Coded(self.codes[rows], self.values)

    def normalized(self) -> "Coded":
        """The same column with each distinct value once, numbered in order of first
        appearance among the rows (unused values dropped): what ``of`` makes. (Other
        ``Coded`` may repeat a value or hold unused ones.)"""
        import numpy as np

        merged = Coded.of(self.values)
        codes = merged.codes[self.codes]
        order = _in_order_of_first_row(codes, len(merged.values))
        renumber = compact_codes(np.zeros(len(merged.values), dtype=np.intp), len(order))
        renumber[order] = np.arange(len(order))
        return Coded(renumber[codes], [merged.values[i] for i in order.tolist()])

    def equals(self, value: Any) -> Any:
        """Per row, whether it holds ``value`` (compared as Python objects)."""
        import numpy as np

        hits = np.asarray([bool(v == value) for v in self.values], dtype=bool)
        return hits[self.codes] if len(self.values) else np.zeros(len(self.codes), dtype=bool)

    def array(self) -> Any:
        """The values as an object array, to index by the codes."""
        import numpy as np

        values = np.empty(len(self.values), dtype=object)
        values[:] = self.values
        return values

    def tolist(self) -> list:
        return self.array()[self.codes].tolist() if len(self.codes) else []

    def __eq__(self, other: object) -> bool:
        return _as_list(self) == _as_list(other)

    def __repr__(self) -> str:
        return f"Coded({len(self)} rows, {len(self.values)} values)"


def compact_codes(codes: Any, values: int) -> Any:
    """``codes`` (each below ``values``) in the smallest unsigned type that holds them:
    a million rows of a few values take a megabyte, not eight."""
    import numpy as np

    dtype = np.uint8 if values <= 1 << 8 else np.uint16 if values <= 1 << 16 else \
        np.uint32 if values <= 1 << 32 else np.intp
    return np.asarray(codes).astype(dtype, copy=False)


def _in_order_of_first_row(codes: Any, values: int) -> Any:
    """The codes that occur, in the order of their first row. A few values: one pass
    per value; many: a sort."""
    import numpy as np

    if values <= 64:
        first = []
        for v in range(values):
            hit = codes == v
            if hit.any():
                first.append((int(hit.argmax()), v))
        return np.asarray([v for _, v in sorted(first)], dtype=np.intp)
    used, first_rows = np.unique(codes, return_index=True)
    return used[np.argsort(first_rows, kind="stable")]


def _as_list(column: Any) -> list:
    return column.tolist() if hasattr(column, "tolist") else list(column)


# the columns of SampleColumns that hold few distinct values (``Coded``)
CODED_COLUMNS = ("status", "error_kind", "group", "output", "finish_reason", "model",
                 "system_fingerprint")


@dataclass(eq=False)
class SampleColumns:
    """A run's samples as columns, in index order: what the analysis reads.

    Text columns (``CODED_COLUMNS``) are ``Coded``; the others are sequences (lists or
    numpy arrays). Samples that generated the same positions share one entry of
    ``distinct_positions`` (``positions[i]`` is sample i's entry). A stored run of a
    million coin flips holds a few dozen distinct top-k lists and outputs, so reading
    it parses and walks a few dozen of each, not a million (``RunStore.sample_columns``).
    A sample without a completion has None for the completion's fields and an empty
    positions entry.
    """

    index: Sequence[int]
    status: Coded
    error_kind: Coded
    group: Coded
    attempts: Sequence[int]
    latency_s: Sequence[float]
    has_completion: Sequence[bool]
    output: Coded
    finish_reason: Coded
    model: Coded
    system_fingerprint: Coded
    positions: Sequence[int]
    distinct_positions: list[list[Position]]

    def __len__(self) -> int:
        return len(self.index)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SampleColumns):
            return NotImplemented
        return all(_as_list(getattr(self, name)) == _as_list(getattr(other, name))
                   for name in self.__dataclass_fields__)

    def take(self, rows: Any) -> "SampleColumns":
        """The samples at ``rows`` (an int array), in that order."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.intp)
        taken = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "distinct_positions":
                taken[name] = value
            elif isinstance(value, Coded):
                taken[name] = value.take(rows)
            else:
                taken[name] = np.asarray(value)[rows] if isinstance(value, np.ndarray) \
                    else [value[i] for i in rows.tolist()]
        return SampleColumns(**taken)

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> "SampleColumns":
        """Samples (any order) as columns sorted by index; each sample its own entry."""
        samples = list(samples)
        if any(a.index > b.index for a, b in zip(samples, samples[1:])):
            samples.sort(key=attrgetter("index"))  # stable: equal indices keep their order
        index, status, error_kind, group, attempts, latency_s, completions = (
            list(map(attrgetter(name), samples)) for name in
            ("index", "status", "error_kind", "group", "attempts", "latency_s", "completion"))
        present = [c is not None for c in completions]
        filled = [c if c is not None else _NO_COMPLETION for c in completions]
        output, finish_reason, model, fingerprint, positions = (
            list(map(attrgetter(name), filled)) for name in
            ("text", "finish_reason", "model", "system_fingerprint", "positions"))
        return cls(index=index, status=Coded.of(status), error_kind=Coded.of(error_kind),
                   group=Coded.of(group), attempts=attempts, latency_s=latency_s,
                   has_completion=present, output=Coded.of(output),
                   finish_reason=Coded.of(finish_reason), model=Coded.of(model),
                   system_fingerprint=Coded.of(fingerprint),
                   positions=list(range(len(samples))), distinct_positions=positions)


# what a sample without a completion reads as: None fields, no positions
_NO_COMPLETION = Completion(text=None, positions=())  # type: ignore[arg-type]

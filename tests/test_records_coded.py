"""``records.Coded``: a column as codes into its few values. Whatever it is made from,
it must give back the rows it was made of, number values in order of first appearance,
and keep apart values that a column would keep apart."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from detaudit.records import Coded, compact_codes

VALUES = st.one_of(st.none(), st.sampled_from(["ok", "error", "Heads", "T", "", "(none)"]),
                   st.text(max_size=3), st.integers(-2, 2), st.booleans(),
                   st.floats(allow_nan=False, width=16))


@given(st.lists(VALUES, max_size=60))
def test_a_column_coded_gives_its_rows_back_numbered_by_first_appearance(items):
    coded = Coded.of(items)
    assert coded.tolist() == items and [type(v) for v in coded.tolist()] == [type(v) for v in items]
    assert len(coded) == len(items) and list(coded) == items
    firsts = [coded.codes[i] for i in range(len(items))
              if coded.codes[i] not in coded.codes[:i]]
    assert firsts == list(range(len(coded.values)))


def test_values_equal_in_python_but_of_other_types_stay_apart():
    coded = Coded.of([1, 1.0, True, "1", None, 1])
    assert coded.values == [1, 1.0, True, "1", None] and coded.codes.tolist() == [0, 1, 2, 3, 4, 0]
    assert [type(v) for v in coded.values] == [int, float, bool, str, type(None)]


@given(st.lists(st.integers(0, 7), max_size=80), st.lists(VALUES, min_size=8, max_size=8),
       st.lists(st.integers(0, 79), max_size=30))
def test_normalized_and_take_give_the_rows_of_the_plain_column(codes, values, rows):
    coded = Coded(np.asarray(codes, dtype=np.intp), values)  # values may repeat or go unused
    plain = [values[c] for c in codes]
    again = coded.normalized()
    assert again.tolist() == plain
    assert again.values == Coded.of(plain).values and again.codes.tolist() == Coded.of(plain).codes.tolist()
    rows = [r for r in rows if r < len(codes)]
    assert coded.take(np.asarray(rows, dtype=np.intp)).tolist() == [plain[r] for r in rows]
    for value in ("ok", None, 1, 0.0):
        assert coded.equals(value).tolist() == [bool(v == value) for v in plain]


def test_a_few_values_codes_take_one_byte_and_many_more():
    assert compact_codes(np.arange(256), 256).dtype == np.uint8
    assert compact_codes(np.arange(257), 257).dtype == np.uint16
    assert compact_codes(np.arange(70_000), 70_000).dtype == np.uint32
    assert compact_codes(np.arange(70_000), 70_000).tolist() == list(range(70_000))


def test_nan_values_are_rows_of_their_own_and_never_equal():
    nan = math.nan
    coded = Coded.of(["a", nan, "a"])
    assert coded.values[0] == "a" and math.isnan(coded.values[1])
    assert coded.equals("a").tolist() == [True, False, True]
    assert coded.equals(nan).tolist() == [False, False, False]

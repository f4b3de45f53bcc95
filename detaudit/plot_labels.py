"""Where the picture's labels go so that none prints over another: pure geometry on the
pixel boxes that matplotlib's renderer measured (``detaudit.plot`` measures, this places).

Two jobs: cluster labels, set in rows under the top of a panel, each as near its
cluster's centre as the row allows, the most populous first, the ones left over merged;
and axis ticks, kept only where their labels stand apart and inside the axis. No
matplotlib here, so the rules are tested on their own (tests/insight/test_plot_labels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

GAP_PX = 4.0  # the least white space between two labels


@dataclass(frozen=True)
class Box:
    """A label's box in pixels: ``x0 <= x1``, ``y0 <= y1`` (y up, as in matplotlib)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def overlaps(self, other: "Box", gap: float = 0.0) -> bool:
        return (self.x0 < other.x1 + gap and other.x0 < self.x1 + gap
                and self.y0 < other.y1 + gap and other.y0 < self.y1 + gap)


@dataclass(frozen=True)
class Placed:
    """Where label ``index`` went: its left edge and the row (0: the top one)."""

    index: int
    x0: float
    row: int


def place_in_rows(centres: list[float], widths: list[float], left: float, right: float,
                  max_rows: int, gap: float = GAP_PX,
                  blocked: list[list[tuple[float, float]]] | None = None) -> list[Placed]:
    """Put each label (in the order given: the most important first) in the first row
    where it fits beside the labels already there, centred on ``centres[i]`` but kept
    within ``[left, right]``; a label that fits in no row is left out. ``blocked[row]``:
    spans of that row something else already holds (a legend)."""
    rows: list[list[tuple[float, float]]] = [list(blocked[r]) if blocked and r < len(blocked)
                                             else [] for r in range(max_rows)]
    placed = []
    for i, (centre, width) in enumerate(zip(centres, widths)):
        if width > right - left:
            continue
        x0 = min(max(centre - width / 2, left), right - width)
        for r, taken in enumerate(rows):
            if all(x0 + width + gap <= a or b + gap <= x0 for a, b in taken):
                taken.append((x0, x0 + width))
                placed.append(Placed(i, x0, r))
                break
    return placed


def pick_ticks(steps: list[int], positions: list[float], widths: list[float],
               left: float, right: float, gap: float = 2 * GAP_PX) -> list[int]:
    """The ticks to keep (indices, in position order) of candidates on a regular grid:
    tick i is ``steps[i]`` grid steps from zero, drawn at ``positions[i]`` with a label
    ``widths[i]`` wide. Every label kept lies inside ``[left, right]``, ``gap`` apart
    from the next. The finest evenly spaced subset (every 1, 2, 5, 10, 20, ... steps)
    whose labels all stand apart wins; where none does (an axis that is steep at one
    end), the roundest ticks claim their places first and crowded ones are dropped."""
    inside = [i for i in range(len(positions))
              if positions[i] - widths[i] / 2 >= left and positions[i] + widths[i] / 2 <= right]
    stride = 1
    while True:
        members = sorted((i for i in inside if steps[i] % stride == 0), key=lambda i: positions[i])
        if len(members) < 2:
            break
        if all(_apart(positions, widths, a, b, gap) for a, b in zip(members, members[1:])):
            return members
        stride *= 5 if str(stride)[0] == "2" else 2  # 1, 2, 5, 10, 20, 50, ...
    order = sorted(inside, key=lambda i: (-roundness(steps[i]), positions[i]))
    chosen: list[int] = []
    for i in order:
        if all(_apart(positions, widths, i, j, gap) for j in chosen):
            chosen.append(i)
    return sorted(chosen, key=lambda i: positions[i])


def _apart(positions: list[float], widths: list[float], a: int, b: int, gap: float) -> bool:
    return abs(positions[a] - positions[b]) >= (widths[a] + widths[b]) / 2 + gap


def roundness(steps: int) -> int:
    """How round a tick ``steps`` grid steps from zero is: 3 for a multiple of 10 steps,
    2 of 5, 1 of 2, else 0 (on a grid of 0.001: 1.000 before 1.005 before 1.002)."""
    return next((score for score, every in ((3, 10), (2, 5), (1, 2)) if steps % every == 0), 0)

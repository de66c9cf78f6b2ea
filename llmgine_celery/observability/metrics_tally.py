"""Metric updates of a batch of records, added up and applied at once.

In multiprocess mode every update of a prometheus-client value takes a lock and
asks the process id (a system call) before writing its file: about a dozen
updates per command. The writer thread hands the metrics sink a batch of records
at a time; the sink adds the batch's increments per series and its observations
per histogram bucket here, then writes each series once.
"""

from __future__ import annotations

import bisect
from typing import Any


class Tally:
    """Counter and gauge increments and histogram observations, applied in one go."""

    def __init__(self) -> None:
        self._amounts: dict[Any, float] = {}
        self._observed: dict[Any, list[float]] = {}

    def inc(self, series: Any, amount: float = 1.0) -> None:
        """Add ``amount`` to a counter or gauge series (a gauge's may be negative)."""
        self._amounts[series] = self._amounts.get(series, 0.0) + amount

    def observe(self, series: Any, value: float) -> None:
        """Observe ``value`` in a histogram series."""
        found = self._observed.get(series)
        if found is None:
            self._observed[series] = [value]
        else:
            found.append(value)

    def apply(self) -> None:
        """Write what was added up: one update per series (and histogram bucket)."""
        amounts, self._amounts = self._amounts, {}
        observed, self._observed = self._observed, {}
        for series, amount in amounts.items():
            if amount:
                series.inc(amount)
        for series, values in observed.items():
            observe_all(series, values)


def observe_all(histogram: Any, values: list[float]) -> None:
    """``histogram.observe(v)`` for each value, one update per bucket touched.

    Uses the histogram's own buckets and sum (prometheus-client's ``Histogram``
    keeps per-bucket counts, each bucket counting what is at most its bound and
    above the one before); anything else is observed value by value.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts: dict[int, int] = {}
    for value in values:
        index = bisect.bisect_left(bounds, value)  # the first bound >= value
        if index < len(bounds) and value == value:  # NaN is in no bucket
            counts[index] = counts.get(index, 0) + 1
    total.inc(sum(values))
    for index, count in counts.items():
        buckets[index].inc(count)

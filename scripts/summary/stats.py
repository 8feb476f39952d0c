"""Mean ± spread over seeds, as the field reports it: CoOp's ``parse_test_res.py`` gives the mean
and numpy's standard deviation (the population one), optionally a 95 % confidence interval
(1.96 · std / √n). ``--std sample`` uses the sample standard deviation instead."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    kind: str = "population"    # or "sample"
    ci95: bool = False

    def cell(self, values: list[float]) -> tuple[float, float | None, int]:
        """(mean, the spread shown after ±, runs); one run has no spread."""
        mean = statistics.fmean(values)
        if len(values) < 2:
            return mean, None, len(values)
        std = statistics.pstdev(values) if self.kind == "population" else statistics.stdev(values)
        return mean, (1.96 * std / math.sqrt(len(values)) if self.ci95 else std), len(values)

    def note(self) -> str:
        what = "the population standard deviation (numpy's, as CoOp's parse_test_res.py)" \
            if self.kind == "population" else "the sample standard deviation"
        if self.ci95:
            return f"mean ± 95% confidence interval (1.96 · std / √runs, std: {what}) over seeds"
        return f"mean ± std over seeds, std: {what}"


def fmt(cell) -> str:
    if cell is None:
        return "–"
    mean, spread, _ = cell
    return f"{mean:.2f}" if spread is None else f"{mean:.2f} ± {spread:.2f}"


def fmt_mean(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"

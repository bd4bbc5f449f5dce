"""Pure statistics for measurements taken on a noisy, shared machine: medians and spreads, percentiles,
least-squares slopes. No I/O, no timing: everything here is unit-tested with fixed numbers."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Median and spread of repeated measurements. ``spread`` is the interquartile range relative to the
    median (0.1 = the middle half of the runs lies within 10 % of the median's size)."""

    n: int
    median: float
    p25: float
    p75: float
    min: float
    max: float

    @property
    def spread(self) -> float:
        return (self.p75 - self.p25) / abs(self.median) if self.median else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "spread": self.spread}

    def fmt(self, digits: int = 1, unit: str = "") -> str:
        """``12.3 ±4 %`` style: the median and the relative interquartile range."""
        return f"{self.median:.{digits}f}{unit} ±{100 * self.spread / 2:.0f} %" if self.n > 1 else \
            f"{self.median:.{digits}f}{unit}"


def summarise(values: Sequence[float]) -> Summary | None:
    """Median, quartiles and range of ``values`` (NaN and None dropped); None when nothing is left."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None
    return Summary(len(xs), percentile(xs, 50), percentile(xs, 25), percentile(xs, 75), min(xs), max(xs))


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs`` (0.0 when fewer than two distinct x)."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values for {len(ys)} y values")
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def rates_from_token_times(start: float, token_times: Sequence[float], prompt_tokens: int) -> dict:
    """Throughput figures for one generation, from the start time and the time each new token arrived.

    Follows ONNX Runtime GenAI's benchmark: time to first token = prompt processing + first token;
    prefill tokens/s = prompt tokens ÷ time to first token; decode tokens/s and per-token latencies
    from the later tokens (the gaps between consecutive tokens).
    """
    if not token_times:
        return {"ttft": None, "prefill_tps": None, "decode_tps": None, "token_latencies": [], "new_tokens": 0}
    ttft = token_times[0] - start
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    decode_time = token_times[-1] - token_times[0]
    return {
        "ttft": ttft,
        "prefill_tps": prompt_tokens / ttft if ttft > 0 and prompt_tokens else None,
        "decode_tps": len(gaps) / decode_time if gaps and decode_time > 0 else None,
        "token_latencies": gaps,
        "new_tokens": len(token_times),
    }

"""Results of one load phase, whichever generator produced them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100); NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class LoadResult:
    generator: str
    connections: int
    requests: int
    """Responses received (any status)."""
    errors: int
    """Non-2xx responses plus failed requests (connect, read, timeout)."""
    duration_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    mean_us: float
    connections_opened: int | None = None
    first_error: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @classmethod
    def from_latencies(cls, generator: str, connections: int, latencies_us: list[float], errors: int,
                       duration_s: float, **extra: Any) -> "LoadResult":
        lat = sorted(latencies_us)
        return cls(generator=generator, connections=connections, requests=len(lat),
                   errors=errors, duration_s=duration_s, p50_us=percentile(lat, 50), p90_us=percentile(lat, 90),
                   p99_us=percentile(lat, 99), max_us=lat[-1] if lat else math.nan,
                   mean_us=sum(lat) / len(lat) if lat else math.nan, **extra)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rps"] = round(self.rps, 1)
        return {k: (round(v, 1) if isinstance(v, float) and math.isfinite(v) else
                    None if isinstance(v, float) else v) for k, v in d.items()}

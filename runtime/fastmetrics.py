"""Request counters of the fast data path: plain dicts on the hot path, Prometheus text on scrape.

``RequestStats.record`` costs two dict updates and a bisect; nothing touches prometheus-client
until ``/metrics`` is scraped. ``install`` takes ``meshc_requests`` and
``meshc_request_duration_seconds`` out of a ``Metrics`` registry and puts this collector in their
place, under the same names, labels and buckets; whatever was recorded on the original metrics
(by code that still calls ``Metrics.request``) is merged in, so the scrape shows one family each.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.metrics import Metrics

__all__ = ["BUCKETS", "RequestStats", "Series"]

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""The same buckets as ``runtime.metrics`` (the histogram must not change shape between paths)."""

_REQ_LABELS = ["direction", "source_service", "destination_service", "destination_subset", "response_code"]
_DUR_LABELS = ["direction", "source_service", "destination_service"]
_MAX_SERIES = 10_000

_SeriesKey = tuple[str, str, str, str]


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Series:
    """The counts of one (direction, source, destination, subset): by code, and a histogram."""

    __slots__ = ("codes", "hist")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.hist = [0.0] * (len(BUCKETS) + 2)
        """A count per bucket (the last one is +Inf), then the sum of seconds."""

    def add(self, code: int, seconds: float) -> None:
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        hist = self.hist
        hist[bisect_left(BUCKETS, seconds)] += 1
        hist[-1] += seconds


class RequestStats(Collector):
    """Aggregated request counts and latency histograms, rendered when collected."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.series: dict[_SeriesKey, Series] = {}
        self._metrics = metrics
        self._overflow = Series()

    def install(self) -> None:
        """Replace the two request metrics of ``self._metrics``'s registry with this collector."""
        m = self._metrics
        if m is None:
            return
        m.registry.unregister(m.requests)
        m.registry.unregister(m.duration)
        m.registry.register(self)

    def get(self, direction: str, source: str, dest: str, subset: str) -> Series:
        """The series for these labels (callers may keep it: it is the same object from then on)."""
        key = (direction, source, dest, subset)
        found = self.series.get(key)
        if found is None:
            if len(self.series) >= _MAX_SERIES:
                return self._overflow  # counted nowhere rather than without bound
            found = self.series[key] = Series()
        return found

    def record(self, direction: str, source: str, dest: str, subset: str, code: int, seconds: float) -> None:
        self.get(direction, source, dest, subset).add(code, seconds)

    # -- rendering --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        n = len(BUCKETS) + 1
        bounds = [*BUCKETS, float("inf")]
        counts: dict[tuple[str, ...], float] = {}
        hists: dict[tuple[str, ...], list[float]] = {}
        for (d, src, t, sub), series in list(self.series.items()):
            for code, cnt in list(series.codes.items()):
                counts[(d, src, t, sub, str(code))] = float(cnt)
            h = hists.get((d, src, t))
            if h is None:
                hists[(d, src, t)] = list(series.hist)
            else:
                for i, v in enumerate(series.hist):
                    h[i] += v
        m = self._metrics
        if m is not None:
            for fam in m.requests.collect():
                for s in fam.samples:
                    if s.name.endswith("_total"):
                        key = tuple(s.labels[x] for x in _REQ_LABELS)
                        counts[key] = counts.get(key, 0.0) + s.value
            cumulative: dict[tuple[str, ...], list[float]] = {}
            sums: dict[tuple[str, ...], float] = {}
            for fam in m.duration.collect():
                for s in fam.samples:
                    key = tuple(s.labels[x] for x in _DUR_LABELS)
                    if s.name.endswith("_bucket"):
                        cumulative.setdefault(key, [0.0] * n)[bounds.index(float(s.labels["le"]))] = s.value
                    elif s.name.endswith("_sum"):
                        sums[key] = s.value
            for key, cum in cumulative.items():
                h = hists.setdefault(key, [0.0] * (n + 1))
                prev = 0.0
                for i in range(n):
                    h[i] += cum[i] - prev
                    prev = cum[i]
                h[n] += sums.get(key, 0.0)
        requests = CounterMetricFamily(
            "meshc_requests",
            "Requests answered, by source and destination service, subset and response code.",
            labels=_REQ_LABELS,
        )
        for key, v in sorted(counts.items()):
            requests.add_metric(list(key), v)
        yield requests
        duration = HistogramMetricFamily(
            "meshc_request_duration_seconds",
            "Time from request received to response complete.",
            labels=_DUR_LABELS,
        )
        for key, h in sorted(hists.items()):
            running = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, c in zip(bounds, h[:n], strict=True):
                running += c
                buckets.append((_le(bound), running))
            duration.add_metric(list(key), buckets, h[n])
        yield duration

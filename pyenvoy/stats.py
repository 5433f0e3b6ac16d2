"""Stats with Envoy's names: counters, gauges and histograms bound at config time.

Strategy: a stat is a slotted object holding a plain int (or histogram buckets); the hot
path only does ``stats.upstream_rq_total.value += 1`` (or ``.inc()``) on a member resolved
when the config was built. The ``Store`` keeps every stat by its full Envoy name
(``cluster.backend.upstream_rq_total``) so admin can render ``/stats``, JSON and Prometheus
at scrape time; nothing is formatted per request.

Groups of stats are declared once as data, the way Envoy's ``ALL_*_STATS`` macros do::

    class ClusterStats(StatsStruct):
        COUNTERS = ("upstream_rq_total", ...)
        GAUGES = ("upstream_cx_active", ...)
        HISTOGRAMS = ("upstream_rq_time",)
"""

from __future__ import annotations

import bisect
from collections import Counter as _Tally
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

# Envoy's default histogram bucket bounds (Stats::HistogramSettingsImpl::defaultBuckets()).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)

# A histogram sorts its pending values into buckets once this many are waiting (small enough
# that a flush, done on the request path, never stalls it noticeably), or when it is read.
_FLUSH_AT = 256


class Counter:
    __slots__ = ("name", "value", "used")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0
        # Envoy only lists a stat in /stats?usedonly once it was touched; value>0 implies used.
        self.used = False

    def inc(self) -> None:
        self.value += 1

    def add(self, n: int) -> None:
        self.value += n

    def __repr__(self) -> str:
        return f"Counter({self.name}={self.value})"


class Gauge:
    __slots__ = ("name", "value", "used")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0
        self.used = False

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1

    def add(self, n: int) -> None:
        self.value += n

    def sub(self, n: int) -> None:
        self.value -= n

    def set(self, v: int) -> None:
        self.value = v

    def __repr__(self) -> str:
        return f"Gauge({self.name}={self.value})"


class TextReadout:
    """A text stat (Envoy's text readouts, e.g. ``cluster_manager.cds.version_text``)."""

    __slots__ = ("name", "value", "used")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = ""
        self.used = False

    def set(self, value: str) -> None:
        self.value = value
        self.used = True

    def __repr__(self) -> str:
        return f"TextReadout({self.name}={self.value!r})"


class Histogram:
    """Cumulative histogram over Envoy's default buckets (values in the stat's unit).

    ``record`` only appends to a pending list (the hot path); values are sorted into
    buckets when the histogram is read (``counts``, ``sum``, ``count``) or when the pending
    list grows past a bound, so recording costs one list append."""

    __slots__ = ("name", "unit", "bounds", "_counts", "_sum", "_count", "_used", "_pending", "record")

    def __init__(self, name: str, unit: str = "ms", bounds: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.name = name
        self.unit = unit
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # last slot: above the largest bound
        self._sum = 0.0
        self._count = 0
        self._used = False
        self._pending: list[float] = []
        self.record = self._record  # bound once: ``h.record(v)`` is one call

    def _record(self, value: float) -> None:
        p = self._pending
        p.append(value)
        if len(p) >= _FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        p = self._pending
        if not p:
            return
        self._pending = []
        counts = self._counts
        for i, c in _Tally(map(partial(bisect.bisect_left, self.bounds), p)).items():
            counts[i] += c
        self._sum += sum(p)
        self._count += len(p)
        self._used = True

    @property
    def used(self) -> bool:
        self._flush()
        return self._used

    @used.setter
    def used(self, value: bool) -> None:
        self._flush()
        self._used = value

    @property
    def counts(self) -> list[int]:
        self._flush()
        return self._counts

    @property
    def sum(self) -> float:
        self._flush()
        return self._sum

    @property
    def count(self) -> int:
        self._flush()
        return self._count

    def cumulative(self) -> list[int]:
        """Cumulative counts per bound (Prometheus ``le`` buckets, without +Inf)."""
        out = []
        running = 0
        for c in self.counts[:-1]:
            running += c
            out.append(running)
        return out

    def quantile(self, q: float) -> float | None:
        """Approximate quantile by linear interpolation inside the bucket that holds it."""
        if self.count == 0:
            return None
        target = q * self._count
        running = 0
        lower = 0.0
        for i, c in enumerate(self._counts):
            upper = self.bounds[i] if i < len(self.bounds) else self.bounds[-1] * 2
            if c and running + c >= target:
                frac = (target - running) / c
                return lower + (upper - lower) * frac
            running += c
            lower = upper
        return lower

    def reset(self) -> None:
        self._pending = []
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._count = 0


class StatGroups:
    """Stats that one event updates together, chosen by a key (a response's code): each of
    the key's counters gets one more and each of its histograms the event's value. A key's
    group is built on first use by ``build(key) -> (counters, histograms)``. ``record`` is
    one call per event, whatever the number of stats."""

    __slots__ = ("groups", "build")

    def __init__(
        self, build: Callable[[Any], tuple[tuple[Counter, ...], tuple[Histogram, ...]]]
    ) -> None:
        self.groups: dict[Any, tuple[tuple[Counter, ...], tuple[Histogram, ...]]] = {}
        self.build = build

    def record(self, key: Any, value: float) -> None:
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = self.build(key)
        counters, histograms = group
        for c in counters:
            c.value += 1
        for h in histograms:
            # Histogram._record, inlined: the same pending list and flush points.
            p = h._pending
            p.append(value)
            if len(p) >= _FLUSH_AT:
                h._flush()

    def count(self, key: Any) -> None:
        """The key's counters only (an event without a value for the histograms)."""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = self.build(key)
        for c in group[0]:
            c.value += 1


class Scope:
    """A name prefix over a Store: ``scope.counter("x")`` is ``<prefix>.x``."""

    __slots__ = ("store", "prefix")

    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix

    def _full(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def counter(self, name: str) -> Counter:
        return self.store.counter_from_name(self._full(name))

    def gauge(self, name: str) -> Gauge:
        return self.store.gauge_from_name(self._full(name))

    def histogram(self, name: str, unit: str = "ms") -> Histogram:
        return self.store.histogram_from_name(self._full(name), unit)

    def scope(self, name: str) -> Scope:
        return Scope(self.store, self._full(name))


class Store(Scope):
    """All stats of one server, by full name."""

    __slots__ = ("counters", "gauges", "histograms", "text_readouts")

    def __init__(self) -> None:
        super().__init__(self, "")
        self.counters: dict[str, Counter] = {}
        self.gauges: dict[str, Gauge] = {}
        self.histograms: dict[str, Histogram] = {}
        self.text_readouts: dict[str, TextReadout] = {}

    def text_readout(self, name: str) -> TextReadout:
        t = self.text_readouts.get(name)
        if t is None:
            t = self.text_readouts[name] = TextReadout(name)
        return t

    def counter_from_name(self, name: str) -> Counter:
        c = self.counters.get(name)
        if c is None:
            c = self.counters[name] = Counter(name)
        return c

    def gauge_from_name(self, name: str) -> Gauge:
        g = self.gauges.get(name)
        if g is None:
            g = self.gauges[name] = Gauge(name)
        return g

    def histogram_from_name(self, name: str, unit: str = "ms") -> Histogram:
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = Histogram(name, unit)
        return h

    def reset_counters(self) -> None:
        for c in self.counters.values():
            c.value = 0


class StatsStruct:
    """Declare a group of stats as data; instances bind each name to a live stat."""

    COUNTERS: ClassVar[tuple[str, ...]] = ()
    GAUGES: ClassVar[tuple[str, ...]] = ()
    HISTOGRAMS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        for name in self.COUNTERS:
            setattr(self, name, scope.counter(name))
        for name in self.GAUGES:
            setattr(self, name, scope.gauge(name))
        for name in self.HISTOGRAMS:
            setattr(self, name, scope.histogram(name))

    if TYPE_CHECKING:
        # Members are bound from the declared names at run time.
        def __getattr__(self, name: str) -> Any: ...

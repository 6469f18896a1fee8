"""Choosing a chain's limits from an accuracy target, with a one-sided 90% bound (pure Python, no numpy).

For the decider's pure core (streams/domain/targets.py, on a `RequestInference` that carries a `target`), on
the frontier record the training job reported with the chain's top result (tiers/frontier.py writes it; the
catalogue checks it when the result is reported). Two entry points:
`parse_frontier(obj)` checks a stored record and rejects a malformed one naming the field, and
`choose_limits(record, target, entry=..., costs_s=...)` returns the limits to serve with what they are
predicted to do, or raises `TargetUnreachable` / `SplitTooSmall` (both `ExitsError`: a `PermanentError` and
a `ValueError` with the culprit in `field`, which the decider turns into a rejection and the API into a 422).

**The record (version 1; JSON).**
```
{"version": 1, "eps": 1e-12,              # probabilities are clipped to [eps, 1] before the log
 "temperatures": [T_0, .., T_{K-1}],      # per tier of the chain, lowest first
 "costs_s": [c_0, .., c_{K-1}],           # measured compute per sample, seconds
 "entries": [                             # one frontier per entry tier e (the chain e..K-1, k_e = K - e tiers)
   {"entry": e, "levels": [L, ..],        # candidate limits searched per non-top tier (k_e - 1)
    "limits": [[l_e, .., l_{K-2}], ..],   # per point; a limit > 1 answers nothing
    "validation": {"n": N, "top_correct": t,         # samples; of them, right at the top exit alone
                   "answered": [[a_e, .., a_top], ..],  # per point, per tier: answered (sums to N)
                   "correct": [[..], ..],             # ... and right
                   "agreeing": [[..], ..],            # per non-top tier: answers with the top exit's class
                   "b": [..], "c": [..]},             # top right & cascade wrong; top wrong & cascade right
    "test": {same as validation} | null}, ..]}
```
A point's cascade accuracy is sum(correct) / N = (t - b + c) / N; its accuracy drop against the top exit
alone is (b - c) / N; its expected compute per input is sum_k c_k * reach_k / N, reach_k = N minus what the
tiers below k answered, recomputed here so that the costs can be overridden (the trainer's CPU is not the
device's). The record is checked for these identities, so a tampered or truncated one is refused.

**Targets and bounds** (one-sided, `CONFIDENCE` = 90%, over the N validation samples; exact binomial
bounds, Clopper-Pearson, so they hold for any N and for zero counts where a normal approximation claims
certainty):
- `{"max_accuracy_drop": d}`: the cheapest point whose upper bound on the drop is <= d. The drop is
  p_b - p_c, where p_b (p_c) is the probability that the top exit is right and the cascade wrong (the
  reverse); b ~ Binomial(N, p_b) and c ~ Binomial(N, p_c), so U(b, 95%) - L(c, 95%) bounds it with
  probability >= 90% (Bonferroni). This is conservative, but simple and valid without any approximation,
  and it needs no assumption about how b and c are coupled. A point whose limits are all above 1 never
  answers early: its drop is exactly 0.
- `{"min_accuracy": a}`: the cheapest point whose lower bound on the cascade accuracy is >= a.
- `{"max_top_share": s}`: of the points whose upper bound on the share reaching the top is <= s, the most
  accurate (then the cheapest): the cheapest would answer everything at the entry, which meets any share.
Only points that can answer early are candidates: a chain served wholly by its top tier is asked for with a
typed limit above 1, not with a target (an entry at the top has one point, no limits, and is its own
candidate). The chosen point's per-tier agreement with the top exit comes with its 90% lower bound, which
the drift signal compares live agreement against.

**When no point meets the target**: `SplitTooSmall` when some point meets it on its validation estimate but
none with 90% confidence (more validation samples could certify it: the bound is too wide, not the model too
weak); `TargetUnreachable` when not even the estimates meet it. Both name the best reachable value (the
tightest bound any point reaches: the strictest target that would be accepted).

**Watching it hold live (`live_agreement`).** A non-top tier sends a share of the inputs it answered up the
chain as shadow samples; the top exit's class for each is its outcome (streams/wire.py). From a tier's `n`
outcomes, `k` of them agreeing: the live agreement k / n and its one-sided 90% Clopper-Pearson bounds. The
tier is flagged as **drifting** when `n >= DRIFT_MIN_OUTCOMES` and the live agreement's 90% UPPER bound is
below the predicted agreement's 90% lower bound (`tiers[].predicted.agreement_lower`): the live data are
then unlikely (< 10%) to come from a tier that still agrees as predicted. A few unlucky outcomes cannot raise
it (the upper bound of a handful of samples is wide), nor can a live agreement slightly below the estimate,
and a tier without a prediction (typed limits) is never flagged. Called by the top tier (its Prometheus
gauges) and by the API's `/inferences/{id}/stats` (over the shadow topic's latest outcomes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from tierflow.streams.errors import PermanentError

#: The one-sided confidence of every bound.
CONFIDENCE = 0.90
#: The record version this module reads.
RECORD_VERSION = 1
#: Probabilities are clipped to [eps, 1] before the log of a calibrated confidence (tiers/calibration.py `EPS`);
#: a tier comparing the raw max(p) is told this one.
DEFAULT_EPS = 1e-12
#: Points per entry a record may hold (the writer stores a few thousand at most).
MAX_POINTS = 100_000
#: Fewest shadow outcomes of a tier before its drift flag may be raised (`live_agreement`).
DRIFT_MIN_OUTCOMES = 30

TargetKind = Literal["max_accuracy_drop", "min_accuracy", "max_top_share"]
TARGET_KINDS: tuple[TargetKind, ...] = ("max_accuracy_drop", "min_accuracy", "max_top_share")


class ExitsError(PermanentError, ValueError):
    """A frontier record, a target or a cost override that cannot be used; `field` names the culprit."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class FrontierInvalid(ExitsError):
    """The stored frontier record is malformed (or of a version this decider does not read)."""


class TargetInvalid(ExitsError):
    """The target or cost override itself is malformed."""


class TargetUnreachable(ExitsError):
    """No point meets the target, not even on its validation estimate; `best` is the best reachable value."""

    def __init__(self, message: str, target: Target, best: float) -> None:
        super().__init__(message, "target")
        self.target = target
        self.best = best


class SplitTooSmall(ExitsError):
    """Some point meets the target on its estimate, none with the bounds' confidence over `n` validation samples."""

    def __init__(self, message: str, target: Target, best: float, n: int) -> None:
        super().__init__(message, "target")
        self.target = target
        self.best = best
        self.n = n


# -- exact binomial bounds --------------------------------------------------------------------------------------


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """1 / (1 + d1 / (1 + d2 / (1 + ...))), the continued fraction of I_x(a, b) (DLMF 8.17.22), by the
    modified Lentz method; it converges fast for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    f, c, dd = tiny, tiny, 0.0
    for j in range(1, 20_000):
        if j == 1:
            num = 1.0
        elif j % 2 == 0:  # d_{2m+1}, m = (j - 2) / 2
            m = (j - 2) // 2
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # d_{2m}, m = (j - 1) / 2
            m = (j - 1) // 2
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        dd = 1.0 + num * dd
        dd = 1.0 / (dd if abs(dd) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * dd
        if abs(c * dd - 1.0) < 1e-15:
            return f
    raise ArithmeticError(f"the incomplete beta fraction did not converge for a={a}, b={b}, x={x}")


def _beta_inc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_quantile(a: float, b: float, q: float) -> float:
    """The x with I_x(a, b) = q: Newton's method kept inside a shrinking bracket (bisection when a step
    would leave it)."""
    lo, hi = 0.0, 1.0
    x = a / (a + b)
    log_b = _log_beta(a, b)
    for _ in range(300):
        f = _beta_inc(a, b, x) - q
        if f == 0.0:
            return x
        if f < 0:
            lo = x
        else:
            hi = x
        density = math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_b)
        nxt = x - f / density if density > 0 else math.nan
        if not lo < nxt < hi:
            nxt = (lo + hi) / 2
        if abs(nxt - x) <= 1e-15 + 1e-13 * x or hi - lo <= 1e-16:
            return nxt
        x = nxt
    return x


@lru_cache(maxsize=65_536)
def binomial_upper(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson one-sided upper bound on p, from k successes in n trials: P(p <= bound) >= 1 - alpha."""
    if not 0 <= k <= n or n == 0:
        return 1.0
    if k == n:
        return 1.0
    if k == 0:
        return -math.expm1(math.log(alpha) / n)  # 1 - alpha^(1/n), exactly
    return _beta_quantile(k + 1.0, float(n - k), 1.0 - alpha)


@lru_cache(maxsize=65_536)
def binomial_lower(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson one-sided lower bound on p, from k successes in n trials."""
    if not 0 < k <= n:
        return 0.0
    if k == n:
        return math.exp(math.log(alpha) / n)  # alpha^(1/n), exactly
    return _beta_quantile(float(k), n - k + 1.0, alpha)


# -- the record -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitCounts:
    """The counts of an entry's points on one split (see the module docstring)."""

    n: int
    top_correct: int
    answered: tuple[tuple[int, ...], ...]
    correct: tuple[tuple[int, ...], ...]
    agreeing: tuple[tuple[int, ...], ...]
    b: tuple[int, ...]
    c: tuple[int, ...]


@dataclass(frozen=True)
class EntryFrontier:
    """The frontier of the chain entered at tier `entry` (`tiers` tiers from there to the top)."""

    entry: int
    tiers: int
    levels: tuple[int, ...]
    limits: tuple[tuple[float, ...], ...]
    validation: SplitCounts
    test: SplitCounts | None


@dataclass(frozen=True)
class FrontierRecord:
    version: int
    eps: float
    temperatures: tuple[float, ...]
    costs_s: tuple[float, ...]
    entries: tuple[EntryFrontier, ...]

    def entry(self, e: int) -> EntryFrontier:
        for f in self.entries:
            if f.entry == e:
                return f
        raise TargetInvalid(f"the chain has no frontier for an entry at tier {e} "
                            f"(it has: {[f.entry for f in self.entries]})", "entry")


def _fail(path: str, message: str) -> FrontierInvalid:
    return FrontierInvalid(f"frontier record: {path}: {message}", path)


def _int(value: Any, path: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"must be an integer, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise _fail(path, f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
    return value


def _num(value: Any, path: str, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(path, f"must be a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise _fail(path, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return float(value)


def _list(value: Any, path: str, length: int | None = None, max_length: int = MAX_POINTS) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(path, f"must be a list, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise _fail(path, f"must have {length} items, got {len(value)}")
    if len(value) > max_length:
        raise _fail(path, f"has {len(value)} items, more than {max_length}")
    return value


def _rows(value: Any, path: str, n_rows: int, width: int, n: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(_int(x, f"{path}[{i}][{k}]", 0, n) for k, x in enumerate(_list(row, f"{path}[{i}]", width)))
                 for i, row in enumerate(_list(value, path, n_rows)))


def _split(obj: Any, path: str, n_points: int, tiers: int) -> SplitCounts:
    if not isinstance(obj, dict):
        raise _fail(path, "must be an object")
    n = _int(obj.get("n"), f"{path}.n", 1)
    top_correct = _int(obj.get("top_correct"), f"{path}.top_correct", 0, n)
    answered = _rows(obj.get("answered"), f"{path}.answered", n_points, tiers, n)
    correct = _rows(obj.get("correct"), f"{path}.correct", n_points, tiers, n)
    agreeing = _rows(obj.get("agreeing"), f"{path}.agreeing", n_points, tiers - 1, n)
    b = tuple(_int(x, f"{path}.b[{i}]", 0, n) for i, x in enumerate(_list(obj.get("b"), f"{path}.b", n_points)))
    c = tuple(_int(x, f"{path}.c[{i}]", 0, n) for i, x in enumerate(_list(obj.get("c"), f"{path}.c", n_points)))
    for i in range(n_points):
        at = f"{path} point {i}"
        if sum(answered[i]) != n:
            raise _fail(at, f"the tiers answer {sum(answered[i])} samples, not n = {n}")
        if any(r > a for r, a in zip(correct[i], answered[i], strict=True)):
            raise _fail(at, "a tier is right more often than it answers")
        if any(g > a for g, a in zip(agreeing[i], answered[i], strict=False)):
            raise _fail(at, "a tier agrees with the top exit more often than it answers")
        if b[i] > top_correct or c[i] > n - top_correct:
            raise _fail(at, "b counts samples the top exit gets right and c ones it gets wrong: more than there are")
        if sum(correct[i]) != top_correct - b[i] + c[i]:
            raise _fail(at, f"correct answers {sum(correct[i])} != top_correct - b + c = "
                            f"{top_correct - b[i] + c[i]}")
        if b[i] + c[i] > n - answered[i][-1]:
            raise _fail(at, "more disagreements with the top exit than answers below it")
    return SplitCounts(n, top_correct, answered, correct, agreeing, b, c)


def parse_frontier(obj: Any) -> FrontierRecord:
    """Check a stored frontier record (see the module docstring) and return it typed; `FrontierInvalid`
    names the first field that is wrong."""
    if not isinstance(obj, dict):
        raise _fail("record", "must be a JSON object")
    version = obj.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > RECORD_VERSION:
        raise _fail("version", f"{version} is newer than this decider reads ({RECORD_VERSION}): upgrade it")
    if version != RECORD_VERSION or isinstance(version, bool):
        raise _fail("version", f"must be {RECORD_VERSION}, got {version!r}")
    eps = _num(obj.get("eps"), "eps", 0.0, 0.5, lo_open=True)
    temperatures = tuple(_num(t, f"temperatures[{k}]", 0.0, 1e6, lo_open=True)
                         for k, t in enumerate(_list(obj.get("temperatures"), "temperatures", max_length=64)))
    k_tiers = len(temperatures)
    if k_tiers == 0:
        raise _fail("temperatures", "a chain has at least one tier")
    costs = tuple(_num(cost, f"costs_s[{k}]", 0.0, 1e6)
                  for k, cost in enumerate(_list(obj.get("costs_s"), "costs_s", k_tiers)))
    entries: list[EntryFrontier] = []
    for i, raw in enumerate(_list(obj.get("entries"), "entries", max_length=k_tiers)):
        path = f"entries[{i}]"
        if not isinstance(raw, dict):
            raise _fail(path, "must be an object")
        e = _int(raw.get("entry"), f"{path}.entry", 0, k_tiers - 1)
        if any(f.entry == e for f in entries):
            raise _fail(f"{path}.entry", f"entry {e} appears twice")
        tiers = k_tiers - e
        levels = tuple(_int(x, f"{path}.levels[{k}]", 2)
                       for k, x in enumerate(_list(raw.get("levels"), f"{path}.levels", tiers - 1)))
        limits = tuple(tuple(_num(x, f"{path}.limits[{p}][{k}]", 0.0, 2.0)
                             for k, x in enumerate(_list(row, f"{path}.limits[{p}]", tiers - 1)))
                       for p, row in enumerate(_list(raw.get("limits"), f"{path}.limits")))
        if not limits:
            raise _fail(f"{path}.limits", "a frontier has at least one point")
        validation = _split(raw.get("validation"), f"{path}.validation", len(limits), tiers)
        test = None if raw.get("test") is None else _split(raw.get("test"), f"{path}.test", len(limits), tiers)
        entries.append(EntryFrontier(e, tiers, levels, limits, validation, test))
    if not entries:
        raise _fail("entries", "a record has at least one entry")
    return FrontierRecord(RECORD_VERSION, eps, temperatures, costs, tuple(entries))


# -- targets and cost overrides ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    kind: TargetKind
    value: float

    def to_json(self) -> dict[str, float]:
        return {self.kind: self.value}


def parse_target(obj: Any) -> Target:
    """`{"max_accuracy_drop": d}` (0 <= d < 1), `{"min_accuracy": a}` (0 < a <= 1) or `{"max_top_share": s}`
    (0 <= s <= 1): exactly one of them."""
    if not isinstance(obj, dict) or len(obj) != 1 or next(iter(obj)) not in TARGET_KINDS:
        raise TargetInvalid(f"'target' must be an object with exactly one of {', '.join(TARGET_KINDS)}, got "
                            f"{obj!r}", "target")
    kind: TargetKind = next(iter(obj))
    value = obj[kind]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TargetInvalid(f"'target.{kind}' must be a number, got {value!r}", f"target.{kind}")
    ok = {"max_accuracy_drop": 0 <= value < 1, "min_accuracy": 0 < value <= 1, "max_top_share": 0 <= value <= 1}
    if not ok[kind]:
        ranges = {"max_accuracy_drop": "[0, 1)", "min_accuracy": "(0, 1]", "max_top_share": "[0, 1]"}
        raise TargetInvalid(f"'target.{kind}' must be in {ranges[kind]}, got {value}", f"target.{kind}")
    return Target(kind, float(value))


def parse_costs(obj: Any, tiers: int) -> list[float | None]:
    """A per-tier cost override: a list with one item per tier of the whole chain, seconds per sample or
    null (keep the measured cost)."""
    if not isinstance(obj, list) or len(obj) != tiers:
        raise TargetInvalid(f"'costs_s' must be a list of {tiers} numbers or nulls (one per tier), got {obj!r}",
                            "costs_s")
    out: list[float | None] = []
    for k, v in enumerate(obj):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                              or v < 0):
            raise TargetInvalid(f"'costs_s[{k}]' must be a non-negative number of seconds or null, got {v!r}",
                                f"costs_s[{k}]")
        out.append(None if v is None else float(v))
    return out


# -- choosing ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitChoice:
    """The chosen point of an entry's frontier and what it is predicted to do (validation split)."""

    entry: int
    target: Target
    point: int  # index in the entry's frontier
    limits: list[float]  # per non-top tier from the entry up; a limit > 1 answers nothing
    shares: list[float]  # per tier: share of inputs it answers
    accuracy: float  # cascade accuracy
    accuracy_lower: float
    top_accuracy: float  # the top exit alone
    accuracy_drop: float
    accuracy_drop_upper: float
    top_share_upper: float
    agreement: float  # share of all inputs answered with the top exit's class
    agreement_lower: float
    tier_agreement: list[float | None]  # per non-top tier: of its answers, those with the top's class
    tier_agreement_lower: list[float | None]  # ... their lower bounds (the drift signal's floor)
    cost_s: float  # expected compute per input with `costs_s`
    costs_s: list[float]  # per tier of this entry's chain, overrides applied
    n: int  # validation samples
    confidence: float

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "target"}
        out["target"] = self.target.to_json()
        return out


def _drop_upper(f: EntryFrontier, p: int, alpha: float) -> float:
    if all(x > 1.0 for x in f.limits[p]):  # never answers early: the cascade is the top exit
        return 0.0
    v = f.validation
    return binomial_upper(v.b[p], v.n, alpha / 2) - binomial_lower(v.c[p], v.n, alpha / 2)


def _accuracy_lower(f: EntryFrontier, p: int, alpha: float) -> float:
    return binomial_lower(sum(f.validation.correct[p]), f.validation.n, alpha)


def _top_share_upper(f: EntryFrontier, p: int, alpha: float) -> float:
    if all(x > 1.0 for x in f.limits[p]):
        return 1.0
    if any(x <= 0.0 for x in f.limits[p]):  # a limit of 0 answers every input that reaches its tier
        return 0.0
    return binomial_upper(f.validation.answered[p][-1], f.validation.n, alpha)


_BOUND = {"max_accuracy_drop": _drop_upper, "min_accuracy": _accuracy_lower, "max_top_share": _top_share_upper}
_WHAT = {"max_accuracy_drop": "an accuracy drop against the top exit of at most",
         "min_accuracy": "a cascade accuracy of at least",
         "max_top_share": "a share of inputs reaching the top tier of at most"}


def _estimate(kind: TargetKind, v: SplitCounts, p: int) -> float:
    if kind == "max_accuracy_drop":
        return (v.b[p] - v.c[p]) / v.n
    if kind == "min_accuracy":
        return sum(v.correct[p]) / v.n
    return v.answered[p][-1] / v.n


def _cost_overrides(costs_s: Sequence[float | None] | Mapping[int, float] | None, k_total: int) -> dict[int, float]:
    if costs_s is None:
        return {}
    if isinstance(costs_s, Mapping):
        overrides: dict[int, float] = {}
        for key, value in costs_s.items():
            k = key if isinstance(key, int) else int(key) if isinstance(key, str) and key.isdigit() else -1
            if not 0 <= k < k_total or isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value < 0:
                raise TargetInvalid(f"cost overrides must map tiers 0..{k_total - 1} to non-negative seconds, got "
                                    f"{key!r}: {value!r}", "costs_s")
            overrides[k] = float(value)
        return overrides
    return {k: v for k, v in enumerate(parse_costs(list(costs_s), k_total)) if v is not None}


def choose_limits(record: FrontierRecord, target: Target, *, entry: int = 0,
                  costs_s: Sequence[float | None] | Mapping[int, float] | None = None,
                  confidence: float = CONFIDENCE) -> ExitChoice:
    """The point of the entry's frontier that meets `target` with one-sided `confidence` (see the module
    docstring for the rule per target kind). `costs_s` overrides the measured per-tier costs: a list with
    one item per tier of the whole chain (None keeps the measured one) or a mapping tier -> seconds.

    Bounds are computed lazily, best-preferred point first, and stop at the first point that meets the
    target (each bound inverts an incomplete beta function: ~0.2 ms in pure Python, cached by count); only a
    refusal bounds every point, to name the best reachable value."""
    if not 0.5 <= confidence < 1:
        raise TargetInvalid(f"confidence must be in [0.5, 1), got {confidence}", "confidence")
    f = record.entry(entry)
    overrides = _cost_overrides(costs_s, len(record.costs_s))
    costs = [overrides.get(k, record.costs_s[k]) for k in range(f.entry, len(record.costs_s))]
    alpha = 1.0 - confidence
    v = f.validation
    kind, t = target.kind, target.value
    bound = _BOUND[kind]

    def cost_of(p: int) -> float:
        reach, total = v.n, 0.0
        for k, cost in enumerate(costs):
            total += cost * reach
            reach -= v.answered[p][k]
        return total / v.n

    def meets(value: float) -> bool:
        return value >= t if kind == "min_accuracy" else value <= t

    candidates = [p for p in range(len(f.limits)) if f.tiers == 1 or any(x <= 1.0 for x in f.limits[p])]
    if not candidates:
        raise TargetUnreachable("the frontier has no point that answers early: serve this chain with typed "
                                "limits", target, math.nan)
    if kind == "max_top_share":  # the most accurate point within the share, then the cheapest
        candidates.sort(key=lambda p: (-sum(v.correct[p]), cost_of(p)))
    else:  # the cheapest point that meets the target, then the most accurate
        candidates.sort(key=lambda p: (cost_of(p), -sum(v.correct[p])))
    # A bound is never better than its estimate, so a point whose estimate misses is skipped unbounded.
    chosen = next((p for p in candidates if meets(_estimate(kind, v, p)) and meets(bound(f, p, alpha))), None)
    if chosen is None:
        # The best bound, by branch and bound: visit points best estimate first and stop once an estimate is
        # no better than the best bound so far (no bound beats its estimate).
        sign = -1.0 if kind == "min_accuracy" else 1.0  # sign * value: lower is better
        by_estimate = sorted(candidates, key=lambda p: sign * _estimate(kind, v, p))
        best_estimate = _estimate(kind, v, by_estimate[0])
        best_bound = math.inf * sign
        for p in by_estimate:
            if sign * _estimate(kind, v, p) >= sign * best_bound:
                break
            best_bound = min(best_bound, bound(f, p, alpha), key=lambda x: sign * x)
        if meets(best_estimate):
            raise SplitTooSmall(
                f"the validation split ({v.n} samples) is too small to certify {_WHAT[kind]} {t:g} with "
                f"{confidence:.0%} confidence: some limits meet it on the validation estimate "
                f"({best_estimate:.4g}), but the best {confidence:.0%} bound any limits reach is {best_bound:.4g}; "
                f"ask for that, or validate on more samples", target, best_bound, v.n)
        raise TargetUnreachable(
            f"no limits reach {_WHAT[kind]} {t:g}: the best any limits reach is {best_bound:.4g} at "
            f"{confidence:.0%} confidence ({best_estimate:.4g} on the validation estimate)", target, best_bound)
    answered, agreeing = v.answered[chosen], v.agreeing[chosen]
    agree_total = sum(agreeing) + answered[-1]
    return ExitChoice(
        entry=f.entry, target=target, point=chosen, limits=list(f.limits[chosen]),
        shares=[a / v.n for a in answered], accuracy=sum(v.correct[chosen]) / v.n,
        accuracy_lower=_accuracy_lower(f, chosen, alpha), top_accuracy=v.top_correct / v.n,
        accuracy_drop=(v.b[chosen] - v.c[chosen]) / v.n, accuracy_drop_upper=_drop_upper(f, chosen, alpha),
        top_share_upper=_top_share_upper(f, chosen, alpha), agreement=agree_total / v.n,
        agreement_lower=binomial_lower(agree_total, v.n, alpha),
        tier_agreement=[g / a if a else None for g, a in zip(agreeing, answered, strict=False)],
        tier_agreement_lower=[binomial_lower(g, a, alpha) if a else None
                              for g, a in zip(agreeing, answered, strict=False)],
        cost_s=cost_of(chosen), costs_s=costs, n=v.n, confidence=confidence)


# -- live agreement and drift -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveAgreement:
    """A tier's early answers against the top exit, live (see "Watching it hold live" above)."""

    n: int  # shadow outcomes
    agreeing: int  # ... with the top exit's class
    agreement: float | None  # agreeing / n (None without outcomes)
    agreement_lower: float | None  # its one-sided bounds at `CONFIDENCE`
    agreement_upper: float | None
    predicted_lower: float | None  # the predicted agreement's lower bound it is compared with
    drift: bool

    def to_json(self) -> dict[str, Any]:
        """The `live` entry of a tier in `/inferences/{id}/stats`."""
        return {"agreement": self.agreement, "n": self.n, "agreement_lower": self.agreement_lower,
                "drift": self.drift}


def live_agreement(agreeing: int, n: int, predicted_lower: float | None) -> LiveAgreement:
    """A tier's live agreement from `n` shadow outcomes (`agreeing` with the top exit), and whether it drifts
    below `predicted_lower` (the recorded prediction's lower bound; None: no prediction, never drifting)."""
    if not 0 <= agreeing <= n:
        raise ValueError(f"{agreeing} agreeing outcomes out of {n}")
    if n == 0:
        return LiveAgreement(0, 0, None, None, None, predicted_lower, False)
    alpha = 1.0 - CONFIDENCE
    upper = binomial_upper(agreeing, n, alpha)
    drift = predicted_lower is not None and n >= DRIFT_MIN_OUTCOMES and upper < predicted_lower
    return LiveAgreement(n, agreeing, agreeing / n, binomial_lower(agreeing, n, alpha), upper, predicted_lower,
                         drift)

"""Temperature scaling of each exit's confidence, and the calibration error it removes (numpy only).

Called by the training job when a chain has finished training (fit on the validation split, measure on the
test split) and by the tier agent, which must compute a sample's calibrated confidence exactly as it was
computed here when its limit was chosen (`calibrated_confidence`).

The sub-models end in a softmax, so an exit gives probabilities `p`, not logits. Their logits are recovered up
to a per-sample constant as `log(clip(p, EPS, 1))` (softmax is shift-invariant, so the constant does not
matter); the calibrated probabilities are `softmax(log p / T)` and the calibrated confidence is their maximum
(Guo et al. 2017, "On calibration of modern neural networks"). `T > 1` softens an over-confident exit,
`T < 1` sharpens an under-confident one; `T = 1` leaves `p` as it is up to the clipping, which is how a
result trained before calibration existed behaves.

T minimises the mean negative log-likelihood of the labels. As a function of `beta = 1/T` that is
`mean(logsumexp(beta * l_i) - beta * l_i[y_i])`: a log-sum-exp of linear functions of beta minus a linear one,
so it is convex in beta, its derivative `mean(E_q[l] - l[y])` is non-decreasing and its second derivative is
`mean(Var_q[l]) >= 0` (q = the calibrated distribution). `fit_temperature` brackets the root of the
derivative on `T in [T_MIN, T_MAX]` and runs Newton's method, falling back to geometric bisection (bisection
in log T) whenever a Newton step leaves the bracket, so it converges for any input without scipy.

The expected calibration error uses `n_bins` equal-width confidence bins over [0, 1] (15 by default, as in
Guo et al.): bin m holds confidences in ((m-1)/M, m/M] (a confidence of exactly 0 goes to the first bin), and
ECE = sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Probs = npt.NDArray[np.floating[Any]]
Labels = npt.NDArray[np.integer[Any]]
Floats = npt.NDArray[np.float64]

#: Probabilities are clipped to [EPS, 1] before the log: a softmax can round a class to exactly 0.
EPS = 1e-12
#: The temperatures `fit_temperature` searches; an optimum outside is returned as the nearer end.
T_MIN = 0.01
T_MAX = 100.0
#: Bins of the expected calibration error (Guo et al. 2017 use 15).
N_BINS = 15


@dataclass(frozen=True)
class ExitCalibration:
    """What the training job records for one exit: its temperature, and how well calibrated it is on the
    split the numbers were measured on (the test split: not the one T was fitted on)."""

    exit: int  # position of the exit in the chain (0 = the lowest tier)
    temperature: float
    accuracy: float  # top-1 accuracy on the measured split (temperature scaling never changes the argmax)
    ece_before: float  # ECE of the raw confidence max(p)
    ece_after: float  # ECE of the calibrated confidence max(softmax(log p / T))
    nll_before: float  # mean negative log-likelihood of the labels, raw
    nll_after: float  # ... and calibrated
    n_fit: int  # samples T was fitted on
    n_measured: int  # samples the other numbers were measured on
    n_bins: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- logits, calibrated probabilities, confidence ---------------------------------------------------------------


def _check_probs(probs: Probs, what: str = "probabilities") -> Floats:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"{what} must be a 2-D array (samples x classes), got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError(f"{what} contain NaN or infinite values (did training diverge?)")
    return p


def _check_labels(labels: Labels, n: int, n_classes: int) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must be a 1-D array of {n} class indices, got shape {y.shape}")
    if n and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must be integer class indices in [0, {n_classes})")
    return y.astype(np.int64, copy=False)


def log_probs(probs: Probs, eps: float = EPS) -> Floats:
    """The logits recovered from softmax outputs: `log(clip(p, eps, 1))`, shifted so each row's maximum is 0
    (the shift changes nothing downstream and keeps `exp` from overflowing at small temperatures)."""
    logits = np.log(np.clip(_check_probs(probs), eps, 1.0))
    shifted: Floats = logits - logits.max(axis=1, keepdims=True)
    return shifted


def calibrated_probs(probs: Probs, temperature: float, eps: float = EPS) -> Floats:
    """`softmax(log(clip(p)) / T)`, row by row."""
    _check_temperature(temperature)
    z = np.exp(log_probs(probs, eps) / temperature)  # the row maximum is exp(0) = 1: no overflow
    out: Floats = z / z.sum(axis=1, keepdims=True)
    return out


def calibrated_confidence(probs: Probs, temperature: float, eps: float = EPS) -> Floats:
    """`max(softmax(log p / T))` per sample, the number a limit chosen from a target is compared with.

    Computed in float64 as `1 / sum(exp((l - max l) / T))` with `l = log(clip(p))`; the tier agent must use
    this function so that a limit chosen between two validation confidences separates them the same way at
    serving time."""
    _check_temperature(temperature)
    logits = log_probs(probs, eps)
    conf: Floats = 1.0 / np.exp(logits / temperature).sum(axis=1)
    return conf


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"a temperature must be a positive number, got {temperature!r}")


# -- fitting T -----------------------------------------------------------------------------------------------


def _nll_derivatives(logits: Floats, label_logit: Floats, beta: float) -> tuple[float, float, float]:
    """Mean NLL at `beta = 1/T` and its first and second derivatives in beta."""
    z = beta * logits  # row maxima are 0
    e = np.exp(z)
    s = e.sum(axis=1)
    q = e / s[:, None]
    mean_l = (q * logits).sum(axis=1)
    var_l = (q * logits * logits).sum(axis=1) - mean_l**2
    nll = float(np.mean(np.log(s) - beta * label_logit))
    return nll, float(np.mean(mean_l - label_logit)), float(np.mean(np.maximum(var_l, 0.0)))


def nll(probs: Probs, labels: Labels, temperature: float = 1.0, eps: float = EPS) -> float:
    """Mean negative log-likelihood of `labels` under `softmax(log p / T)`."""
    _check_temperature(temperature)
    logits = log_probs(probs, eps)
    y = _check_labels(labels, len(logits), logits.shape[1])
    if len(logits) == 0:
        raise ValueError("no samples: the negative log-likelihood is undefined")
    return _nll_derivatives(logits, logits[np.arange(len(logits)), y], 1.0 / temperature)[0]


def fit_temperature(probs: Probs, labels: Labels, *, eps: float = EPS, t_min: float = T_MIN,
                    t_max: float = T_MAX, max_iter: int = 200) -> float:
    """The T in [t_min, t_max] that minimises the mean negative log-likelihood of `labels` under
    `softmax(log p / T)` (see the module docstring for why the bracketed Newton iteration always converges).

    An optimum beyond the range is returned as the nearer end: a model that is right with probability 1 on
    every sample wants T -> 0. When the derivative vanishes everywhere (every row uniform, so T changes
    nothing) the answer is 1."""
    logits = log_probs(probs, eps)
    n = len(logits)
    if n == 0:
        raise ValueError("no samples to fit a temperature on")
    if not 0 < t_min <= 1 <= t_max:
        raise ValueError(f"the temperature range [{t_min}, {t_max}] must contain 1")
    y = _check_labels(labels, n, logits.shape[1])
    label_logit = logits[np.arange(n), y]
    lo, hi = 1.0 / t_max, 1.0 / t_min  # bracket in beta = 1/T
    _, d_lo, _ = _nll_derivatives(logits, label_logit, lo)
    _, d_hi, _ = _nll_derivatives(logits, label_logit, hi)
    if d_lo >= 0 and d_hi <= 0:  # flat: T changes nothing
        return 1.0
    if d_lo >= 0:
        return t_max
    if d_hi <= 0:
        return t_min
    beta = 1.0
    for _ in range(max_iter):
        _, d1, d2 = _nll_derivatives(logits, label_logit, beta)
        if d1 == 0:
            break
        if d1 < 0:
            lo = beta
        else:
            hi = beta
        step = beta - d1 / d2 if d2 > 0 else math.nan
        beta_next = step if lo < step < hi else math.sqrt(lo * hi)  # Newton, or bisection in log beta
        if abs(beta_next - beta) <= 1e-10 * beta or hi - lo <= 1e-12 * hi:
            beta = beta_next
            break
        beta = beta_next
    return 1.0 / beta


# -- calibration error -----------------------------------------------------------------------------------------


def expected_calibration_error(confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = N_BINS) -> float:
    """ECE over `n_bins` equal-width confidence bins (see the module docstring for the bin edges)."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.ndim != 1 or hit.shape != conf.shape:
        raise ValueError("confidence and correct must be 1-D arrays of the same length")
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    if len(conf) == 0:
        raise ValueError("no samples: the calibration error is undefined")
    if not np.isfinite(conf).all() or conf.min() < 0 or conf.max() > 1 + 1e-9:
        raise ValueError("confidences must be numbers in [0, 1]")
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    gap = np.bincount(bins, weights=hit - conf, minlength=n_bins)  # per bin: sum(correct) - sum(confidence)
    return float(np.abs(gap).sum() / len(conf))


def calibrate_exits(fit_probs: Sequence[Probs], fit_labels: Labels, measured_probs: Sequence[Probs],
                    measured_labels: Labels, *, n_bins: int = N_BINS, eps: float = EPS) -> list[ExitCalibration]:
    """Per exit of a chain (lowest tier first): T fitted on `fit_*` (the validation split), and accuracy,
    ECE and NLL before and after measured on `measured_*` (the job passes the test split)."""
    if len(fit_probs) != len(measured_probs) or not fit_probs:
        raise ValueError("give the same, non-zero number of exits for both splits")
    out = []
    for k, (fp, mp) in enumerate(zip(fit_probs, measured_probs, strict=True)):
        t = fit_temperature(fp, fit_labels, eps=eps)
        p = _check_probs(mp, f"exit {k}'s probabilities")
        y = _check_labels(measured_labels, len(p), p.shape[1])
        if len(p) == 0:
            raise ValueError("no samples to measure the calibration on")
        correct = p.argmax(axis=1) == y
        out.append(ExitCalibration(
            exit=k, temperature=t, accuracy=float(correct.mean()),
            ece_before=expected_calibration_error(p.max(axis=1), correct, n_bins),
            ece_after=expected_calibration_error(calibrated_confidence(p, t, eps), correct, n_bins),
            nll_before=nll(p, y, 1.0, eps), nll_after=nll(p, y, t, eps),
            n_fit=len(fp), n_measured=len(p), n_bins=n_bins))
    return out

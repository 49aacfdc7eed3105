"""Statistics of a study: intervals over seeds, over test images, and paired comparisons.

* :func:`t_interval`: mean over seeds ± ``t_{0.975, n-1} * sd / sqrt(n)`` (Student's t; the quantile is
  computed from the regularised incomplete beta function, so no SciPy is needed).
* :func:`wilson_interval`: with one seed, the binomial (Wilson score) interval over the test images,
  labelled ``binomial`` in reports: it covers test-set sampling only, not training noise.
* :func:`summarize`: a report cell's interval; with several seeds (all on the same test images) the t
  half-width over seeds and the binomial half-width over the images added in quadrature (``t+binomial``).
* :func:`paired_bootstrap`: the difference of two settings evaluated on the *same* images and seeds,
  resampling images (the same draw for both settings, per seed) and averaging over seeds; its percentile
  interval decides whether one setting is significantly below another.
* :func:`retention`: accuracy at a size over accuracy at the training size, per seed; a t interval over the
  seeds and, with per-image results, the ratio's image-sampling half-width in quadrature (``t+delta``).
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ['Interval', 't_quantile', 't_interval', 'wilson_interval', 'pack_correct', 'unpack_correct',
           'paired_bootstrap', 'retention', 'summarize']


@dataclass(frozen=True)
class Interval:
    """``mean`` with a 95% interval ``[lo, hi]``; ``method`` says what it covers (``t`` over ``n`` seeds,
    ``binomial`` over the test images of one seed, ``bootstrap``, or ``none``)."""
    mean: float
    lo: float
    hi: float
    n: int
    sd: float = float('nan')
    method: str = 't'

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (bisection on the exact CDF)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f't_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}')
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def t_interval(values: Sequence[float], conf: float = 0.95) -> Interval:
    """Mean of ``values`` (one per seed) with Student's t interval; a single value has no interval."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise ValueError('t_interval of no values')
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean, 1, float('nan'), 'none')
    sd = float(x.std(ddof=1))
    half = t_quantile(0.5 + conf / 2.0, x.size - 1) * sd / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size), sd, 't')


def _z(conf: float) -> float:
    """The two-sided normal quantile of level ``conf`` (1.96 at 0.95)."""
    from statistics import NormalDist
    return NormalDist().inv_cdf(0.5 + conf / 2.0)


def wilson_interval(correct: int, n: int, conf: float = 0.95) -> Interval:
    """Accuracy ``correct / n`` in percent with the Wilson score interval (test-image sampling only)."""
    if n <= 0:
        raise ValueError('wilson_interval needs n > 0 images')
    z = _z(conf)
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(100.0 * p, 100.0 * (centre - half), 100.0 * (centre + half), 1, float('nan'), 'binomial')


def pack_correct(correct: np.ndarray | Sequence[bool]) -> str:
    """Per-image correctness (bools, in test-set order) as base64 of packed bits, for a JSON row."""
    bits = np.packbits(np.asarray(correct, dtype=bool))
    return base64.b64encode(bits.tobytes()).decode('ascii')


def unpack_correct(packed: str, n: int) -> np.ndarray:
    """Inverse of :func:`pack_correct` (``n`` images)."""
    bits = np.frombuffer(base64.b64decode(packed), dtype=np.uint8)
    return np.unpackbits(bits)[:n].astype(bool)


def paired_bootstrap(a: Sequence[np.ndarray], b: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0,
                     conf: float = 0.95) -> Interval:
    """``acc(a) - acc(b)`` in points, averaged over seeds, with a paired bootstrap interval.

    ``a[s]`` and ``b[s]`` are the per-image correctness of the two settings for seed ``s`` on the same
    images (same order). Each bootstrap draw resamples the images of every seed with replacement, using the
    same indices for ``a`` and ``b``, so the image difficulty that both share cancels."""
    if len(a) != len(b) or not a:
        raise ValueError('paired_bootstrap needs the same seeds (at least one) for both settings')
    rng = np.random.default_rng(seed)
    diffs = np.zeros(n_boot)
    point = 0.0
    for xa, xb in zip(a, b):
        xa, xb = np.asarray(xa, dtype=float), np.asarray(xb, dtype=float)
        if xa.shape != xb.shape:
            raise ValueError(f'paired_bootstrap: {xa.shape[0]} vs {xb.shape[0]} images; pair the same test images')
        d = xa - xb
        point += d.mean()
        idx = rng.integers(0, d.size, size=(n_boot, d.size))
        diffs += d[idx].mean(axis=1)
    k = len(a)
    diffs *= 100.0 / k
    alpha = (1.0 - conf) / 2.0
    lo, hi = np.quantile(diffs, [alpha, 1.0 - alpha])
    return Interval(100.0 * point / k, float(lo), float(hi), k, float(diffs.std()), 'bootstrap')


def retention(acc: Sequence[float], acc_train: Sequence[float], correct: Sequence[np.ndarray] | None = None,
              correct_train: Sequence[np.ndarray] | None = None, conf: float = 0.95) -> Interval:
    """Retention ``r_s = acc_s / acc_train_s`` per seed ``s`` (accuracies in percent), mean over seeds.

    Interval: Student's t over the seeds (``t``). Given each seed's per-image correctness at both sizes (the
    same images in the same order), it also covers the test images: the ratio-of-means (delta method)
    standard error ``se_s = sqrt(Var_i(x_i - r_s y_i) / n) / mean(y)`` (Cochran, *Sampling Techniques*, 6.3),
    averaged over seeds because they share the images, times ``z``; added in quadrature to the t half-width
    (``t+delta``), or alone with one seed (``delta``). A ratio cannot go below 0, so the interval is cut there."""
    if len(acc) != len(acc_train):
        raise ValueError('retention pairs each seed with its training-size accuracy')
    iv = t_interval([x / y for x, y in zip(acc, acc_train)], conf)
    if correct is None or correct_train is None:
        return iv
    if len(correct) != len(acc) or len(correct_train) != len(acc):
        raise ValueError('retention: give per-image correctness for every seed at both sizes')
    ses = []
    for x, y in zip(correct, correct_train):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x.shape != y.shape:
            raise ValueError(f'retention: {x.shape[0]} vs {y.shape[0]} images; pair the same test images')
        r = x.mean() / y.mean()
        ses.append(math.sqrt(np.var(x - r * y, ddof=1) / x.size) / y.mean())
    h_img = _z(conf) * float(np.mean(ses))
    method, half = ('t+delta', math.hypot(iv.half_width, h_img)) if len(acc) >= 2 else ('delta', h_img)
    return Interval(iv.mean, max(iv.mean - half, 0.0), iv.mean + half, iv.n, iv.sd, method)


def summarize(acc: Sequence[float], n_images: int | None = None, conf: float = 0.95) -> Interval:
    """The interval a report shows for one cell (accuracies in percent, one per seed).

    One seed: the binomial (Wilson) interval over the ``n_images`` test images. Several seeds: every seed is
    evaluated on the same fixed images, so their spread holds training noise only and the test-image sampling
    is shared; the half-width is ``sqrt(h_t^2 + h_b^2)``, Student's t over the seeds (``h_t``) and the normal
    binomial half-width of the mean accuracy over ``n_images`` (``h_b = z sqrt(p (1 - p) / n_images)``), labelled
    ``t+binomial``. Without an image count: the t interval alone. An accuracy cannot leave [0, 100], so a wide
    interval (two seeds far apart: t = 12.71) is cut there."""
    if len(acc) == 1 and n_images:
        return wilson_interval(round(acc[0] * n_images / 100.0), n_images, conf)
    iv = t_interval(acc, conf)
    method, half = iv.method, iv.half_width
    if len(acc) >= 2 and n_images:
        p = min(max(iv.mean / 100.0, 0.0), 1.0)
        h_b = 100.0 * _z(conf) * math.sqrt(p * (1 - p) / n_images)
        method, half = 't+binomial', math.hypot(iv.half_width, h_b)
    if not math.isfinite(half):
        return iv
    return Interval(iv.mean, max(iv.mean - half, 0.0), min(iv.mean + half, 100.0), iv.n, iv.sd, method)

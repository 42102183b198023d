"""Scaling-law fits of a sweep: L(C) = E + A * C^-alpha per variant and modality, and compute ratios at equal loss.

    fit = fit_power_law(compute, loss)          # compute: training FLOPs of each size, loss: its held-out loss
    fit.supported, fit.why                      # False with the reason where the points cannot carry a fit
    fit.loss_at(c), fit.compute_for(loss)       # the fitted curve and its inverse

The form is Kaplan/Hoffmann's and "Scaling Laws for Native Multimodal Models" (Shukor et al. 2025): an
irreducible loss E plus a power law in compute. It is fitted with scipy's least squares on the losses themselves,
compute scaled by its smallest value (so A is the reducible loss at the smallest size and the problem is well
conditioned), E bounded to [0, min loss), alpha to (0, 3]. A fit is reported as not supported, and never drawn,
when it has fewer than MIN_POINTS distinct sizes (three parameters need a residual to be judged), when the losses
do not fall with compute (each size must end below the one before, within RISE_TOLERANCE), or when the optimiser
does not converge.

The compute ratio of a variant against the reference at equal loss is C_variant(L*) / C_reference(L*), both read
off the fitted curves at L*, the loss the reference reached at its largest size: below 1, the variant needs less
compute for the reference's best loss (MoT's "dense quality at 37% of the FLOPs" is a ratio of 0.37). It is
marked extrapolated when C_variant(L*) lies outside the variant's measured compute range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_POINTS = 4
RISE_TOLERANCE = 0.01  # a size may end at most 1% above the previous one and still count as falling


@dataclass(frozen=True)
class PowerLawFit:
    E: float = math.nan
    A: float = math.nan
    alpha: float = math.nan
    compute_scale: float = 1.0  # C is measured in units of this (the smallest compute of the points)
    points: int = 0
    supported: bool = False
    why: str = ""              # the reason when not supported
    compute_range: tuple[float, float] = (math.nan, math.nan)

    def loss_at(self, compute):
        return self.E + self.A * (np.asarray(compute, dtype=float) / self.compute_scale) ** -self.alpha

    def compute_for(self, loss: float) -> float:
        """The compute at which the fitted curve reaches `loss`; inf where it never does (loss <= E)."""
        if not self.supported or loss <= self.E:
            return math.inf
        return self.compute_scale * ((loss - self.E) / self.A) ** (-1.0 / self.alpha)


def fit_power_law(compute, loss) -> PowerLawFit:
    """Fits L = E + A * C^-alpha to points (compute[i], loss[i]); several points per size (seeds) are allowed."""
    from scipy.optimize import curve_fit

    compute, loss = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    keep = np.isfinite(compute) & np.isfinite(loss) & (compute > 0)
    compute, loss = compute[keep], loss[keep]
    sizes = np.unique(compute)
    base = dict(points=len(sizes), compute_range=(float(compute.min()), float(compute.max())) if len(compute) else
                (math.nan, math.nan))
    if len(sizes) < MIN_POINTS:
        return PowerLawFit(**base, why=f"too few sizes ({len(sizes)} < {MIN_POINTS})")
    means = np.array([loss[compute == c].mean() for c in sizes])
    rises = [(sizes[i], means[i - 1], means[i]) for i in range(1, len(sizes))
             if means[i] > means[i - 1] * (1 + RISE_TOLERANCE)]
    if rises:
        c, before, after = rises[0]
        return PowerLawFit(**base, why=f"losses rise with compute ({before:.4g} -> {after:.4g} at {c:.3g} FLOPs)")
    scale = float(sizes[0])
    x = compute / scale

    def model(x, E, A, alpha):
        return E + A * x ** -alpha

    low = float(loss.min())
    best = None
    for alpha0 in (0.1, 0.3, 1.0):  # a few starts: the fit is not convex in alpha
        for e_frac in (0.0, 0.5, 0.9):
            E0 = e_frac * low
            A0 = max(float(means[0]) - E0, 1e-9)
            try:
                params, cov = curve_fit(model, x, loss, p0=(E0, A0, alpha0),
                                        bounds=([0.0, 1e-12, 1e-4], [low * (1 - 1e-9), np.inf, 3.0]),
                                        maxfev=20000)
            except (RuntimeError, ValueError):
                continue
            residual = float(np.sum((model(x, *params) - loss) ** 2))
            if best is None or residual < best[0]:
                best = (residual, params, cov)
    if best is None:
        return PowerLawFit(**base, why="the least-squares fit did not converge")
    E, A, alpha = (float(v) for v in best[1])
    return PowerLawFit(E=E, A=A, alpha=alpha, compute_scale=scale, supported=True, **base)


@dataclass(frozen=True)
class ComputeRatio:
    ratio: float = math.nan
    target_loss: float = math.nan
    extrapolated: bool = False
    why: str = ""


def compute_ratio(variant: PowerLawFit, reference: PowerLawFit, target_loss: float) -> ComputeRatio:
    """C_variant(target) / C_reference(target) on the fitted curves (see the module docstring)."""
    for name, fit in (("variant", variant), ("reference", reference)):
        if not fit.supported:
            return ComputeRatio(target_loss=target_loss, why=f"{name} fit not supported: {fit.why}")
    c_variant, c_reference = variant.compute_for(target_loss), reference.compute_for(target_loss)
    if not math.isfinite(c_variant):
        return ComputeRatio(target_loss=target_loss,
                            why=f"the variant's curve never reaches {target_loss:.4g} (E = {variant.E:.4g})")
    if not math.isfinite(c_reference):
        return ComputeRatio(target_loss=target_loss,
                            why=f"the reference's curve never reaches {target_loss:.4g} (E = {reference.E:.4g})")
    low, high = variant.compute_range
    outside = not (low * (1 - 1e-9) <= c_variant <= high * (1 + 1e-9))
    return ComputeRatio(ratio=c_variant / c_reference, target_loss=target_loss, extrapolated=outside)


def ratio_over_seeds(points_by_seed: dict, reference_points_by_seed: dict) -> tuple[list[float], list[str]]:
    """Per seed: fit variant and reference on that seed's points ({seed: (compute list, loss list)}), read the
    ratio at the loss the reference reached at its largest compute. Returns (ratios, reasons for the seeds
    that gave none)."""
    ratios, missing = [], []
    for seed in sorted(set(points_by_seed) & set(reference_points_by_seed)):
        ref_c, ref_l = (np.asarray(v, dtype=float) for v in reference_points_by_seed[seed])
        target = float(ref_l[np.argmax(ref_c)])
        result = compute_ratio(fit_power_law(*points_by_seed[seed]), fit_power_law(ref_c, ref_l), target)
        if math.isfinite(result.ratio):
            ratios.append(result.ratio)
        else:
            missing.append(f"seed {seed}: {result.why}")
    return ratios, missing

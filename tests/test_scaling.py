"""Scaling-law fits: known parameters come back from synthetic points, unsupported fits say why, and the compute
ratio at equal loss is the one the curves imply."""

import math

import numpy as np
import pytest

from omni.tools import scaling

COMPUTE = np.array([1e12, 3e12, 1e13, 3e13, 1e14])


def _points(E, A, alpha, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    loss = E + A * (COMPUTE / COMPUTE[0]) ** -alpha
    return COMPUTE, loss * (1 + noise * rng.standard_normal(len(loss)))


def test_fit_recovers_known_parameters():
    fit = scaling.fit_power_law(*_points(E=1.7, A=2.5, alpha=0.34))
    assert fit.supported, fit.why
    assert (fit.E, fit.A, fit.alpha) == pytest.approx((1.7, 2.5, 0.34), rel=1e-4)
    assert fit.compute_scale == 1e12 and fit.points == 5


def test_fit_with_noise_and_seeds_stays_close():
    c1, l1 = _points(E=0.8, A=3.0, alpha=0.5, noise=0.003, seed=1)
    c2, l2 = _points(E=0.8, A=3.0, alpha=0.5, noise=0.003, seed=2)
    fit = scaling.fit_power_law(np.concatenate([c1, c2]), np.concatenate([l1, l2]))
    assert fit.supported
    assert fit.alpha == pytest.approx(0.5, rel=0.1) and fit.E == pytest.approx(0.8, abs=0.05)


@pytest.mark.parametrize("compute, loss, why", [
    (COMPUTE[:3], [3.0, 2.5, 2.2], "too few sizes (3 < 4)"),
    (COMPUTE[:4], [3.0, 2.5, 2.7, 2.2], "losses rise with compute (2.5 -> 2.7 at 1e+13 FLOPs)"),
])
def test_unsupported_fits_say_why(compute, loss, why):
    fit = scaling.fit_power_law(compute, loss)
    assert not fit.supported and fit.why == why
    assert math.isinf(fit.compute_for(2.0))


def test_compute_ratio_at_equal_loss():
    # The variant's curve is the reference's with compute scaled by 1/3: it reaches any loss with a third.
    reference = scaling.fit_power_law(*_points(E=1.0, A=2.0, alpha=0.4))
    c, loss = _points(E=1.0, A=2.0, alpha=0.4)
    variant = scaling.fit_power_law(c / 3, loss)
    target = float(loss[-1])
    result = scaling.compute_ratio(variant, reference, target)
    assert result.ratio == pytest.approx(1 / 3, rel=1e-3)
    assert not result.extrapolated  # C_variant(L*) = its largest measured compute
    unreachable = scaling.compute_ratio(variant, reference, 0.9)
    assert math.isnan(unreachable.ratio) and "never reaches 0.9" in unreachable.why


def test_ratio_over_seeds_fits_each_seed():
    ref = {s: _points(E=1.0, A=2.0, alpha=0.4, noise=0.001, seed=s) for s in range(3)}
    var = {s: (c / 2, loss) for s, (c, loss) in ref.items()}
    ratios, missing = scaling.ratio_over_seeds(var, ref)
    assert missing == [] and len(ratios) == 3
    assert np.mean(ratios) == pytest.approx(0.5, rel=0.02)
    few = {s: (c[:3], loss[:3]) for s, (c, loss) in var.items()}
    ratios, missing = scaling.ratio_over_seeds(few, ref)
    assert ratios == [] and missing[0] == "seed 0: variant fit not supported: too few sizes (3 < 4)"

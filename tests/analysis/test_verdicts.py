import pytest

from hesse.analysis import find_outliers, gd_verdict, sgd_verdict
from hesse.dynamics.sgd_verdicts import BatchNoise
from hesse.dynamics.verdicts import gd_threshold


def test_a_gap_after_c_minus_one_matches_cross_entropy():
    values = [9.0, 8.5, 8.0, 7.0, 0.9, 0.8, 0.7]
    out = find_outliers(values, n_classes=5, loss_name="cross_entropy", loss=0.3)
    assert (out.n_outliers, out.expected, out.matches) == (4, 4, True)
    assert out.gap_ratio == pytest.approx(7.0 / 0.9)
    assert "outlier structure is there" in out.text


def test_squared_loss_expects_c_outliers():
    out = find_outliers([5.0, 4.0, 3.0, 0.5, 0.4], n_classes=3, loss_name="mse", loss=0.1)
    assert (out.n_outliers, out.expected, out.matches) == (3, 3, True)


@pytest.mark.parametrize(
    ("values", "n_classes", "reason"),
    [
        ([9.0, 1.0, 0.9, 0.8], 10, "rerun with --k 14"),
        ([1.2, 1.1, 1.0, 0.9, 0.85], 3, "No gap stands out"),
        ([20.0, 2.0, 1.9, 0.2, 0.19], 4, "gap after λ1 is larger than the one after λ3"),
        ([20.0, 2.0, 1.9, 0.2, 0.19], 4, "2 of the predicted outliers are inside the bulk"),
    ],
)
def test_a_missing_structure_is_explained(values, n_classes, reason):
    out = find_outliers(values, n_classes=n_classes, loss_name="cross_entropy", loss=0.01)
    assert out.matches is False and reason in out.text


def test_unknown_classes_or_loss_give_no_prediction():
    out = find_outliers([3.0, 1.0, 0.5], n_classes=None, loss_name="cross_entropy", loss=0.1)
    assert out.expected is None and out.matches is None and out.n_outliers == 1
    out = find_outliers([3.0, 1.0], n_classes=4, loss_name="custom", loss=0.1)
    assert out.expected is None and "no prediction" in out.text
    assert find_outliers([-1.0, -2.0], n_classes=2, loss_name="mse", loss=0.1).n_outliers is None


@pytest.mark.parametrize(
    ("lam", "status"), [(5.0, "stable"), (19.5, "edge"), (20.5, "edge"), (40.0, "unstable")]
)
def test_gd_compares_the_sharpness_with_two_over_eta(lam, status):
    v = gd_verdict(lam, 1e-6, lr=0.1)
    assert v.status == status and v.threshold == pytest.approx(20.0)
    assert f"{lam:.4g}" in v.text and "2/η = 20" in v.text


@pytest.mark.parametrize(
    ("ci", "at_one"),
    [((10.0, 15.0), "which that bound allows"), ((18.0, 22.0), "straddles"),
     ((25.0, 30.0), "would escape")],
)  # fmt: skip
def test_sgd_without_a_batch_size_is_indeterminate_and_says_what_the_trace_means(ci, at_one):
    # the old verdict said "SGD would escape" from Tr(H) > 2/η whatever the batch size
    v = sgd_verdict(sum(ci) / 2, ci, lr=0.1, loss=0.01)
    assert v.status == "indeterminate" and v.quantity == "trace"
    assert at_one in v.text and "depends on the batch size" in v.text
    assert "global minimum" not in v.text


def test_sgd_verdict_warns_away_from_a_minimum():
    assert "read it as an indication" in sgd_verdict(5.0, (4.0, 6.0), lr=0.1, loss=0.5).text


def _noise(B, lam=0.5, frob=2.0, sample_frob=(16.0, 16.0, 16.0), sample_top=6.8, n=16):
    return BatchNoise(B, n, (lam, lam), (frob, frob, frob), sample_frob, sample_top)


@pytest.mark.parametrize(
    ("noise", "status"),
    [
        (_noise(1), "unstable"),  # F_1 = 16 / 4 = 4 > 2/η = 2.22
        (_noise(4, lam=2.5), "unstable"),  # λmax > 1.1 * 2/η: no batch size helps
        (_noise(4, lam=2.3), "edge"),  # λmax within the 10% edge band above 2/η, as for GD
        (_noise(4), "stable"),  # S_4 = 0.8 * 0.5 + 0.2 * 6.8 = 1.76 <= 2.22
        (_noise(3), "indeterminate"),  # F_3 = 1.51 <= 2.22 < S_3 = 2.32
        (_noise(4, sample_top=None), "indeterminate"),  # no per-sample maximum: no "stable"
        (_noise(1, sample_frob=(8.0, 4.0, 12.0)), "inconclusive"),  # F_1 in [1, 3]
    ],
)
def test_sgd_verdict_holds_the_batch_moment_and_the_sufficient_bound_against_2_over_eta(
    noise, status
):
    v = sgd_verdict(4.0, (4.0, 4.0), lr=0.9, loss=0.0, noise=noise)
    assert v.status == status and v.quantity == "batch_moment"
    g = (16 - noise.batch_size) / (noise.batch_size * 15)
    assert noise.gamma == pytest.approx(g)
    assert v.value == pytest.approx(((1 - g) * 2.0 + g * noise.sample_frobenius[0]) / 4.0)
    assert f"B = {noise.batch_size} of n = 16" in v.text


def test_momentum_thresholds_heavy_ball_and_nesterov():
    assert gd_threshold(0.5) == pytest.approx(4.0)
    assert gd_threshold(1.0, 0.9) == pytest.approx(3.8)
    assert gd_threshold(1.0, 0.9, nesterov=True) == pytest.approx(3.8 / 2.8)  # 1.357
    v = gd_verdict(3.0, 1e-9, lr=1.0, momentum=0.9, nesterov=True)
    assert v.status == "unstable" and v.threshold == pytest.approx(3.8 / 2.8)
    assert "Nesterov" in v.text


@pytest.mark.parametrize(
    ("lam", "residual", "converged", "status"),
    [
        (18.0, 3.0, True, "inconclusive"),  # 2/η = 20 inside [15, 21]
        (21.0, 6.0, True, "inconclusive"),  # [15, 27] reaches out of the band on both sides
        (17.0, 2.5, True, "stable"),  # [14.5, 19.5] wholly below 2/η
        (19.0, 0.5, True, "edge"),  # [18.5, 19.5] inside the band, below 2/η
        (20.0, 1.0, True, "edge"),  # [19, 21] across 2/η, inside the band
        (21.5, 1.0, True, "unstable"),  # [20.5, 22.5] above 2/η, out of the band
        (5.0, 1e-6, False, "inconclusive"),  # a Ritz value only bounds λmax from below
        (21.0, 0.5, False, "inconclusive"),
        (40.0, 1.0, False, "unstable"),  # λmax >= 39 > 22 whatever the run missed
    ],
)
def test_gd_verdict_widens_with_the_residual_and_convergence(lam, residual, converged, status):
    v = gd_verdict(lam, residual, lr=0.1, converged=converged)
    assert v.status == status
    assert (v.low, v.high) == pytest.approx((lam - residual, lam + residual))
    assert f"± {residual:.2g}" in v.text
    assert ("did not converge" in v.text) == (not converged)


def test_stable_needs_the_whole_interval_below_two_over_eta():
    # the old verdict read λmax = 17 as stable whatever its residual
    assert gd_verdict(17.0, 2.99, lr=0.1).status == "stable"
    for residual in (3.0, 3.5, 10.0):
        assert gd_verdict(17.0, residual, lr=0.1).status == "inconclusive"

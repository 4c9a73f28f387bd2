"""hesse.losses inside Objective: recognition, closed-form GGN, PSD tags, refusals, outliers."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hesse
from hesse import losses
from hesse.analysis.outliers import expected_outliers, find_outliers
from hesse.operators.base import PSD

DT = torch.float64


def _objective(loss, C=3, binary=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1 if binary else C))
    model = model.double().eval()
    x = torch.randn(11, 4, dtype=DT)
    y = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 1]) if binary else torch.randint(0, C, (11,))
    return hesse.Objective(model, [(x[:6], y[:6]), (x[6:], y[6:])], loss=loss)


CASES = [
    (losses.gce(0.7), False),
    (losses.mae, False),
    (losses.sum_exp, False),
    (losses.ZLoss(a=2.0, b=0.5), False),
    (losses.AnyLoss("f_beta", L=5.0), True),
    (losses.AnyLoss("balanced_accuracy", L=5.0), True),
]


@pytest.mark.parametrize(("loss", "binary"), CASES, ids=lambda x: getattr(x, "spec", ""))
def test_closed_form_ggn_equals_the_dense_reference(loss, binary, assert_operator_matches):
    obj = _objective(loss, binary=binary)
    assert obj.loss_spec.kind == loss.spec and obj.loss_spec.closed_form
    G = hesse.GGNOperator(obj)
    assert (PSD in G.tags) == loss.convex
    assert_operator_matches(G, hesse.reference.dense_ggn(obj))


def test_ggn_of_a_convex_comp_sum_is_psd_and_one_of_gce_is_not():
    convex = hesse.GGNOperator(_objective(losses.CompSum(0.5))).to_dense()
    assert torch.linalg.eigvalsh(convex).min() > -1e-12
    bent = hesse.GGNOperator(_objective(losses.mae, seed=2)).to_dense()
    assert torch.linalg.eigvalsh(bent).min() < -1e-8  # MAE: not convex in the logits


def test_comp_sum_with_tau_one_runs_as_torchs_cross_entropy():
    obj = _objective(losses.cross_entropy)
    ref = _objective(F.cross_entropy)
    assert obj.loss_spec.kind == "cross_entropy" and not obj.loss_spec.closed_form
    assert torch.allclose(obj.value(), ref.value(), rtol=1e-14)
    assert PSD in hesse.GGNOperator(obj).tags


def test_torch_losses_declare_their_curvature():
    assert _objective(F.cross_entropy).loss_spec.curvature.convex
    assert _objective(nn.CrossEntropyLoss(label_smoothing=0.1)).loss_spec.curvature.convex
    nll = _objective(F.nll_loss)
    with pytest.raises(ValueError, match="nll is linear"):
        hesse.GGNOperator(nll)


def test_ensloss_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="binary_cross_entropy_with_logits"):
        _objective(losses.EnsLoss(seed=0), binary=True)


def test_mc_fisher_refuses_a_loss_it_cannot_sample():
    with pytest.raises(ValueError, match="kind='empirical'"):
        hesse.FisherOperator(_objective(losses.gce(0.7)), "mc")


def test_hessian_of_a_new_loss_matches_the_dense_reference(assert_operator_matches):
    obj = _objective(losses.ZLoss(), seed=1)
    assert_operator_matches(hesse.HessianOperator(obj), hesse.reference.dense_hessian(obj))


def test_outlier_prediction_per_loss():
    assert expected_outliers(10, "cross_entropy")[0] == 9
    assert expected_outliers(10, "mse")[0] == 10
    assert expected_outliers(10, losses.gce(0.7).spec) == (9, "C - 1 for gce:q=0.7")
    assert expected_outliers(10, losses.ZLoss().spec)[0] == 8
    assert expected_outliers(2, losses.AnyLoss("accuracy").spec)[0] == 1
    assert expected_outliers(2, losses.AnyLoss("g_mean").spec)[0] == 2
    count, rule = expected_outliers(10, "ensloss:seed=0")
    assert count is None and "each step is 0" in rule
    assert expected_outliers(10, "custom")[0] is None
    out = find_outliers([9, 8, 7, 1, 0.9], n_classes=4, loss_name="mae", loss=0.2)
    assert out.n_outliers == 3 and out.expected == 3 and out.matches


def test_squared_error_is_torchs_mse(assert_operator_matches):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    data = (torch.randn(9, 4, dtype=DT), torch.randn(9, 3, dtype=DT))
    ours = hesse.Objective(model, data, loss=losses.SquaredError())
    theirs = hesse.Objective(model, data, loss=F.mse_loss)
    assert ours.loss_spec.kind == "mse" and ours.loss_spec.closed_form
    assert_operator_matches(hesse.GGNOperator(ours), hesse.GGNOperator(theirs).to_dense())


def test_smooth_adversarial_ggn_on_paired_inputs(assert_operator_matches):
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    pairs = losses.adversarial_pairs(net, x, y, eps=0.2, steps=3)
    obj = hesse.Objective(losses.Paired(net), (pairs, y), loss=losses.SmoothAdvCompSum(1.0, 0.5))
    G = hesse.GGNOperator(obj)
    assert PSD in G.tags
    assert_operator_matches(G, hesse.reference.dense_ggn(obj))

"""evaluate(): the measured loss and accuracy every application reports."""

import pytest
import torch
import torch.nn.functional as F

import hf_models
from hesse import Objective
from hesse.problem._evaluate import evaluate


def _manual_accuracy(pairs):
    correct = sum(int((p[y != -100] == y[y != -100]).sum()) for p, y in pairs)
    return correct / sum(int((y != -100).sum()) for _, y in pairs)


def test_tuple_batches_uneven_and_model_untouched():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    data = [
        (torch.randn(5, 4), torch.randint(0, 3, (5,))),
        (torch.randn(2, 4), torch.tensor([1, 2])),
    ]
    before = [p.clone() for p in model.parameters()]
    ev = evaluate(model, data, F.cross_entropy)
    want = _manual_accuracy([(model(x).argmax(-1), y) for x, y in data])
    assert ev.accuracy == pytest.approx(want) and ev.n == 7
    assert ev.loss == pytest.approx(Objective(model, data, F.cross_entropy).value().item())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_regression_has_no_accuracy():
    model = torch.nn.Linear(3, 2)
    ev = evaluate(model, [(torch.randn(4, 3), torch.randn(4, 2))], F.mse_loss)
    assert ev.accuracy is None and ev.n == 0 and ev.loss > 0


def test_token_loss_fn_ignores_padding():
    from hesse.demo import tiny_lm

    config = tiny_lm.Config(width=16, layers=1, heads=2, context=8)
    model = tiny_lm.build_model(config).eval()
    x, y = tiny_lm.dataset(config)
    data = [(x[:6], y[:6]), (x[6:9], y[6:9])]
    ev = evaluate(model, data, loss_fn=tiny_lm.token_loss)
    with torch.no_grad():
        want = _manual_accuracy([(model(a).argmax(-1), b) for a, b in data])
    assert ev.accuracy == pytest.approx(want) and ev.n == int((y[:9] != -100).sum())


def test_hugging_face_classifier_and_causal_lm_are_shifted():
    bert = hf_models.bert_classifier().eval()
    batches = hf_models.classifier_batches()
    ev = evaluate(bert, batches)
    with torch.no_grad():
        pairs = [(bert(**hf_models.inputs(b)).logits.argmax(-1), b["labels"]) for b in batches]
    assert ev.accuracy == pytest.approx(_manual_accuracy(pairs)) and ev.n == 10

    gpt = hf_models.gpt2_lm().eval()
    batches = hf_models.lm_batches()
    ev = evaluate(gpt, batches)
    with torch.no_grad():
        logits = [gpt(**hf_models.inputs(b)).logits for b in batches]
    pairs = [
        (z[:, :-1].argmax(-1), b["labels"][:, 1:]) for z, b in zip(logits, batches, strict=True)
    ]
    assert ev.accuracy == pytest.approx(_manual_accuracy(pairs))
    assert ev.n == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

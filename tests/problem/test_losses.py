"""Loss recognition: torch losses with their settings, and the losses of Hugging Face models.

Every value is checked against the loss of all data in one batch (float64), computed by torch.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from hesse.operators.base import PSD
from hesse.problem.objective import LossSpec, loss_kind

DT = torch.float64
RTOL = 1e-10
CLASS_WEIGHTS = torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=DT)


def _problem(n=11, classes=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, classes)).to(DT).eval()
    x, y = torch.randn(n, 3, dtype=DT), torch.randint(0, classes, (n,))
    return model, x, y


def _split(x, y, sizes=(5, 4, 2)):
    out, start = [], 0
    for n in sizes:
        out.append((x[start : start + n], y[start : start + n]))
        start += n
    return out


def _flat(model, x, y, loss):
    """``theta -> loss(model(x), y)`` on all data at once, and theta0."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [s.numel() for s in shapes]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def full(t):
        parts = [p.reshape(s) for p, s in zip(torch.split(t, sizes), shapes, strict=True)]
        out = torch.func.functional_call(model, dict(zip(names, parts, strict=True)), (x,))
        return loss(out, y)

    return full, theta


def _assert_matches_full_batch(loss, y_edit=None, log_probs=False):
    model, x, y = _problem()
    if log_probs:
        model.append(nn.LogSoftmax(-1)).eval()
    if y_edit is not None:
        y = y_edit(y)
    obj = hesse.Objective(model, _split(x, y), loss=loss)
    full, theta = _flat(model, x, y, loss)
    want = full(theta)
    assert abs(obj.value().item() - want.item()) <= RTOL * abs(want.item())
    g = torch.func.grad(full)(theta)
    assert (obj.gradient() - g).norm() <= RTOL * g.norm()
    return obj


def _ignore_some(y):
    y = y.clone()
    y[[1, 6, 9]] = -100
    return y


def _ignore_class_2(y):
    y = y.clone()
    y[[0, 4, 8]] = 2
    return y


@pytest.mark.parametrize(
    "loss, edit",
    [
        (nn.CrossEntropyLoss(weight=CLASS_WEIGHTS), _ignore_some),
        (nn.CrossEntropyLoss(ignore_index=2), _ignore_class_2),
        (nn.CrossEntropyLoss(label_smoothing=0.2, ignore_index=2), _ignore_class_2),
        (nn.CrossEntropyLoss(weight=CLASS_WEIGHTS, label_smoothing=0.3, ignore_index=2), None),
        (functools.partial(F.cross_entropy, ignore_index=2), _ignore_class_2),
        (functools.partial(F.cross_entropy, weight=CLASS_WEIGHTS, label_smoothing=0.1), None),
    ],
    ids=["weight", "ignore_index", "smoothing", "all-three", "partial-ignore", "partial-weight"],
)
def test_cross_entropy_settings_equal_the_full_batch_loss(loss, edit):
    # class weights: batch means divide by the sum of the class weights of their targets
    # (1.0096 instead of 1.0176 when weighted by counts)
    _assert_matches_full_batch(loss, edit)


@pytest.mark.parametrize(
    "loss",
    [nn.NLLLoss(weight=CLASS_WEIGHTS), nn.NLLLoss(ignore_index=2)],
    ids=["weight", "ignore_index"],
)
def test_nll_settings_equal_the_full_batch_loss(loss):
    _assert_matches_full_batch(loss, _ignore_class_2, log_probs=True)


def test_soft_targets_count_positions_not_class_weights():
    torch.manual_seed(3)
    model = nn.Conv1d(2, 3, 1).to(DT).eval()  # (N, C, L) outputs: classes along dim 1
    loss = nn.CrossEntropyLoss(weight=CLASS_WEIGHTS[:3])
    data, total, count = [], 0.0, 0
    for n, length in [(3, 4), (3, 7), (1, 2)]:  # the mean is over N * L positions
        x = torch.randn(n, 2, length, dtype=DT)
        p = torch.softmax(torch.randn(n, 3, length, dtype=DT), 1)
        data.append((x, p))
        total += F.cross_entropy(model(x), p, weight=CLASS_WEIGHTS[:3], reduction="sum").item()
        count += n * length
    obj = hesse.Objective(model, data, loss=loss)
    assert obj.value().item() == pytest.approx(total / count, rel=RTOL)


def test_class_weights_follow_the_objective_dtype():
    model, x, y = _problem()
    loss = nn.CrossEntropyLoss(weight=CLASS_WEIGHTS.float())
    obj = hesse.Objective(model.float(), _split(x.float(), y), loss=loss, dtype=DT)
    want = F.cross_entropy(model.double()(x), y, weight=CLASS_WEIGHTS)
    assert obj.value().item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize(
    "loss",
    [
        nn.CrossEntropyLoss(reduction="sum"),
        nn.CrossEntropyLoss(reduction="none"),
        nn.NLLLoss(reduction="sum"),
        nn.MSELoss(reduction="sum"),
        functools.partial(F.cross_entropy, reduction="sum"),
        functools.partial(F.mse_loss, reduction="sum"),
    ],
)
def test_refuses_a_reduction_that_is_not_the_mean(loss):
    # today: 5.18 reported for a true summed loss of 9.22
    model, x, y = _problem()
    targets = torch.randn(11, 4, dtype=DT) if loss_kind(loss) == "mse" else y
    with pytest.raises(ValueError, match="reduction='mean'"):
        hesse.Objective(model, _split(x, targets), loss=loss)


@pytest.mark.parametrize(
    "loss",
    [
        functools.partial(F.cross_entropy, reduce=False),
        functools.partial(F.cross_entropy, size_average=False),
        functools.partial(F.mse_loss, torch.zeros(3)),
    ],
)
def test_refuses_partials_binding_what_it_cannot_read(loss):
    model, x, y = _problem()
    with pytest.raises(ValueError, match="(?i)partial.*loss_fn"):
        hesse.Objective(model, _split(x, y), loss=loss)


def test_loss_spec_and_kind():
    model, x, y = _problem()
    data = _split(x, y)
    weighted = nn.CrossEntropyLoss(weight=CLASS_WEIGHTS, ignore_index=3, label_smoothing=0.1)
    spec = hesse.Objective(model, data, loss=weighted).loss_spec
    assert spec == LossSpec("cross_entropy", 3, class_weighted=True, label_smoothing=0.1)
    assert hesse.Objective(model, data, loss=F.cross_entropy).loss_spec == LossSpec(
        "cross_entropy", -100
    )
    assert hesse.Objective(model, data, loss=lambda o, t: F.cross_entropy(o, t)).loss_spec is None
    for loss, kind in [
        (F.cross_entropy, "cross_entropy"),
        (nn.MSELoss(), "mse"),
        (functools.partial(F.nll_loss, ignore_index=1), "nll"),
        (nn.CrossEntropyLoss(weight=CLASS_WEIGHTS), "cross_entropy"),
        (torch.abs, None),
    ]:
        assert loss_kind(loss) == kind
    with pytest.raises(AttributeError):
        spec.kind = "mse"  # frozen


class Focal(nn.CrossEntropyLoss):
    """A focal loss (Lin et al. 2017) derived from nn.CrossEntropyLoss, with its own forward."""

    def forward(self, x, y):
        ce = F.cross_entropy(x, y, reduction="none")
        return ((1 - torch.exp(-ce)) ** 2 * ce).mean()


@pytest.mark.parametrize(
    "loss",
    [Focal(), functools.partial(nn.CrossEntropyLoss(label_smoothing=0.3))],
    ids=["subclass", "partial-of-module"],
)
def test_losses_of_other_classes_are_used_as_given(loss):
    # today: the focal loss was taken for plain cross-entropy (1.1518 for a focal loss of
    # 0.5656), and the module's settings under a partial were dropped
    obj = _assert_matches_full_batch(loss)
    assert loss_kind(loss) is None and obj.loss_spec is None and obj.loss is loss
    assert PSD not in hesse.GGNOperator(obj).tags  # the focal loss is not convex in the logits
    with pytest.raises(ValueError, match="kind='empirical'"):
        hesse.FisherOperator(obj, kind="mc")


# ---------------------------------------------------------------- Hugging Face models

transformers = pytest.importorskip("transformers")
from hf_models import bert_classifier, gpt2_lm  # noqa: E402 (needs transformers)


def _text_batches(labels, sizes=((3, 7), (2, 5), (1, 6)), seed=1):
    """Dict batches of different shapes, right-padded (attention mask 0, label -100)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b, t in sizes:
        ids = torch.randint(0, 30, (b, t), generator=gen)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 3 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels(ids, mask, gen)})
    return out


def _lm_labels(ids, mask, gen):
    return ids.masked_fill(mask == 0, -100)


def _own_mean(model, data, weight):
    """The model's own batch losses, weighted by ``weight(batch)``."""
    with torch.no_grad():
        losses = [model(**b)[0].double() for b in data]  # loss first, dict or tuple
    w = [float(weight(b)) for b in data]
    return float(sum(v * c for v, c in zip(losses, w, strict=True)) / sum(w))


def _shifted_count(b):
    return (b["labels"][:, 1:] != -100).sum()


def _token_mean_by_hand(model, data):
    total, count = 0.0, 0
    with torch.no_grad():
        for b in data:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            y = b["labels"][:, 1:]
            tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), y, reduction="sum")
            total, count = total + tok.item(), count + int((y != -100).sum())
    return total / count


def test_causal_lm_is_weighted_by_shifted_labels():
    # today: weights count the unshifted labels (3.92804 for a token mean of 3.92749)
    model = gpt2_lm()
    data = _text_batches(_lm_labels)
    obj = hesse.Objective(model, data)
    want = _token_mean_by_hand(model, data)
    assert obj.value().item() == pytest.approx(want, rel=RTOL)
    # the model's own float32 losses, weighted by shifted counts
    assert obj.value().item() == pytest.approx(_own_mean(model, data, _shifted_count), rel=1e-6)
    assert obj.loss_source == "inferred from GPT2LMHeadModel: token cross-entropy, shifted"
    assert obj.loss is F.cross_entropy and obj.loss_spec == LossSpec("cross_entropy", -100)


def test_inferred_causal_lm_loss_feeds_outputs_targets_and_output_loss():
    # the interface of the GGN and Fisher operators gives the same mean loss
    model = gpt2_lm()
    obj = hesse.Objective(model, _text_batches(_lm_labels))
    total, weight = 0.0, 0.0
    for b in obj.batches():
        out, y, w = obj.outputs(obj.params, b), obj.targets(b), obj.batch_weight(b)
        assert out.shape == (y.numel(), 50) and out.shape[0] % b["labels"].shape[0] == 0
        total, weight = total + obj.output_loss(out, y, w).item(), weight + w
    assert total / weight == pytest.approx(obj.value().item(), rel=RTOL)
    op = hesse.GGNOperator(obj.restrict("transformer.ln_f"))
    assert PSD in op.tags


def test_all_ignored_batch_of_a_causal_lm_adds_nothing():
    model = gpt2_lm()
    data = _text_batches(_lm_labels)
    silent = dict(data[1], labels=torch.full_like(data[1]["labels"], -100))
    obj = hesse.Objective(model, [data[0], silent, data[2]])
    want = hesse.Objective(model, [data[0], data[2]])
    assert obj.value().item() == pytest.approx(want.value().item(), rel=RTOL)
    assert torch.allclose(obj.gradient(), want.gradient(), rtol=RTOL, atol=1e-14)


class ScaledLM(transformers.GPT2LMHeadModel):
    """A GPT-2 subclass whose own loss is twice the token cross-entropy."""

    def forward(self, labels=None, **inputs):
        out = super().forward(labels=labels, **inputs)
        if labels is not None:
            out["loss"] = 2 * out["loss"]
        return out


def _unlabelled_after_shift(batch):
    """The batch with only the first token of each row labelled: no label after the shift."""
    labels = torch.full_like(batch["labels"], -100)
    labels[:, 0] = batch["input_ids"][:, 0]
    return dict(batch, labels=labels)


def test_a_first_batch_without_counted_labels_confirms_nothing():
    # today: such a batch adopted the class's loss unconfirmed, so a subclass computing another
    # loss was taken for the plain token cross-entropy (half its value here)
    plain = gpt2_lm()
    model = ScaledLM(plain.config).to(DT).eval()
    model.load_state_dict(plain.state_dict())
    data = _text_batches(_lm_labels)
    silent = _unlabelled_after_shift(data[0])
    obj = hesse.Objective(model, [silent, *data])
    assert obj.loss is None and obj.loss_source == "model(**batch).loss"
    assert obj.value().item() == pytest.approx(_own_mean(model, data, _shifted_count), rel=1e-6)
    inferred = hesse.Objective(plain, [silent, *data])  # confirmed on the second batch
    assert inferred.loss_source == "inferred from GPT2LMHeadModel: token cross-entropy, shifted"
    assert inferred.value().item() == pytest.approx(obj.value().item() / 2, rel=1e-6)


def test_causal_lm_with_tuple_outputs():
    model = gpt2_lm()
    data = _text_batches(_lm_labels)
    # GPT-2 rejects return_dict=False in its config, so pass it with the batch
    obj = hesse.Objective(model, [dict(b, return_dict=False) for b in data])
    assert obj.value().item() == pytest.approx(_token_mean_by_hand(model, data), rel=RTOL)


def _class_labels(n):
    return lambda ids, mask, gen: torch.randint(0, n, (ids.shape[0],), generator=gen)


def _count_rows(b):
    return b["labels"].shape[0]


def _count_tokens(b):
    return (b["labels"] != -100).sum()


@pytest.mark.parametrize(
    "build, labels, weight, source",
    [
        (
            lambda: bert_classifier(cls=transformers.BertForSequenceClassification, num_labels=3),
            _class_labels(3),
            _count_rows,
            "cross-entropy",
        ),
        (
            lambda: bert_classifier(
                cls=transformers.BertForSequenceClassification, num_labels=3, return_dict=False
            ),
            _class_labels(3),
            _count_rows,
            "cross-entropy",
        ),
        (
            lambda: bert_classifier(cls=transformers.BertForSequenceClassification, num_labels=1),
            lambda ids, mask, gen: torch.randn(ids.shape[0], generator=gen, dtype=DT),
            _count_rows,
            "mean squared error",
        ),
        (
            lambda: bert_classifier(
                cls=transformers.BertForSequenceClassification,
                num_labels=2,
                problem_type="regression",
            ),
            lambda ids, mask, gen: torch.randn(ids.shape[0], 2, generator=gen, dtype=DT),
            _count_rows,
            "mean squared error",
        ),
        (
            lambda: bert_classifier(cls=transformers.BertForTokenClassification, num_labels=4),
            lambda ids, mask, gen: torch.randint(0, 4, ids.shape, generator=gen).masked_fill(
                mask == 0, -100
            ),
            _count_tokens,
            "token cross-entropy",
        ),
        (
            lambda: bert_classifier(cls=transformers.BertForMaskedLM),
            lambda ids, mask, gen: ids.masked_fill(
                torch.rand(ids.shape, generator=gen) < 0.5, -100
            ),
            _count_tokens,
            "token cross-entropy",
        ),
    ],
    ids=["seq-cls", "seq-cls-tuple", "regression", "regression-2", "token-cls", "masked-lm"],
)
def test_hugging_face_losses_are_inferred(build, labels, weight, source):
    model = build()
    data = _text_batches(labels)
    obj = hesse.Objective(model, data)
    assert obj.loss_source == f"inferred from {type(model).__name__}: {source}"
    assert obj.loss is not None
    assert obj.value().item() == pytest.approx(_own_mean(model, data, weight), rel=1e-9)
    hesse.GGNOperator(obj)  # no longer refused for want of a loss of the outputs


def test_multi_label_classifier_keeps_its_own_loss():
    model = bert_classifier(cls=transformers.BertForSequenceClassification, num_labels=3)
    data = _text_batches(lambda ids, m, g: torch.randint(0, 2, (ids.shape[0], 3)).to(DT))
    obj = hesse.Objective(model, data)
    assert obj.loss is None and obj.loss_spec is None
    assert obj.loss_source == "model(**batch).loss"
    assert obj.value().item() == pytest.approx(_own_mean(model, data, _count_rows))
    with pytest.raises(ValueError, match="loss="):
        hesse.GGNOperator(obj)


def test_a_subclass_with_another_loss_is_not_mistaken():
    class Scaled(transformers.BertForSequenceClassification):
        def forward(self, labels=None, **inputs):
            out = super().forward(labels=labels, **inputs)
            if labels is not None:
                out["loss"] = 2 * out["loss"]
            return out

    torch.manual_seed(0)
    model = bert_classifier(cls=Scaled, num_labels=3)
    data = _text_batches(_class_labels(3))
    obj = hesse.Objective(model, data)
    assert obj.loss is None and obj.loss_source == "model(**batch).loss"
    assert obj.value().item() == pytest.approx(_own_mean(model, data, _count_rows))


def test_test_models_are_copies_that_tests_may_change():
    # the builders were cached: every test got the same model object, changes included
    a = bert_classifier()
    a.train()
    with torch.no_grad():
        a.classifier.weight.add_(1.0)
    b = bert_classifier()
    assert a is not b and not b.training
    assert not torch.equal(a.classifier.weight, b.classifier.weight)
    lm = gpt2_lm()
    assert lm.lm_head.weight is lm.transformer.wte.weight  # ties survive the copy

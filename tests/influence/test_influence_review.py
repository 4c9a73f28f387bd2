"""influence() and unlearn() with weighted objectives, loaders, and Hugging Face dict batches.

The objective weighs sample ``i`` by ``w_i / W`` (class weights, counted tokens): scores are
checked against the dense formula and against leave-one-out retraining of that objective
(sample ``i``'s term dropped, ``W`` kept), by Newton's method.
"""

import pytest
import torch
import torch.nn.functional as F
from influence_problems import DT, blobs, flat, load, newton
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hesse.influence import influence, unlearn
from hf_models import bert_classifier, classifier_batches

LAM = 0.1
CLASS_WEIGHTS = torch.tensor([1.0, 5.0, 0.2], dtype=DT)
IGNORE = -100


class TokenLinear(nn.Module):
    """Per-token logits ``(n, C, T)`` of inputs ``(n, T, f)``: what a token loss reads."""

    def __init__(self, features: int = 3, classes: int = 3):
        super().__init__()
        self.lin = nn.Linear(features, classes)

    def forward(self, x):
        return self.lin(x).transpose(1, 2)


def logits(theta, x, classes=3):
    k = classes * x.shape[-1]
    return x @ theta[:k].reshape(classes, -1).T + theta[k:]


def class_weighted_terms(theta, x, y):
    """``(n,)`` each sample's term ``w_i l_i`` of a class-weighted cross-entropy's sum."""
    return CLASS_WEIGHTS[y] * F.cross_entropy(logits(theta, x), y, reduction="none")


def token_terms(theta, x, y):
    """``(n,)`` each sequence's sum of token cross-entropies over the labels that are not -100."""
    return F.cross_entropy(logits(theta, x).transpose(1, 2), y, reduction="none").sum(1)


def tokens(n: int, seed: int):
    """Sequences of 4 tokens ``(n, 4, 3)``, labels with -100 (sample 1 has none counted)."""
    g = torch.Generator().manual_seed(seed)
    x, y = blobs(4 * n, seed=seed)
    y = y[torch.randperm(4 * n, generator=g)].reshape(n, 4)
    y[torch.rand(n, 4, generator=g) < 0.3] = IGNORE
    y[1] = IGNORE
    return x.reshape(n, 4, 3), y


def case(name: str):
    """``(model, loss, terms, weights, (x, y), (xq, yq))`` of a weighted problem."""
    if name == "class_weighted":
        train, query = blobs(150), blobs(12, seed=5)
        model = nn.Linear(3, 3).to(DT)
        return model, nn.CrossEntropyLoss(weight=CLASS_WEIGHTS), class_weighted_terms, train, query
    train, query = tokens(150, 0), tokens(6, 5)
    return TokenLinear().to(DT), F.cross_entropy, token_terms, train, query


def weights_of(name, y):
    return CLASS_WEIGHTS[y] if name == "class_weighted" else (y != IGNORE).sum(1).to(DT)


@pytest.fixture(scope="module", params=["class_weighted", "tokens"])
def weighted(request):
    """The trained problem: theta minimizes ``sum_i terms_i / W + LAM / 2 |theta|^2``."""
    name = request.param
    model, loss, terms, (x, y), (xq, yq) = case(name)
    W = float(weights_of(name, y).sum())

    def objective(theta, keep=None):
        t = terms(theta, x, y)
        return (t if keep is None else keep * t).sum() / W + LAM / 2 * theta @ theta

    theta = newton(objective, torch.zeros(12, dtype=DT))
    load(model.lin if name == "tokens" else model, theta).eval()
    return name, model, loss, terms, objective, theta, (x, y), (xq, yq)


def query_losses(terms, name, theta, xq, yq):
    w = weights_of(name, yq)
    return terms(theta, xq, yq) / torch.where(w > 0, w, 1.0)


def test_weighted_scores_equal_the_dense_formula(weighted):
    name, model, loss, terms, objective, theta, (x, y), (xq, yq) = weighted
    H = torch.func.hessian(objective)(theta)  # of the data term plus LAM I
    G = torch.func.jacrev(terms)(theta, x, y)  # rows: gradients of w_i l_i
    Gq = torch.func.jacrev(query_losses, argnums=2)(terms, name, theta, xq, yq)
    want = Gq @ torch.linalg.solve(H, G.T) / weights_of(name, y).sum()
    r = influence(
        model, [(x[:40], y[:40]), (x[40:], y[40:])], [(xq, yq)], loss, ihvp="exact", damping=LAM
    )
    assert (r.scores - want).norm() <= 1e-10 * want.norm()
    assert torch.equal(r.train_weights, weights_of(name, y))
    assert torch.allclose(r.train_losses, query_losses(terms, name, theta, x, y), atol=1e-12)
    if name == "tokens":  # a sample with every label ignored is not in the objective
        assert torch.equal(r.scores[:, 1], torch.zeros(6, dtype=DT))
        assert r.train_losses[1] == 0 and r.query_losses[1] == 0
        assert torch.equal(r.scores[1], torch.zeros(150, dtype=DT))


def test_weighted_scores_predict_leave_one_out_retraining(weighted):
    name, model, loss, terms, objective, theta, (x, y), (xq, yq) = weighted
    r = influence(model, [(x, y)], [(xq, yq)], loss, ihvp="cg", damping=LAM)
    n = len(y)
    removed = torch.arange(0, n, 5)
    before = float(query_losses(terms, name, theta, xq, yq).mean())
    actual = []
    for i in removed:
        keep = torch.ones(n, dtype=DT)
        keep[i] = 0.0  # its term w_i l_i / W dropped: the stated convention
        retrained = newton(lambda t, keep=keep: objective(t, keep), theta)
        actual.append(float(query_losses(terms, name, retrained, xq, yq).mean()) - before)
    predicted = r.scores.mean(0)[removed]
    actual = torch.tensor(actual, dtype=DT)
    assert stats.pearsonr(predicted, actual)[0] >= 0.999
    assert float(predicted @ actual / (actual @ actual)) == pytest.approx(1.0, abs=0.03)


def test_woodbury_inverts_the_fisher_of_the_weighted_objective(weighted):
    name, model, loss, terms, objective, theta, (x, y), (xq, yq) = weighted
    a = influence(model, [(x, y)], [(xq, yq)], loss, ihvp="woodbury", damping=0.1)
    b = influence(model, [(x, y)], [(xq, yq)], loss, ihvp="exact", damping=0.1, curvature="fisher")
    assert (a.scores - b.scores).norm() <= 1e-9 * b.scores.norm()


def test_shuffling_loader_is_refused():
    x, y = blobs(40)
    model = nn.Linear(3, 3).to(DT).eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    with pytest.raises(ValueError, match=r"influence: the training samples .*shuffles"):
        influence(model, loader, [(x[:2], y[:2])], F.cross_entropy, damping=1.0)
    with pytest.raises(ValueError, match=r"influence: the query samples .*shuffles"):
        influence(model, [(x, y)], loader, F.cross_entropy, damping=1.0)


def test_columns_and_rows_are_samples_in_dataset_order():
    x, y = blobs(40)
    model = nn.Linear(3, 3).to(DT).eval()
    g = torch.Generator().manual_seed(0)
    order, query_order = (
        torch.randperm(40, generator=g).tolist(),
        torch.randperm(10, generator=g).tolist(),
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=16, sampler=order)  # fixed, not sorted
    queries = DataLoader(TensorDataset(x[:10], y[:10]), batch_size=4, sampler=query_order)
    want = influence(model, [(x, y)], [(x[:10], y[:10])], F.cross_entropy, damping=1.0)
    r = influence(model, loader, queries, F.cross_entropy, damping=1.0)
    assert (r.scores - want.scores).abs().max() <= 1e-12 * want.scores.abs().max()
    assert torch.allclose(r.train_losses, want.train_losses, atol=1e-14)


def test_iau_step_is_weighted_by_the_forget_sets_share_of_the_objective():
    x, y = blobs(60)
    W = CLASS_WEIGHTS[y].sum()

    def full(theta):
        return class_weighted_terms(theta, x, y).sum() / W + LAM / 2 * theta @ theta

    theta = newton(full, torch.zeros(12, dtype=DT))
    model = load(nn.Linear(3, 3).to(DT), theta).eval()
    loss = nn.CrossEntropyLoss(weight=CLASS_WEIGHTS)
    gone = torch.zeros(60, dtype=torch.bool)
    gone[[1, 4, 7, 10, 0]] = True  # classes 1, 1, 1, 1, 0: W_F / W = 21 / 124, n_F / n = 5 / 60
    forget, remain = [(x[gone], y[gone])], [(x[~gone], y[~gone])]
    r = unlearn(model, forget, remain, loss, method="iau", weight_decay=LAM, lr=1.0)
    # at the minimum of the full objective, grad R = (W_F / W) d: lr=1 is the gradient step
    w_r = CLASS_WEIGHTS[y[~gone]].sum()
    grad_r = torch.func.grad(
        lambda t: class_weighted_terms(t, x[~gone], y[~gone]).sum() / w_r + LAM / 2 * t @ t
    )(theta)
    assert (r.delta + grad_r).norm() <= 1e-10 * grad_r.norm()
    assert torch.allclose(flat(r.model), theta - grad_r, atol=1e-12)


def test_influence_on_a_bert_classifier_with_padded_dict_batches():
    model = bert_classifier()  # default attention: vmap cannot run it, the loop does
    train, query = classifier_batches(), classifier_batches((3,), (6,), seed=1)
    r = influence(model, train, query, ihvp="woodbury", damping=0.1)

    def rows(batches):
        out = []
        for b in batches:
            for j in range(len(b["labels"])):
                model.zero_grad()
                mask = b["attention_mask"][j : j + 1]
                out_j = model(input_ids=b["input_ids"][j : j + 1], attention_mask=mask)
                F.cross_entropy(out_j.logits, b["labels"][j : j + 1]).backward()
                out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        return torch.stack(out)

    G, Gq = rows(train), rows(query)
    n = G.shape[0]
    # (0.1 I + G^T G / n)^{-1} by the push-through identity: no d x d matrix
    small = torch.linalg.solve(n * 0.1 * torch.eye(n, dtype=DT) + G @ G.T, G @ Gq.T)
    X = (Gq.T - G.T @ small) / 0.1
    want = (G @ X).T / n
    assert r.scores.shape == (3, 10) and r.converged
    assert (r.scores - want).norm() <= 1e-10 * want.norm()

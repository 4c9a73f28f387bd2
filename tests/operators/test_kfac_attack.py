"""Independent attacks on KFACOperator / EKFACOperator against hand-built float64 factors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from hesse import EKFACOperator, KFACOperator, Objective, reference

D = torch.float64


def _hess_vectors(f, y, loss):
    """Vectors s with sum s s^T = Hessian of the row's sum-form loss, and the row's weight."""
    if loss == "mse":
        k = f[0].numel()
        vecs = []
        for c in range(k):
            s = torch.zeros_like(f)
            s.view(-1)[c] = math.sqrt(2.0 / k)
            vecs.append(s)
        return vecs, 1.0
    cw, eps = (loss, 0.0) if not isinstance(loss, tuple) else loss
    logits = f.detach()
    if logits.dim() == 2:
        logits, y = logits.unsqueeze(-1), y.view(1, 1)
    p = logits.softmax(1)
    vecs, weight = [], 0.0
    for t in range(logits.shape[2]):
        label = int(y.view(-1)[t])
        w_y = 0.0 if label == -100 else (1.0 if cw is None else float(cw[label]))
        w_all = logits.shape[1] if cw is None else float(cw.sum())
        scale = 0.0 if label == -100 else (1 - eps) * w_y + eps / logits.shape[1] * w_all
        weight += w_y
        for c in range(logits.shape[1]):
            s = torch.zeros_like(logits)
            e = torch.zeros(logits.shape[1], dtype=D)
            e[c] = 1.0
            s[0, :, t] = math.sqrt(scale * float(p[0, c, t])) * (e - p[0, :, t])
            vecs.append(s.view_as(f))
    return vecs, weight


def _rows(module, inp, out_grad):
    """(a rows with a 1 appended, g rows) of one call of a Linear or Conv2d."""
    if isinstance(module, nn.Conv2d):
        a = F.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride)
        a = a.transpose(1, 2).reshape(-1, a.shape[1])
        g = out_grad.flatten(2).transpose(1, 2).reshape(-1, out_grad.shape[1])
    else:
        a, g = inp.reshape(-1, inp.shape[-1]), out_grad.reshape(-1, out_grad.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=D)], 1)
    return a, g


def reference_factors(model, batches, loss, layers):
    """Hand-built KFAC factors (G, A) and the exact GGN block per layer (M layout)."""
    store = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, (i[0], o)))
        for n, m in layers.items()
    ]
    acc = {n: [0.0, 0.0, 0, 0.0] for n in layers}  # G, A, N, exact block
    total = 0.0
    for x, y in batches:
        for n in range(x.shape[0]):
            f = model(x[n : n + 1])
            vecs, weight = _hess_vectors(f, y[n : n + 1], loss)
            total += weight
            outs = [store[k][1] for k in layers]
            per_vec = [torch.autograd.grad(f, outs, s, retain_graph=True) for s in vecs]
            for i, (name, m) in enumerate(layers.items()):
                a = None
                reached = None
                for grads in per_vec:
                    a, g = _rows(m, store[name][0].detach(), grads[i])
                    acc[name][0] = acc[name][0] + g.T @ g
                    grad_m = (g.T @ a).flatten()
                    acc[name][3] = acc[name][3] + torch.outer(grad_m, grad_m)
                    hit = g.abs().amax(1) > 0
                    reached = hit if reached is None else reached | hit
                acc[name][1] = acc[name][1] + a[reached].T @ a[reached]
                acc[name][2] += int(reached.sum())
    for h in hooks:
        h.remove()
    return {n: (G / total, A / N, E / total) for n, (G, A, N, E) in acc.items()}


def _perm(module):
    """Index in the flat (weight, bias) layout of each entry of M = [W | b] (row-major)."""
    w = module.weight
    out, inn = w.shape[0], w[0].numel()
    cols = inn + (module.bias is not None)
    idx = []
    for i in range(out):
        for j in range(cols):
            idx.append(i * inn + j if j < inn else out * inn + i)
    return torch.tensor(idx)


def _to_param_layout(block, module):
    p = _perm(module)
    out = torch.zeros_like(block)
    out[p[:, None], p[None, :]] = block
    return out


def _offset(obj, name):
    return obj.space.slices()[f"{name}.weight" if name else "weight"].start


def reference_kfac_dense(obj, model, batches, loss, layers, which="kfac"):
    """The dense block-diagonal reference in obj's order (0 off the layers' blocks)."""
    facs = reference_factors(model, batches, loss, layers)
    K = torch.zeros(obj.dim, obj.dim, dtype=D)
    for name, (G, A, E) in facs.items():
        block = torch.kron(G, A) if which == "kfac" else E
        blk = _to_param_layout(block, layers[name])
        s = _offset(obj, name)
        K[s : s + blk.shape[0], s : s + blk.shape[0]] = blk
    return K, facs


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _mlp(seed=0, sizes=(3, 4, 3)):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double().eval()


def _uneven(n_in=3, classes=3, sizes=(5, 2, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, n_in, dtype=D, generator=g), torch.randint(0, classes, (s,), generator=g))
        for s in sizes
    ]


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


# --- the reference itself is right: its exact blocks are dense_ggn's ---------------------


def test_reference_exact_blocks_match_dense_ggn():
    model, data = _mlp(), _uneven()
    cw = torch.tensor([0.5, 2.0, 1.3], dtype=D)
    obj = Objective(model, data, loss=nn.CrossEntropyLoss(weight=cw))
    E, _ = reference_kfac_dense(obj, model, data, cw, _linears(model), which="exact")
    G = reference.dense_ggn(obj)
    mask = E != 0
    assert torch.allclose(E[mask], G[mask], atol=1e-12, rtol=1e-10)


# --- KFAC matrix against the hand-built factors -------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_kfac_mlp_uneven_batches_class_weights(weighted):
    model, data = _mlp(), _uneven()
    cw = torch.tensor([0.5, 2.0, 1.3], dtype=D) if weighted else None
    loss = nn.CrossEntropyLoss(weight=cw) if weighted else nn.CrossEntropyLoss()
    obj = Objective(model, data, loss=loss)
    ref, _ = reference_kfac_dense(obj, model, data, cw, _linears(model))
    K = KFACOperator(obj).to_dense()
    assert _rel(K, ref) < 1e-10


def test_kfac_batching_does_not_matter():
    model, data = _mlp(), _uneven()
    one = [(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))]
    K1 = KFACOperator(Objective(model, data, loss=F.cross_entropy)).to_dense()
    K2 = KFACOperator(Objective(model, one, loss=F.cross_entropy)).to_dense()
    assert _rel(K1, K2) < 1e-12


def test_kfac_mse_multi_output():
    model = _mlp(sizes=(3, 4, 2))
    g = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(s, 3, dtype=D, generator=g), torch.randn(s, 2, dtype=D, generator=g))
        for s in (4, 3)
    ]
    obj = Objective(model, data, loss=F.mse_loss)
    ref, _ = reference_kfac_dense(obj, model, data, "mse", _linears(model))
    assert _rel(KFACOperator(obj).to_dense(), ref) < 1e-10


class _TokenMLP(nn.Module):
    """Per-position MLP on (n, T, d) giving (n, C, T) logits: one loss term per sample."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))).transpose(1, 2)


def test_kfac_token_model_ignored_labels():
    torch.manual_seed(0)
    model = _TokenMLP().double().eval()
    g = torch.Generator().manual_seed(4)
    data = []
    for s in (3, 2):
        x = torch.randn(s, 4, 3, dtype=D, generator=g)
        y = torch.randint(0, 3, (s, 4), generator=g)
        y[0, 1:] = -100
        y[-1, 0] = -100
        data.append((x, y))
    cw = torch.tensor([1.0, 0.3, 2.0], dtype=D)
    obj = Objective(model, data, loss=nn.CrossEntropyLoss(weight=cw))
    ref, _ = reference_kfac_dense(obj, model, data, cw, _linears(model))
    assert _rel(KFACOperator(obj).to_dense(), ref) < 1e-10
    # the per-position GGN blocks equal KFAC's only in the aggregate; check the exact one too
    E, _ = reference_kfac_dense(obj, model, data, cw, _linears(model), which="exact")
    G = reference.dense_ggn(obj)
    assert torch.allclose(E[E != 0], G[E != 0], atol=1e-12)


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.spare, self.fc2 = nn.Linear(3, 4), nn.Linear(2, 2), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_kfac_parameter_never_reached():
    torch.manual_seed(0)
    model = _Unused().double().eval()
    data = _uneven()
    obj = Objective(model, data, loss=F.cross_entropy)
    K = KFACOperator(obj)
    assert K.shape == (obj.dim, obj.dim)
    layers = {"fc1": model.fc1, "fc2": model.fc2}
    ref, _ = reference_kfac_dense(obj, model, data, None, layers)
    assert _rel(K.to_dense(), ref) < 1e-10


def test_kfac_frozen_layer():
    model, data = _mlp(sizes=(3, 4, 4, 3)), _uneven()
    for p in model[0].parameters():
        p.requires_grad_(False)
    obj = Objective(model, data, loss=F.cross_entropy)
    assert obj.dim == sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = {"2": model[2], "4": model[4]}
    ref, _ = reference_kfac_dense(obj, model, data, None, layers)
    assert _rel(KFACOperator(obj).to_dense(), ref) < 1e-10


def test_kfac_float32_model_close_to_float64():
    model, data = _mlp(), _uneven()
    m32 = _mlp().float()
    d32 = [(x.float(), y) for x, y in data]
    K64 = KFACOperator(Objective(model, data, loss=F.cross_entropy))
    K32 = KFACOperator(Objective(m32, d32, loss=F.cross_entropy))
    assert K32.dtype == torch.float32
    assert _rel(K32.to_dense().double(), K64.to_dense()) < 1e-5
    # a float32 model analysed in float64 is the float64 matrix
    K = KFACOperator(Objective(m32, data, loss=F.cross_entropy, dtype=D))
    assert _rel(K.to_dense(), K64.to_dense()) < 1e-6


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean((2, 3)))


def test_kfac_conv2d_expand():
    torch.manual_seed(0)
    model = _ConvNet().double().eval()
    g = torch.Generator().manual_seed(5)
    data = [
        (torch.randn(s, 2, 5, 5, dtype=D, generator=g), torch.randint(0, 3, (s,), generator=g))
        for s in (3, 2)
    ]
    obj = Objective(model, data, loss=F.cross_entropy)
    ref, _ = reference_kfac_dense(obj, model, data, None, _linears(model))
    assert _rel(KFACOperator(obj, approx="expand").to_dense(), ref) < 1e-10


# --- algebra of the operator against its dense matrix ---------------------------------------


@pytest.fixture
def kfac():
    model, data = _mlp(sizes=(3, 4, 3)), _uneven()
    obj = Objective(model, data, loss=F.cross_entropy)
    return obj, KFACOperator(obj)


@pytest.mark.parametrize("damping", [1e-3, 0.7])
def test_inverse_logdet_trace_eigenvalues(kfac, damping):
    obj, K = kfac
    Kd = K.to_dense()
    eye = torch.eye(obj.dim, dtype=D)
    v = torch.randn(obj.dim, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    x = K.inverse(damping) @ v
    assert _rel(x, torch.linalg.solve(Kd + damping * eye, v)) < 1e-9
    assert abs(K.logdet(damping) - float(torch.linalg.slogdet(Kd + damping * eye)[1])) < 1e-8
    assert abs(K.trace() - float(Kd.trace())) < 1e-12
    ev = torch.linalg.eigvalsh(Kd).flip(0)
    assert torch.allclose(K.eigenvalues(), ev, atol=1e-12)
    assert _rel(K @ v, Kd @ v) < 1e-13


def test_restrict_and_blocks_match_dense(kfac):
    obj, K = kfac
    Kd = K.to_dense()
    sl = obj.space.slices()["2.weight"]
    R = K.restrict(["2.weight"]).to_dense()
    assert torch.allclose(R, Kd[sl, sl], atol=1e-14)
    blocks = K.blocks(by="module")
    assert set(blocks) == {"0", "2"}
    for name, B in blocks.items():
        idx = [
            i
            for n in (name + ".weight", name + ".bias")
            for i in range(obj.dim)[obj.space.slices()[n]]
        ]
        idx = torch.tensor(idx)
        assert torch.allclose(B.to_dense(), Kd[idx[:, None], idx[None, :]], atol=1e-14)
    P = K.blocks(by="param")
    for name, B in P.items():
        s = obj.space.slices()[name]
        assert torch.allclose(B.to_dense(), Kd[s, s], atol=1e-14)


# --- EKFAC: scalings are diag(Q^T G Q) in the basis of my own factors ---------------------------


def test_ekfac_single_linear_scalings():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double().eval()
    data = _uneven(n_in=3, classes=4, sizes=(6, 4))
    obj = Objective(model, data, loss=F.cross_entropy)
    _, facs = reference_kfac_dense(obj, model, data, None, {"": model})
    G, A, Gex = facs[""]
    QG, QA = torch.linalg.eigh(G)[1], torch.linalg.eigh(A)[1]
    Q = torch.kron(QG, QA)
    S = torch.diagonal(Q.T @ Gex @ Q)
    ref = _to_param_layout(Q @ torch.diag(S) @ Q.T, model)
    E = EKFACOperator(obj)
    assert _rel(E.to_dense(), ref) < 1e-9
    # the exact GGN block is that of dense_ggn, and EKFAC is no further from it than KFAC
    Gd = reference.dense_ggn(obj)
    assert _rel(_to_param_layout(Gex, model), Gd) < 1e-12
    assert _rel(E.to_dense(), Gd) <= _rel(KFACOperator(obj).to_dense(), Gd) + 1e-12


def test_ekfac_mlp_trace_equals_ggn_block_traces():
    model, data = _mlp(), _uneven()
    obj = Objective(model, data, loss=F.cross_entropy)
    E = EKFACOperator(obj)
    Ed, Gd = E.to_dense(), reference.dense_ggn(obj)
    for name in ("0", "2"):
        idx = torch.cat(
            [torch.arange(obj.dim)[obj.space.slices()[name + s]] for s in (".weight", ".bias")]
        )
        assert abs(float(Ed[idx][:, idx].trace() - Gd[idx][:, idx].trace())) < 1e-12
    damping = 0.1
    eye = torch.eye(obj.dim, dtype=D)
    v = torch.randn(obj.dim, dtype=D)
    assert _rel(E.inverse(damping) @ v, torch.linalg.solve(Ed + damping * eye, v)) < 1e-9
    assert abs(E.logdet(damping) - float(torch.linalg.slogdet(Ed + damping * eye)[1])) < 1e-8


# --- curvature_gap where K is the GGN ------------------------------------------------------------


def test_curvature_gap_exact_single_layer():
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double().eval()
    g = torch.Generator().manual_seed(6)
    data = [
        (torch.randn(s, 4, dtype=D, generator=g), torch.randn(s, 1, dtype=D, generator=g))
        for s in (5, 3)
    ]
    obj = Objective(model, data, loss=F.mse_loss)
    K = KFACOperator(obj)
    assert _rel(K.to_dense(), reference.dense_ggn(obj)) < 1e-12
    gap = hesse.curvature_gap(obj, K, k=3, method="exact")
    assert float(gap.eigenvalue_errors.abs().max()) < 1e-8
    assert float(gap.principal_angles.abs().max()) < 1e-5
    assert abs(gap.whole.relative_frobenius) < 1e-8


def test_curvature_gap_deep_linear_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(2, 1)).double().eval()
    g = torch.Generator().manual_seed(7)
    data = [
        (torch.randn(s, 3, dtype=D, generator=g), torch.randn(s, 1, dtype=D, generator=g))
        for s in (4, 3)
    ]
    obj = Objective(model, data, loss=F.mse_loss)
    K = KFACOperator(obj)
    Kd, Gd = K.to_dense(), reference.dense_ggn(obj)
    assert _rel(Kd, torch.block_diag(*[Gd[s, s] for s in _module_slices(obj)])) < 1e-10
    gap = hesse.curvature_gap(obj, K, k=2, method="exact")
    for name, b in gap.blocks.items():
        assert abs(b.relative_frobenius) < 1e-8, name
        assert abs(b.trace.value) < 1e-10, name
    assert gap.whole.relative_frobenius > 0.01  # the cross-layer blocks are missing


def _module_slices(obj):
    names = obj.space.names
    out = []
    for i in range(0, len(names), 2):
        a, b = obj.space.slices()[names[i]], obj.space.slices()[names[i + 1]]
        out.append(slice(a.start, b.stop))
    return out


# --- second round: reduce, empirical, partial selections, EKFAC on tokens ------------------------


def reference_reduce(model, batches, layers):
    """KFAC-reduce factors for cross-entropy: inputs averaged, gradients summed per sample."""
    store = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, (i[0], o)))
        for n, m in layers.items()
    ]
    acc = {n: [0.0, 0.0, 0] for n in layers}
    total = 0.0
    for x, y in batches:
        for n in range(x.shape[0]):
            f = model(x[n : n + 1])
            vecs, weight = _hess_vectors(f, y[n : n + 1], None)
            total += weight
            outs = [store[k][1] for k in layers]
            for s in vecs:
                grads = torch.autograd.grad(f, outs, s, retain_graph=True)
                for i, (name, m) in enumerate(layers.items()):
                    a, g = _rows(m, store[name][0].detach(), grads[i])
                    gs = g.sum(0)
                    acc[name][0] = acc[name][0] + torch.outer(gs, gs)
            for name, m in layers.items():
                a, _ = _rows(m, store[name][0].detach(), torch.zeros_like(store[name][1]))
                am = a.mean(0)
                acc[name][1] = acc[name][1] + torch.outer(am, am)
                acc[name][2] += 1
    for h in hooks:
        h.remove()
    return {n: (G / total, A / N) for n, (G, A, N) in acc.items()}


def _conv_data(sizes=(3, 2), seed=5):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, 2, 5, 5, dtype=D, generator=g), torch.randint(0, 3, (s,), generator=g))
        for s in sizes
    ]


def test_kfac_conv2d_reduce():
    torch.manual_seed(0)
    model = _ConvNet().double().eval()
    data = _conv_data()
    obj = Objective(model, data, loss=F.cross_entropy)
    facs = reference_reduce(model, data, _linears(model))
    ref = torch.zeros(obj.dim, obj.dim, dtype=D)
    for name, (G, A) in facs.items():
        blk = _to_param_layout(torch.kron(G, A), _linears(model)[name])
        s = _offset(obj, name)
        ref[s : s + blk.shape[0], s : s + blk.shape[0]] = blk
    assert _rel(KFACOperator(obj, approx="reduce").to_dense(), ref) < 1e-10


def test_kfac_empirical_weighted():
    model, data = _mlp(), _uneven()
    cw = torch.tensor([0.5, 2.0, 1.3], dtype=D)
    obj = Objective(model, data, loss=nn.CrossEntropyLoss(weight=cw))
    layers = _linears(model)
    store = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, (i[0], o)))
        for n, m in layers.items()
    ]
    G = {n: 0.0 for n in layers}
    A = {n: 0.0 for n in layers}
    count, total = 0, 0.0
    for x, y in data:
        for n in range(x.shape[0]):
            f = model(x[n : n + 1])
            w = float(cw[y[n]])
            r = w * (f.detach().softmax(1) - F.one_hot(y[n : n + 1], 3))
            grads = torch.autograd.grad(f, [store[k][1] for k in layers], r)
            for i, (name, m) in enumerate(layers.items()):
                a, g = _rows(m, store[name][0].detach(), grads[i])
                G[name] = G[name] + g.T @ g
                A[name] = A[name] + a.T @ a
            total += w
            count += 1
    for h in hooks:
        h.remove()
    ref = torch.zeros(obj.dim, obj.dim, dtype=D)
    for name, m in layers.items():
        blk = _to_param_layout(torch.kron(G[name] / total, A[name] / count), m)
        s = _offset(obj, name)
        ref[s : s + blk.shape[0], s : s + blk.shape[0]] = blk
    assert _rel(KFACOperator(obj, kind="empirical").to_dense(), ref) < 1e-10


def test_ekfac_empirical_single_layer_matches_empirical_fisher():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double().eval()
    data = _uneven(n_in=3, classes=4, sizes=(6, 4))
    obj = Objective(model, data, loss=F.cross_entropy)
    E = EKFACOperator(obj, kind="empirical")
    Fe = hesse.FisherOperator(obj, kind="empirical").to_dense()
    K = KFACOperator(obj, kind="empirical")
    # same trace as the empirical Fisher, and EKFAC no further from it than KFAC
    assert abs(E.trace() - float(Fe.trace())) < 1e-12
    assert _rel(E.to_dense(), Fe) <= _rel(K.to_dense(), Fe) + 1e-12


def test_kfac_weight_only_selection():
    """Only the weights selected: A has no ones column, the biases are not in the space."""
    model, data = _mlp(), _uneven()
    obj = Objective(model, data, loss=F.cross_entropy, params=["0.weight", "2.weight"])
    assert obj.space.names == ["0.weight", "2.weight"]
    K = KFACOperator(obj).to_dense()
    _, facs = reference_kfac_dense(
        Objective(model, data, loss=F.cross_entropy), model, data, None, _linears(model)
    )
    blocks = [torch.kron(G, A[:-1, :-1]) for G, A, _ in facs.values()]
    assert _rel(K, torch.block_diag(*blocks)) < 1e-10


def test_kfac_bias_only_selection():
    model, data = _mlp(), _uneven()
    obj = Objective(model, data, loss=F.cross_entropy, params=["0.bias", "2.bias"])
    K = KFACOperator(obj).to_dense()
    _, facs = reference_kfac_dense(
        Objective(model, data, loss=F.cross_entropy), model, data, None, _linears(model)
    )
    blocks = [G * A[-1, -1] for G, A, _ in facs.values()]
    assert _rel(K, torch.block_diag(*blocks)) < 1e-10


def test_ekfac_token_model_ignored_labels():
    torch.manual_seed(0)
    model = _TokenMLP().double().eval()
    g = torch.Generator().manual_seed(4)
    data = []
    for s in (3, 2):
        x = torch.randn(s, 4, 3, dtype=D, generator=g)
        y = torch.randint(0, 3, (s, 4), generator=g)
        y[0, 1:] = -100
        data.append((x, y))
    cw = torch.tensor([1.0, 0.3, 2.0], dtype=D)
    obj = Objective(model, data, loss=nn.CrossEntropyLoss(weight=cw))
    layers = _linears(model)
    _, facs = reference_kfac_dense(obj, model, data, cw, layers)
    ref = torch.zeros(obj.dim, obj.dim, dtype=D)
    for name, (G, A, Gex) in facs.items():
        Q = torch.kron(torch.linalg.eigh(G)[1], torch.linalg.eigh(A)[1])
        S = torch.diagonal(Q.T @ Gex @ Q)
        blk = _to_param_layout(Q @ torch.diag(S) @ Q.T, layers[name])
        s = _offset(obj, name)
        ref[s : s + blk.shape[0], s : s + blk.shape[0]] = blk
    assert _rel(EKFACOperator(obj).to_dense(), ref) < 1e-9


def test_layernorm_dense_block_is_ggn_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
    model = model.double().eval()
    data = _uneven()
    obj = Objective(model, data, loss=F.cross_entropy)
    K, G = KFACOperator(obj).to_dense(), reference.dense_ggn(obj)
    sl = obj.space.slices()
    idx = torch.cat([torch.arange(obj.dim)[sl[n]] for n in ("1.weight", "1.bias")])
    assert torch.allclose(K[idx][:, idx], G[idx][:, idx], atol=1e-13)
    others = torch.ones(obj.dim, dtype=torch.bool)
    others[idx] = False
    assert K[idx][:, others].abs().max() == 0
    for op in (KFACOperator(obj), EKFACOperator(obj)):
        Kd, eye = op.to_dense(), torch.eye(obj.dim, dtype=D)
        v = torch.randn(obj.dim, dtype=D, generator=torch.Generator().manual_seed(1))
        assert _rel(op.inverse(0.05) @ v, torch.linalg.solve(Kd + 0.05 * eye, v)) < 1e-9
        assert abs(op.logdet(0.05) - float(torch.linalg.slogdet(Kd + 0.05 * eye)[1])) < 1e-8
        assert torch.allclose(op.eigenvalues(), torch.linalg.eigvalsh(Kd).flip(0), atol=1e-12)


def test_singular_refused_without_damping_and_logdet_minus_inf():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double().eval()
    data = [(torch.randn(1, 3, dtype=D), torch.tensor([1]))]  # rank-1 A: singular
    obj = Objective(model, data, loss=F.cross_entropy)
    K = KFACOperator(obj)
    with pytest.raises(ValueError):
        K.inverse(0.0) @ torch.ones(obj.dim, dtype=D)
    assert K.logdet() == -math.inf
    ev = K.eigenvalues()
    assert (ev >= 0).all() and int((ev > 0).sum()) == int(torch.linalg.matrix_rank(K.to_dense()))


def test_kfac_mc_many_draws_close_to_exact():
    model, data = _mlp(), _uneven()
    obj = Objective(model, data, loss=F.cross_entropy)
    Ke = KFACOperator(obj).to_dense()
    Km = KFACOperator(obj, kind="mc", mc_samples=1000, seed=1).to_dense()
    assert _rel(Km, Ke) < 0.05


def test_curvature_gap_by_param_and_restrict_prefix(kfac):
    obj, K = kfac
    Kd = K.to_dense()
    R = K.restrict(["0"]).to_dense()
    idx = torch.cat([torch.arange(obj.dim)[obj.space.slices()[n]] for n in ("0.weight", "0.bias")])
    assert torch.allclose(R, Kd[idx][:, idx], atol=1e-14)
    gap = hesse.curvature_gap(K, K, k=2, by="param", method="exact")
    assert set(gap.blocks) == set(obj.space.names)
    assert all(abs(b.relative_frobenius) < 1e-12 for b in gap.blocks.values())


# --- third round: label smoothing, unreached positions, empty batches, EKFAC conv ---------------


def test_kfac_label_smoothing_class_weights_ignored():
    model = _mlp()
    data = _uneven(sizes=(5, 4))
    data[0][1][1] = -100
    cw = torch.tensor([0.5, 2.0, 1.3], dtype=D)
    loss = nn.CrossEntropyLoss(weight=cw, label_smoothing=0.2)
    obj = Objective(model, data, loss=loss)
    E, _ = reference_kfac_dense(obj, model, data, (cw, 0.2), _linears(model), which="exact")
    G = reference.dense_ggn(obj)
    assert torch.allclose(E[E != 0], G[E != 0], atol=1e-12)  # the reference is right
    ref, _ = reference_kfac_dense(obj, model, data, (cw, 0.2), _linears(model))
    assert _rel(KFACOperator(obj).to_dense(), ref) < 1e-10


class _PoolNet(nn.Module):
    """Conv then max-pooling over 2x2 windows: most positions get no gradient at all."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 2)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(F.max_pool2d(self.conv(x), 4).flatten(1))


def test_kfac_conv_maxpool_unreached_positions():
    torch.manual_seed(0)
    model = _PoolNet().double().eval()
    data = _conv_data(sizes=(3, 2))
    obj = Objective(model, data, loss=F.cross_entropy)
    ref, facs = reference_kfac_dense(obj, model, data, None, _linears(model))
    assert _rel(KFACOperator(obj).to_dense(), ref) < 1e-10


def test_kfac_fully_ignored_batch_adds_nothing():
    torch.manual_seed(0)
    model = _TokenMLP().double().eval()
    g = torch.Generator().manual_seed(4)
    data = [
        (torch.randn(s, 4, 3, dtype=D, generator=g), torch.randint(0, 3, (s, 4), generator=g))
        for s in (3, 2)
    ]
    empty = (torch.randn(2, 4, 3, dtype=D, generator=g), torch.full((2, 4), -100))
    K = KFACOperator(Objective(model, data, loss=nn.CrossEntropyLoss())).to_dense()
    for order in ([data[0], empty, data[1]], [empty, *data]):
        K2 = KFACOperator(Objective(model, order, loss=nn.CrossEntropyLoss()))
        assert _rel(K2.to_dense(), K) < 1e-12
    E = EKFACOperator(Objective(model, data, loss=nn.CrossEntropyLoss())).to_dense()
    E2 = EKFACOperator(Objective(model, [empty, *data], loss=nn.CrossEntropyLoss())).to_dense()
    assert _rel(E2, E) < 1e-10


def _ekfac_reference(obj, model, data, loss, layers):
    _, facs = reference_kfac_dense(obj, model, data, loss, layers)
    ref = torch.zeros(obj.dim, obj.dim, dtype=D)
    for name, (G, A, Gex) in facs.items():
        Q = torch.kron(torch.linalg.eigh(G)[1], torch.linalg.eigh(A)[1])
        S = torch.diagonal(Q.T @ Gex @ Q)
        blk = _to_param_layout(Q @ torch.diag(S) @ Q.T, layers[name])
        s = _offset(obj, name)
        ref[s : s + blk.shape[0], s : s + blk.shape[0]] = blk
    return ref


def test_ekfac_conv_expand():
    torch.manual_seed(0)
    model = _ConvNet().double().eval()
    data = _conv_data()
    obj = Objective(model, data, loss=F.cross_entropy)
    ref = _ekfac_reference(obj, model, data, None, _linears(model))
    assert _rel(EKFACOperator(obj).to_dense(), ref) < 1e-9


def test_ekfac_frozen_and_unreached():
    torch.manual_seed(0)
    model = _Unused().double().eval()
    model.fc1.requires_grad_(False)
    data = _uneven()
    obj = Objective(model, data, loss=F.cross_entropy)
    ref = _ekfac_reference(obj, model, data, None, {"fc2": model.fc2})
    assert _rel(EKFACOperator(obj).to_dense(), ref) < 1e-9


def test_negative_damping_refused(kfac):
    _, K = kfac
    with pytest.raises(ValueError):
        K.inverse(-1.0)


class _Twice(nn.Module):
    """One Linear applied twice: its weight is shared between two calls."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


def test_kfac_module_called_twice_is_expand_over_calls():
    """Two calls of one module count as shared positions: one term, rows of both calls."""
    torch.manual_seed(0)
    model = _Twice().double().eval()
    data = _uneven()
    K = KFACOperator(Objective(model, data, loss=F.cross_entropy)).to_dense()
    calls = []
    hook = model.fc.register_forward_hook(lambda m, i, o: calls.append((i[0], o)))
    G, A, N, W = 0.0, 0.0, 0, 0.0
    for x, y in data:
        for n in range(x.shape[0]):
            calls.clear()
            f = model(x[n : n + 1])
            vecs, w = _hess_vectors(f, y[n : n + 1], None)
            W += w
            for s in vecs:
                grads = torch.autograd.grad(f, [c[1] for c in calls], s, retain_graph=True)
                for (inp, _), gr in zip(calls, grads, strict=True):
                    g = _rows(model.fc, inp.detach(), gr)[1]
                    G = G + g.T @ g
            for inp, out in calls:
                a = _rows(model.fc, inp.detach(), out)[0]
                A, N = A + a.T @ a, N + a.shape[0]
    hook.remove()
    assert _rel(K, _to_param_layout(torch.kron(G / W, A / N), model.fc)) < 1e-10


class _ConvVariant(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(
            2, 3, (3, 2), padding=(2, 1), dilation=(1, 2), stride=(2, 1), bias=False
        )
        self.fc = nn.Linear(3, 3, bias=False)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_conv_dilation_stride_no_bias(approx):
    torch.manual_seed(0)
    model = _ConvVariant().double().eval()
    data = _conv_data()
    obj = Objective(model, data, loss=F.cross_entropy)
    layers = _linears(model)
    if approx == "expand":
        ref, _ = reference_kfac_dense(obj, model, data, None, layers)
    else:
        facs = reference_reduce(model, data, layers)
        ref = torch.block_diag(
            *[_to_param_layout(torch.kron(G, A), layers[n]) for n, (G, A) in facs.items()]
        )
    assert _rel(KFACOperator(obj, approx=approx).to_dense(), ref) < 1e-10


def test_ekfac_conv_reduce_basis():
    """EKFAC-reduce: its basis diagonalises my reduce factors, S = diag(Q^T G Q) in it.

    A is singular here, so the basis is checked as hesse chose it, not against my eigh's.
    """
    torch.manual_seed(0)
    model = _ConvNet().double().eval()
    data = _conv_data(sizes=(7, 6))
    obj = Objective(model, data, loss=F.cross_entropy)
    layers = _linears(model)
    red = reference_reduce(model, data, layers)
    _, facs = reference_kfac_dense(obj, model, data, None, layers)
    E = EKFACOperator(obj, approx="reduce")
    blocks = []
    for name, (G, A) in red.items():
        f = E.factors[name]
        for Q, M in ((f.QL, G), (f.QR, A)):
            assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[0], dtype=D), atol=1e-12)
            R = Q.T @ M @ Q
            assert (R - torch.diag(torch.diagonal(R))).abs().max() < 1e-12 * M.norm()
        Q = torch.kron(f.QL, f.QR)
        S = torch.diagonal(Q.T @ facs[name][2] @ Q)
        assert torch.allclose(f.S.flatten(), S, atol=1e-14 + 1e-10 * S.abs().max())
        blocks.append(_to_param_layout(Q @ torch.diag(S) @ Q.T, layers[name]))
    assert _rel(E.to_dense(), torch.block_diag(*blocks)) < 1e-10
    assert torch.allclose(E.eigenvalues(), torch.linalg.eigvalsh(E.to_dense()).flip(0), atol=1e-12)


class _EmbedTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3, padding_idx=0)
        self.fc = nn.Linear(3, 4)

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids))).transpose(1, 2)


def test_kfac_embedding_padding_idx_ignored_labels():
    torch.manual_seed(0)
    model = _EmbedTokens().double().eval()
    ids = [
        torch.tensor([[1, 2, 0, 0], [3, 3, 4, 0], [2, 1, 1, 4]]),
        torch.tensor([[4, 0, 0, 0], [1, 3, 2, 2]]),
    ]
    g = torch.Generator().manual_seed(2)
    data = []
    for x in ids:
        y = torch.randint(0, 4, x.shape, generator=g)
        y[x == 0] = -100
        y[0, 0] = -100
        data.append((x, y))
    obj = Objective(model, data, loss=nn.CrossEntropyLoss())
    store = {}
    hook = model.emb.register_forward_hook(lambda m, i, o: store.__setitem__("e", (i[0], o)))
    G, counts, N, W = 0.0, torch.zeros(5, dtype=D), 0, 0.0
    for x, y in data:
        for n in range(x.shape[0]):
            f = model(x[n : n + 1])
            vecs, w = _hess_vectors(f, y[n : n + 1], None)
            W += w
            reached = torch.zeros(x.shape[1], dtype=torch.bool)
            for s in vecs:
                gr = torch.autograd.grad(f, store["e"][1], s, retain_graph=True)[0][0]
                G = G + gr.T @ gr
                reached |= gr.abs().amax(1) > 0
            tok = x[n][reached & (x[n] != 0)]
            counts += torch.bincount(tok, minlength=5).double()
            N += int(reached.sum())
    hook.remove()
    emb_block = torch.kron(torch.diag(counts / N), G / W)
    sl = obj.space.slices()["emb.weight"]
    K = KFACOperator(obj).to_dense()
    assert _rel(K[sl, sl], emb_block) < 1e-10


# --- fourth round: output shapes, a loss linear in the outputs, hutch++ on an exact K -----------


class _Grid(nn.Module):
    """A Linear on (n, 2, 3, d) inputs: six positions per sample, outputs (n, 2, 3)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)


def test_kfac_mse_multi_dim_outputs_positions():
    torch.manual_seed(0)
    model = _Grid().double().eval()
    g = torch.Generator().manual_seed(8)
    data = [
        (torch.randn(s, 2, 3, 3, dtype=D, generator=g), torch.randn(s, 2, 3, dtype=D, generator=g))
        for s in (3, 2)
    ]
    obj = Objective(model, data, loss=F.mse_loss)
    E, _ = reference_kfac_dense(obj, model, data, "mse", _linears(model), which="exact")
    G = reference.dense_ggn(obj)
    assert torch.allclose(E[E != 0], G[E != 0], atol=1e-12)
    ref, _ = reference_kfac_dense(obj, model, data, "mse", _linears(model))
    assert _rel(KFACOperator(obj).to_dense(), ref) < 1e-10


def test_kfac_scalar_output_per_sample():
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0)).double().eval()
    )
    g = torch.Generator().manual_seed(9)
    data = [
        (torch.randn(s, 3, dtype=D, generator=g), torch.randn(s, dtype=D, generator=g))
        for s in (4, 3)
    ]
    obj = Objective(model, data, loss=F.mse_loss)
    layers = {"0": model[0], "2": model[2]}
    ref, _ = reference_kfac_dense(obj, model, data, "mse", layers)
    assert _rel(KFACOperator(obj).to_dense(), ref) < 1e-10


def test_kfac_nll_on_log_softmax_refused():
    """NLL is linear in its inputs (log-probabilities): kind='exact' is refused by name."""
    torch.manual_seed(0)
    model = nn.Sequential(_mlp(), nn.LogSoftmax(1)).eval()
    obj = Objective(model, _uneven(), loss=F.nll_loss)
    with pytest.raises(ValueError, match="nll"):
        KFACOperator(obj)


def test_kfac_mc_refuses_class_weights():
    obj = Objective(_mlp(), _uneven(), loss=nn.CrossEntropyLoss(weight=torch.ones(3, dtype=D)))
    with pytest.raises(ValueError):
        KFACOperator(obj, kind="mc")


class _ScaledLinear(nn.Linear):
    """A Linear subclass whose forward uses 2 W: G (x) A of the recorded call is then wrong."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


class _InPlaceLater(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc1(x)
        h[:, 0] = 0.0
        return self.fc2(torch.tanh(h))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(_ScaledLinear(3, 4), nn.Tanh(), nn.Linear(4, 3)), "0.weight"),
        (_InPlaceLater(), "fc1"),
    ],
)
def test_kfac_unexplained_gradient_refused(model, match):
    """A subclass using 2 W, an output zeroed in place later: refused, naming the culprit."""
    obj = Objective(model.double().eval(), _uneven(), loss=F.cross_entropy)
    with pytest.raises(ValueError, match=match):
        KFACOperator(obj)


def test_curvature_gap_hutchpp_exact_k():
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double().eval()
    g = torch.Generator().manual_seed(6)
    data = [
        (torch.randn(s, 4, dtype=D, generator=g), torch.randn(s, 1, dtype=D, generator=g))
        for s in (5, 3)
    ]
    obj = Objective(model, data, loss=F.mse_loss)
    gap = hesse.curvature_gap(obj, KFACOperator(obj), k=2, budget=9)
    assert abs(gap.whole.trace.value) < 1e-10 and gap.whole.trace.stderr < 1e-10
    assert gap.whole.relative_frobenius < 1e-6
    assert float(gap.eigenvalue_errors.abs().max()) < 1e-8

"""(4) Logistic regression with huge GD steps, and Normalized LR+GD (Tyurin 2024)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from common import save, table
from sklearn.datasets import load_digits

import hesse

LRS = (0.1, 1.0, 10.0, 100.0, 1000.0)
ITERS = 1000


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits 0 vs 1 (360 images, linearly separable), scaled to [0, 1], labels ±1."""
    x, y = load_digits(n_class=2, return_X_y=True)
    return torch.as_tensor(x, dtype=torch.float64) / 16, torch.as_tensor(y * 2 - 1.0).double()


def small_margin() -> tuple[torch.Tensor, torch.Tensor]:
    """200 points uniform in [-1, 1]^2, labels sign(x1 + 0.3 x2), margin >= 0.02 (a hard set)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 2, generator=gen, dtype=torch.float64) * 2 - 1
    s = (x[:, 0] + 0.3 * x[:, 1]) / math.hypot(1, 0.3)
    keep = s.abs() >= 0.02
    return x[keep][:200], torch.sign(s[keep][:200])


DATA = {"digits 0 vs 1 (d = 64, n = 360)": digits, "small margin (d = 2, n = 200)": small_margin}


def loss_and_grad(w, x, y):
    m = y * (x @ w)
    loss = F.softplus(-m).mean()
    g = -(x * (y * torch.sigmoid(-m))[:, None]).mean(0)
    return loss, g, m


def run(x, y, lr: float, normalized: bool) -> dict:
    w, losses, separated = torch.zeros(x.shape[1], dtype=x.dtype), [], None
    for t in range(ITERS):
        loss, g, m = loss_and_grad(w, x, y)
        losses.append(float(loss))
        if separated is None and bool((m > 0).all()):
            separated = t
        if float(loss) == 0.0:
            break
        w = w - lr * (g / loss if normalized else g)
    monotone = all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    return {"losses": losses, "separated_at": separated, "monotone": monotone}


def main() -> None:
    import matplotlib.pyplot as plt

    parts, doc, figs = [], {}, {}
    for i, (name, make) in enumerate(DATA.items()):
        md, doc[name], figs[f"logreg{i}"] = one_set(name, *make(), plt, f"logreg{i}")
        parts.append(md)
    md = "\n\n".join(["## (4) Logistic regression with large steps", *parts])
    save("logreg", doc, md, figs)
    print(md)


def one_set(name: str, x, y, plt, key: str):
    model = torch.nn.Linear(x.shape[1], 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    obj = hesse.Objective(model, [(x, (y[:, None] + 1) / 2)], F.binary_cross_entropy_with_logits)
    lam0 = float(hesse.eigs(hesse.HessianOperator(obj), 1).values[0])
    results, rows = {}, []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for col, normalized in enumerate((False, True)):
        for lr in LRS:
            r = run(x, y, lr, normalized)
            results[f"{'normalized' if normalized else 'plain'} {lr:g}"] = r
            at = lambda t, r=r: r["losses"][t] if t < len(r["losses"]) else 0.0  # noqa: E731
            rows.append(["Normalized LR+GD" if normalized else "LR+GD", lr, lr * lam0 / 2,
                         r["separated_at"], at(10), at(100), at(ITERS - 1),
                         r["monotone"]])  # fmt: skip
            axes[col].semilogy([max(v, 1e-300) for v in r["losses"]], label=f"η = {lr:g}")
        axes[col].set(title="Normalized LR+GD" if normalized else "LR+GD", xlabel="iteration",
                      xscale="log")  # fmt: skip
        axes[col].legend(fontsize=8)
    axes[0].set_ylabel("logistic loss")
    axes[0].set_title(f"{name}: LR+GD")
    md = "\n\n".join([
        f"### {name}",
        f"No bias, w₀ = 0, {ITERS} iterations. λmax of the Hessian at w₀ (hesse.eigs) = "
        f"{lam0:.4g}, so the classical "
        f"stable step is 2/λmax = {2 / lam0:.3g}; ηλmax/2 > 1 means a step beyond it. "
        "Normalized LR+GD divides the gradient by the loss.",
        table(["method", "η", "ηλmax/2", "separated at iter", "loss@10", "loss@100",
               f"loss@{ITERS - 1}", "monotone"], rows),
        f"![logistic regression]({key}.png)",
    ])  # fmt: skip
    doc = {"lambda_max_at_0": lam0, "runs": {k: v | {"losses": v["losses"][:200]}
                                             for k, v in results.items()}}  # fmt: skip
    return md, doc, fig


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

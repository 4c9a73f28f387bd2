"""(6) Landscapes of the digits CNN: filter-normalized and Hessian axes, 1D and 2D; batch-norm."""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from common import save, table
from torch import nn
from torch.func import functional_call

import hesse
from hesse.demo import load_demo
from hesse.dynamics import landscape, spectral_criteria


def forward_seconds(obj: hesse.Objective, repeat: int = 5) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        obj.value()
    return (time.perf_counter() - start) / repeat


def bn_cnn(x, y) -> nn.Module:
    """The demo's CNN layout with batch-norm after each conv, trained 300 SGD steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        i = torch.randperm(len(x), generator=gen)[:64]
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    return model.eval()


def batch_stat_curve(model: nn.Module, obj: hesse.Objective, ls) -> list[float]:
    """The same 1D curve with batch statistics (train-mode batch-norm): LLA's pitfall."""
    trained = copy.deepcopy(model).train()
    theta = obj.space.join(obj.params)
    out = []
    for a in ls.axes[0]:
        params = obj.space.split(theta + a * ls.directions[:, 0])
        with torch.no_grad():
            total = sum(float(F.cross_entropy(functional_call(trained, params, (xb,)), yb))
                        * len(xb) for xb, yb in obj.batches())  # fmt: skip
        out.append(total / sum(len(xb) for xb, _ in obj.batches()))
    return out


def main() -> None:
    import matplotlib.pyplot as plt

    demo = load_demo("digits")
    obj = hesse.Objective(demo.model, demo.batches(), demo.loss)
    fwd = forward_seconds(obj)
    runs = {
        "filter 1D": landscape(obj, "filter", span=1.0, steps=41),
        "hessian 1D": None,
        "filter 2D": landscape(obj, "filter", span=1.0, steps=41, dims=2),
    }
    obj64 = hesse.Objective(demo.model, demo.batches(), demo.loss, dtype=torch.float64)
    lam1 = float(hesse.eigs(hesse.HessianOperator(obj64), 1).values[0])
    span = 4 / math.sqrt(lam1)  # the quadratic model rises by 8 at the ends
    runs["hessian 1D"] = landscape(obj, "hessian", span=span, steps=41)
    runs["hessian 2D"] = landscape(obj, "hessian", span=span, steps=21, dims=2)
    fine = landscape(obj64, "hessian", span=1e-5, steps=3)
    crit = spectral_criteria(obj, k=10)
    x, y = demo.inputs, demo.targets
    bn = bn_cnn(x, y)
    bn_obj = hesse.Objective(bn, demo.batches(), demo.loss)
    bn_ls = landscape(bn_obj, "filter", span=1.0, steps=21)
    bn_batch = batch_stat_curve(bn, bn_obj, bn_ls)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, key in zip(axes.flat, ["filter 1D", "hessian 1D", "filter 2D", "hessian 2D"],
                       strict=False):  # fmt: skip
        runs[key].plot(ax, title=f"digits CNN: {key}")
    axes[1, 1].plot(bn_ls.axes[0].numpy(), bn_ls.values.numpy(), label="eval mode (running stats)")
    axes[1, 1].plot(bn_ls.axes[0].numpy(), bn_batch, label="batch statistics (train mode)")
    axes[1, 1].set(title="CNN with batch-norm: filter 1D", xlabel="along filter direction 1",
                   ylabel="loss")  # fmt: skip
    axes[1, 1].legend(fontsize=8)
    axes[1, 2].axis("off")
    fig.tight_layout()
    rows = [[k, ls.n_evaluations, ls.seconds, ls.seconds / ls.n_evaluations / fwd, ls.center,
             float(ls.values.max()), ls.curvature_along(0)] for k, ls in runs.items()]  # fmt: skip
    md = "\n\n".join([
        "## (6) Loss landscapes of the digits CNN",
        f"The digits demo CNN (3658 parameters, 1797 images, cross-entropy). One forward pass "
        f"over the data takes {fwd * 1e3:.1f} ms (`obj.value()`); the grids are evaluated with "
        "`torch.func.vmap` over chunks of 8 parameter sets. Filter directions: span 1 (each "
        f"filter moved by its own norm); Hessian axes: unit eigenvectors, span {span:.3g} = "
        "4/√λ1.",
        table(["landscape", "points", "seconds", "s per point / s per forward", "loss at 0",
               "max loss", "2nd difference at 0 (axis 1)"], rows),
        "Curvature check (float64): the second difference along the top eigenvector with "
        f"h = 1e-5 is "
        f"{fine.curvature_along(0):.6g}; λ1 from Lanczos is {lam1:.6g} (relative gap "
        f"{abs(fine.curvature_along(0) - lam1) / lam1:.1e}).",
        "Spectral criteria (LLA-style; definitions in docs/dynamics.md):",
        table(["λ1/λ10", "negative share", "Tr(H)/λ1", "Tr(H) (SLQ) ± se"],
              [[crit.ratio, crit.negative_share, crit.trace_ratio,
                f"{crit.trace:.4g} ± {crit.trace_stderr:.2g}"]]),
        "Batch-norm (LLA's pitfall): the same filter-normalized 1D curve of a CNN with batch-norm, "
        "evaluated in eval mode (what `landscape` does) and with batch statistics: "
        f"loss at +span {float(bn_ls.values[-1]):.4g} (eval) vs {bn_batch[-1]:.4g} (batch "
        f"statistics), at −span {float(bn_ls.values[0]):.4g} vs {bn_batch[0]:.4g}.",
        "![landscapes](landscapes.png)",
    ])  # fmt: skip
    doc = {k: {"axes": [a.tolist() for a in ls.axes], "values": ls.values.tolist(),
               "seconds": ls.seconds, "center": ls.center} for k, ls in runs.items()}  # fmt: skip
    doc |= {"forward_seconds": fwd, "lambda_1": lam1, "fine_curvature": fine.curvature_along(0),
            "criteria": crit.as_dict(), "bn": {"eval": bn_ls.values.tolist(),
                                               "batch_stats": bn_batch}}  # fmt: skip
    save("landscapes", doc, md, {"landscapes": fig})
    print(md)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

"""Landscapes, stability and mini-batch spectra of a freshly trained model, in one script.

Trains a small tanh MLP on scikit-learn digits with SGD, then asks hesse:

- ``stability``: where λmax and Tr(H) stand against the thresholds of the optimizer used;
- ``landscape``: 1D loss curves along a filter-normalized direction and the top Hessian
  eigenvector (the second difference at 0 along the latter is λ1);
- ``spectral_criteria``: λ1/λk, the negative share of the spectrum, Tr(H)/λ1;
- ``batch_spectrum``: λmax of mini-batch Hessians against the batch size.

    python examples/dynamics_landscape.py          # about half a minute on one CPU thread
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import hesse
from hesse.dynamics import batch_spectrum, landscape, spectral_criteria, stability
from hesse.dynamics._train import digits_subset, eos_model


def main(samples: int = 512, steps: int = 400, grid: int = 41, out: str | Path = ".") -> dict:
    """Train, analyse, write ``dynamics_landscape.png``; return the numbers."""
    x, onehot = digits_subset(samples)
    y = onehot.argmax(1)
    model = eos_model(32).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randperm(samples, generator=gen)[:32]
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()

    obj = hesse.Objective(model, [(x, y)], F.cross_entropy)
    verdicts = stability(obj, lr=0.5, batch_size=32)
    for v in verdicts.verdicts:
        print(v.text)
    filt = landscape(obj, "filter", span=1.0, steps=grid)
    top = landscape(obj, "hessian", span=1.0, steps=grid)
    crit = spectral_criteria(obj, k=5)
    spec = batch_spectrum(obj, (8, 64, "full"), samples=4)
    print(f"λ1 = {top.eigenvalues[0]:.4g}; second difference at 0 = {top.curvature_along(0):.4g}")
    print(f"λ1/λ5 = {crit.ratio:.3g}, negative share = {crit.negative_share:.3g}, "
          f"Tr/λ1 = {crit.trace_ratio:.3g}")  # fmt: skip
    print(f"mean λmax by batch size {spec.batch_sizes}: {[round(m, 3) for m in spec.mean]}")

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    filt.plot(axes[0])
    top.plot(axes[1])
    fig.savefig(Path(out) / "dynamics_landscape.png", dpi=100)
    plt.close(fig)
    return {"stability": verdicts, "filter": filt, "hessian": top, "criteria": crit,
            "spectrum": spec}  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(out=sys.argv[1] if len(sys.argv) > 1 else ".")

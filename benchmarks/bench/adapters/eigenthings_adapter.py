"""hessian-eigenthings 1.0.0a5: Lanczos, Hutch++ and SLQ on its ``HessianOperator``.

Its operator averages batch losses with EQUAL weights (``_matvec_full`` divides by the
number of batches), which is not the full-data mean loss when the last batch is uneven.
The benchmark reports that operator's HVP error, then gives every algorithm a loss
function that rescales each batch by ``n_b * n_batches / N`` so that all tools analyse
the same operator. Defaults, from ``algorithms/``: ``lanczos(k=10, max_iter=2k,
tol=1e-4, which="LM")`` (one plain Lanczos run, full reorthogonalization when
``max_iter <= 50``), ``trace(num_matvecs=100, method="hutch++")``,
``spectral_density(num_runs=10, lanczos_steps=80)``.
"""

from __future__ import annotations

import numpy as np
import torch
from hessian_eigenthings import (
    HessianOperator,
    hutchinson,
    lanczos,
    match_names,
    spectral_density,
    supervised_loss,
    trace,
)

from bench.adapters import Adapter, Setting, Spectrum


class EigenthingsAdapter(Adapter):
    """hessian-eigenthings on the full data set (reweighted; see the module docstring).

    Args:
        w: the workload.
        reweight: rescale batch losses so that uneven batches are weighted by size.
    """

    name = "hessian-eigenthings"

    def __init__(self, w, reweight: bool = True):
        super().__init__(w)
        self.reweight = reweight
        self.op = self._make(None)

    def _loss_fn(self):
        if not self.reweight:
            return supervised_loss(self.w.loss)
        scale = len(self.w.batches) / self.w.n_samples

        def fn(model, batch):
            x, y = batch
            return self.w.loss(model(x), y) * (len(x) * scale)

        return fn

    def _make(self, param_filter) -> HessianOperator:
        op = HessianOperator(
            self.w.model, self.w.batches, self._loss_fn(), param_filter=param_filter
        )
        self._count_calls(op, "matvec")
        return op

    def hvp(self, v):
        return self.op.matvec(v).detach()

    def eig_settings(self, k):
        # One plain Lanczos run of m steps (full reorthogonalization), "LA" for the
        # largest algebraic eigenvalues: the ladder increases m.
        ladder = [
            Setting(
                f'which="LA", max_iter={m}, reorth',
                {"which": "LA", "max_iter": m, "reorthogonalize": True},
            )
            for m in (k + 5, k + 10, 2 * k + 15, 3 * k + 25, 4 * k + 40, 5 * k + 60)
        ]
        return [Setting(f'default (max_iter={2 * k}, which="LM")', {}), *ladder]

    def top_eigs(self, k, setting):
        r = lanczos(self.op, k=k, seed=0, **setting.kwargs)
        return np.sort(r.eigenvalues.double().numpy())[::-1]

    def trace(self, budget, seed):
        r = trace(self.op, num_matvecs=budget, seed=seed)
        return r.estimate, None

    def hutchinson(self, budget, seed):
        return hutchinson(self.op, num_samples=budget, seed=seed).estimate

    def density(self, seed):
        r = spectral_density(self.op, lanczos_steps=100, seed=seed)
        return Spectrum(r.raw_eigenvalues.double().numpy(), r.raw_weights.double().numpy())

    def layer_traces(self, budget, seed):
        out = {}
        for layer, names in self.w.layers().items():
            op, self.op = self.op, self._make(match_names(*names))
            try:
                out[layer] = self.trace(budget, seed)[0]
            finally:
                self.op = op
        return out


def hvp_equal_weights(w, v: torch.Tensor) -> torch.Tensor:
    """The HVP of eigenthings' default operator (equal batch weights), for the check."""
    return EigenthingsAdapter(w, reweight=False).hvp(v)

"""hesse: ``Objective`` + ``HessianOperator`` and the ``linalg`` algorithms.

Defaults: ``eigs(k, which="largest", tol=8 eps = 9.5e-7 in float32)`` (thick-restart Lanczos
with a float64 basis and full reorthogonalization, stopping on Ritz residual bounds),
``trace(budget=100, method="hutch++")`` with a 95% confidence interval,
``density(steps, probes=10)``, ``block_traces(budget, by="module")`` (one sweep of
shared probes for every block).
"""

from __future__ import annotations

import numpy as np
import torch

import hesse
from bench.adapters import Adapter, Setting, Spectrum


class HesseAdapter(Adapter):
    """hesse's Hessian of the full-data mean loss.

    Args:
        w: the workload.
        dtype: analyse in this dtype (float64 gives the tight reference runs).
    """

    name = "hesse"

    def __init__(self, w, dtype: torch.dtype | None = None):
        super().__init__(w)
        self.obj = hesse.Objective(w.model, w.batches, loss=w.loss, dtype=dtype)
        self.op = hesse.HessianOperator(self.obj)

    def _spent(self, result):
        self.hvps += result.n_matvecs
        return result

    def hvp(self, v):
        before = self.op.n_matvecs
        out = self.op @ v.to(self.op.dtype)
        self.hvps += self.op.n_matvecs - before
        return out.detach()

    def eig_settings(self, k):
        # float32 products cannot certify residuals below ~8 eps, so hesse refuses a tighter
        # tol; its default is the only setting
        return [Setting("default (tol=9.5e-7)", {})]

    def top_eigs(self, k, setting):
        r = self._spent(hesse.eigs(self.op, k=k, which="largest", seed=0, **setting.kwargs))
        return np.asarray(r.values, dtype=np.float64)

    def eigs_result(self, k: int, **kwargs):
        """The full ``EigResult`` (residual bounds, convergence), for the reference runs."""
        return self._spent(hesse.eigs(self.op, k=k, which="largest", seed=0, **kwargs))

    def trace(self, budget, seed):
        r = self._spent(hesse.trace(self.op, budget=budget, seed=seed))
        return r.value, tuple(r.ci95)

    def hutchinson(self, budget, seed):
        return self._spent(
            hesse.trace(self.op, budget=budget, method="hutchinson", seed=seed)
        ).value

    def density(self, seed):
        s = self._spent(hesse.density(self.op, steps=100, probes=10, seed=seed))
        return Spectrum(
            np.asarray(s.nodes, dtype=np.float64), np.asarray(s.weights, dtype=np.float64)
        )

    def layer_traces(self, budget, seed):
        before = self.op.n_matvecs
        bt = hesse.block_traces(self.op, budget=budget, by="module", seed=seed)
        self.hvps += self.op.n_matvecs - before
        return {name: r.value for name, r in bt.items()}

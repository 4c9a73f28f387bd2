"""curvlinops 3.0.1: ``HessianLinearOperator`` with SciPy's ARPACK and its own estimators.

The operator (``curvlinops/hessian.py``) applies forward-over-reverse
(``jvp`` of ``jacrev``) per batch, vmapped over columns, and weights batches by size.
Construction runs ``check_deterministic=True`` by default (two extra passes), which the
benchmark times separately. Eigenvalues: the documented route,
``scipy.sparse.linalg.eigsh(H.to_scipy(), k, which="LA")`` with SciPy's defaults
(``tol=0``: machine precision, ``ncv=max(2k+1, 20)``); matched accuracy loosens ``tol``.
Trace: ``hutchpp_trace`` (default Hutch++) and ``hutchinson_trace``. Density:
``lanczos_approximate_spectrum`` (Papyan 2020), which first estimates the spectral
boundaries with ``eigsh``.
"""

from __future__ import annotations

import numpy as np
import torch
from curvlinops import (
    HessianLinearOperator,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_approximate_spectrum,
)
from scipy.sparse.linalg import eigsh

from bench.adapters import Adapter, Setting, Spectrum, trainable


class CurvlinopsAdapter(Adapter):
    """curvlinops' Hessian of the full data set (``reduction="mean"`` weighted by size)."""

    name = "curvlinops"
    ladder_loosens = True

    def __init__(self, w, params=None):
        super().__init__(w)
        self.op = HessianLinearOperator(w.model, w.loss, params or trainable(w.model), w.batches)

        inner = self.op._matmat

        def counted(M):
            # M is in curvlinops' list format: one tensor per parameter, columns trailing.
            self.hvps += M[0].shape[-1]
            return inner(M)

        self.op._matmat = counted

    def hvp(self, v):
        return (self.op @ v).detach()

    def eig_settings(self, k):
        ladder = [Setting(f'which="LA", tol={t:g}', {"tol": t}) for t in (1e-3, 1e-4, 1e-5, 1e-6)]
        return [Setting('default (which="LA", tol=0)', {}), *ladder]

    def top_eigs(self, k, setting):
        v0 = np.random.default_rng(0).standard_normal(self.op.shape[0]).astype(np.float32)
        values = eigsh(
            self.op.to_scipy(), k=k, which="LA", v0=v0, return_eigenvectors=False, **setting.kwargs
        )
        return np.sort(values.astype(np.float64))[::-1]

    def trace(self, budget, seed):
        torch.manual_seed(seed)
        # hutchpp_trace needs a multiple of 3: the largest one within the budget.
        return float(hutchpp_trace(self.op, num_matvecs=budget - budget % 3)), None

    def hutchinson(self, budget, seed):
        torch.manual_seed(seed)
        return float(hutchinson_trace(self.op, num_matvecs=budget))

    def density(self, seed):
        torch.manual_seed(seed)
        np.random.seed(seed)
        grid, dens = lanczos_approximate_spectrum(self.op, ncv=100)
        grid, dens = grid.double().numpy(), dens.double().numpy()
        return Spectrum(grid[None, :], (dens / dens.sum())[None, :])

    def layer_traces(self, budget, seed):
        out = {}
        named = dict(self.w.model.named_parameters())
        for layer, names in self.w.layers().items():
            sub = CurvlinopsAdapter(self.w, params=[named[n] for n in names])
            out[layer] = sub.trace(budget, seed)[0]
            self.hvps += sub.hvps
        return out

"""PyHessian 0.1 (Yao et al. 2020): power iteration, Hutchinson and SLQ over a dataloader.

Defaults, from ``pyhessian/hessian.py``: ``eigenvalues(maxIter=100, tol=1e-3, top_n=1)``
(power iteration with deflation, stopping on a relative change of the eigenvalue below
``tol``), ``trace(maxIter=100, tol=1e-3)`` (Hutchinson that stops once the running mean
changes by less than ``tol``), ``density(iter=100, n_v=1)``. The HVP is double backward
per batch, weighted by batch size (exact for uneven batches).
"""

from __future__ import annotations

import numpy as np
import torch
from pyhessian import hessian

from bench.adapters import Adapter, Setting, Spectrum, flatten, only_layer, split_like, unfreeze


def _eig_shim(T: torch.Tensor, eigenvectors: bool = True):
    """``torch.eig`` (removed in torch 2.0), which ``hessian.density`` still calls.

    Returns what the old function returned for a symmetric matrix: eigenvalues as an
    (n, 2) real/imaginary table and the eigenvectors as columns.
    """
    w, V = torch.linalg.eigh(T)
    return torch.stack([w, torch.zeros_like(w)], 1), V


class PyHessianAdapter(Adapter):
    """PyHessian's ``hessian`` class on the full data set (``dataloader=`` mode)."""

    name = "PyHessian"

    def __init__(self, w):
        super().__init__(w)
        self.comp = self._make()

    def _make(self) -> hessian:
        comp = hessian(self.w.model, self.w.loss, dataloader=self.w.batches, cuda=False)
        self._count_calls(comp, "dataloader_hv_product")
        return comp

    def hvp(self, v):
        _, Hv = self.comp.dataloader_hv_product(split_like(v, self.comp.params))
        return flatten(Hv).detach()

    def eig_settings(self, k):
        ladder = [
            Setting(f"tol={t:g}, maxIter={m}", {"tol": t, "maxIter": m})
            for t, m in ((1e-5, 300), (1e-7, 1000))
        ]
        return [Setting("default (tol=1e-3, maxIter=100)", {}), *ladder]

    def top_eigs(self, k, setting):
        torch.manual_seed(0)
        values, _ = self.comp.eigenvalues(top_n=k, **setting.kwargs)
        return np.sort(np.asarray(values))[::-1]

    def trace(self, budget, seed):
        return self.hutchinson(budget, seed), None

    def hutchinson(self, budget, seed):
        torch.manual_seed(seed)
        # tol=0 switches off the early stop, so that exactly `budget` probes are used.
        return float(np.mean(self.comp.trace(maxIter=budget, tol=0.0)))

    def density(self, seed):
        torch.manual_seed(seed)
        saved = getattr(torch, "eig", None)
        torch.eig = _eig_shim
        try:
            nodes, weights = self.comp.density(iter=100, n_v=1)
        finally:
            if saved is None:
                del torch.eig
            else:
                torch.eig = saved
        return Spectrum(np.asarray(nodes), np.asarray(weights))

    def layer_traces(self, budget, seed):
        # PyHessian analyses every parameter with requires_grad: a per-layer trace means
        # freezing the rest and building a new `hessian` object, layer by layer.
        out = {}
        for layer in self.w.layers():
            saved = only_layer(self.w.model, layer)
            try:
                self.comp = self._make()
                out[layer] = self.hutchinson(budget, seed)
            finally:
                unfreeze(saved)
        self.comp = self._make()
        return out

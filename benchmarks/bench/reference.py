"""Float64 references computed with plain ``torch.func``, independently of every tool.

The operator is the Hessian of ``L(θ) = Σ_b n_b · mean_loss_b(θ) / Σ_b n_b`` at the
workload's float32 parameters, cast to float64.
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, grad, jvp, vmap

from bench.workloads import Workload


class ReferenceHessian:
    """Exact float64 Hessian-vector products of a workload's full-data mean loss.

    Args:
        w: the workload; its model is copied and cast to float64.
    """

    def __init__(self, w: Workload):
        self.model = copy.deepcopy(w.model).double().eval()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = tuple(p.detach() for p in self.model.parameters() if p.requires_grad)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.batches = [(x.double() if x.is_floating_point() else x, y) for x, y in w.batches]
        self.n = sum(len(x) for x, _ in w.batches)
        self.loss = w.loss
        self.dim = sum(self.numels)

    def _split(self, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(c.reshape(s) for c, s in zip(v.split(self.numels), self.shapes, strict=True))

    def _batch_loss(self, x, y, weight):
        def f(*params):
            out = functional_call(self.model, dict(zip(self.names, params, strict=True)), (x,))
            return self.loss(out, y) * weight

        return f

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` for ``V`` of shape (d,) or (d, k), in float64."""
        V64 = V.double().reshape(self.dim, -1)
        out = torch.zeros_like(V64)
        argnums = tuple(range(len(self.params)))
        for x, y in self.batches:
            g = grad(self._batch_loss(x, y, len(x) / self.n), argnums=argnums)

            def hvp(v, g=g):
                _, t = jvp(g, self.params, self._split(v))
                return torch.cat([c.reshape(-1) for c in t])

            out += vmap(hvp, in_dims=1, out_dims=1)(V64)
        return out.reshape(V.shape)

    def dense(self, chunk: int = 256) -> torch.Tensor:
        """The dense (d, d) Hessian, symmetrised, built from chunks of basis vectors."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        H = torch.cat([self.matmat(eye[:, i : i + chunk]) for i in range(0, self.dim, chunk)], 1)
        return (H + H.T) / 2

    def gradient(self) -> torch.Tensor:
        """The full-data gradient in float64 (to check the loss weighting)."""
        argnums = tuple(range(len(self.params)))
        out = torch.zeros(self.dim, dtype=torch.float64)
        for x, y in self.batches:
            g = grad(self._batch_loss(x, y, len(x) / self.n), argnums=argnums)(*self.params)
            out += torch.cat([c.reshape(-1) for c in g])
        return out

    def layer_slices(self) -> dict[str, slice]:
        """Flat-vector slice of each module's parameters (the per-layer blocks)."""
        out, start = {}, 0
        for name, k in zip(self.names, self.numels, strict=True):
            mod = name.rpartition(".")[0]
            s = out.get(mod, slice(start, start))
            out[mod] = slice(s.start, start + k)
            start += k
        return out

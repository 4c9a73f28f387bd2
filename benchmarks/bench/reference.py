"""Float64 references computed with plain ``torch.func``, independently of every tool.

The operator is the Hessian of ``L(θ) = Σ_b n_b · mean_loss_b(θ) / Σ_b n_b`` at the
workload's float32 parameters, cast to float64.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap

from bench.workloads import Workload


class ReferenceHessian:
    """Exact float64 Hessian-vector products of a workload's full-data mean loss.

    Args:
        w: the workload; its model is copied and cast to ``dtype``.
        dtype: float64 for references; float32 only to build the CNN's dense matrix fast.
    """

    def __init__(self, w: Workload, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        self.model = copy.deepcopy(w.model).to(dtype).eval()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = tuple(p.detach() for p in self.model.parameters() if p.requires_grad)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.batches = [(x.to(dtype) if x.is_floating_point() else x, y) for x, y in w.batches]
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
        """``H @ V`` for ``V`` of shape (d,) or (d, k), in the reference dtype."""
        V64 = V.to(self.dtype).reshape(self.dim, -1)
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
        eye = torch.eye(self.dim, dtype=self.dtype)
        H = torch.cat([self.matmat(eye[:, i : i + chunk]) for i in range(0, self.dim, chunk)], 1)
        H = H.double()
        return (H + H.T) / 2

    def gradient(self) -> torch.Tensor:
        """The full-data gradient in float64 (to check the loss weighting)."""
        argnums = tuple(range(len(self.params)))
        out = torch.zeros(self.dim, dtype=self.dtype)
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


@dataclass
class Reference:
    """What every tool is checked against, and how it was obtained.

    Attributes:
        top: the 10 largest eigenvalues, descending, float64.
        how: one line on the method (dense eigh, Rayleigh-refined, tight float64 Lanczos).
        seconds: time it took (0 when read from the cache).
        eigvals: the whole spectrum (dense workloads only).
        trace: the exact trace (dense workloads only).
        layers: exact per-module traces (dense workloads only).
        H: the dense Hessian (dense workloads only).
    """

    top: np.ndarray
    how: str
    seconds: float
    eigvals: np.ndarray | None = None
    trace: float | None = None
    layers: dict[str, float] | None = None
    H: torch.Tensor | None = field(default=None, repr=False)


def _dense(w: Workload) -> tuple[torch.Tensor, str]:
    if w.name == "mlp":
        return ReferenceHessian(w).dense(), "dense float64 Hessian (torch.func), eigh"
    # float64 convolutions take the slow path on CPU (about 10x): the CNN's columns are
    # float32, the top eigenvalues are then refined with float64 HVPs (Rayleigh quotients).
    return ReferenceHessian(w, torch.float32).dense(chunk=64), (
        "dense Hessian from float32 columns, eigh in float64; top-10 = float64 Rayleigh "
        "quotients of its eigenvectors"
    )


def _cache_key(w: Workload) -> str:
    h = hashlib.sha256()
    for p in w.model.state_dict().values():
        h.update(p.detach().cpu().numpy().tobytes())
    for x, y in w.batches:
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    return f"{w.name}-{h.hexdigest()[:16]}"


def reference(w: Workload, cache: Path) -> Reference:
    """The workload's reference values, from ``cache`` when an identical run made them."""
    path = cache / f"{_cache_key(w)}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        return Reference(**{**saved, "seconds": 0.0})
    t0 = time.perf_counter()
    if w.dense:
        H, how = _dense(w)
        evals, evecs = torch.linalg.eigh(H)
        top_vecs = evecs[:, -10:].flip(1)
        top = evals[-10:].flip(0).numpy()
        if w.name != "mlp":
            R = ReferenceHessian(w)
            top = (top_vecs * R.matmat(top_vecs)).sum(0).numpy()
        R = ReferenceHessian(w)
        diag = H.diagonal()
        ref = Reference(
            top=top,
            how=how,
            seconds=0.0,
            eigvals=evals.numpy(),
            trace=float(diag.sum()),
            layers={k: float(diag[s].sum()) for k, s in R.layer_slices().items()},
            H=H,
        )
    else:
        ref = _lanczos64(w)
    ref.seconds = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(vars(ref), path)
    return ref


def _lanczos64(w: Workload) -> Reference:
    import hesse

    op = hesse.HessianOperator(
        hesse.Objective(w.model, w.batches, loss=w.loss, dtype=torch.float64)
    )
    r = hesse.eigs(op, k=10, which="largest", tol=1e-10, seed=123)
    if not r.converged:
        raise RuntimeError(f"reference: float64 Lanczos did not converge on {w.name}")
    return Reference(
        top=np.asarray(r.values, dtype=np.float64),
        seconds=0.0,
        how=f"hesse.eigs in float64, tol=1e-10 ({r.n_matvecs} HVPs, max residual "
        f"bound {float(max(r.residuals)):.1e})",
    )

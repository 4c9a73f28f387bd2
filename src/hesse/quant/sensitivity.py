"""Per-layer quantization sensitivity: HAWQ, HAWQ-V2 and Q-BERT from the Hessian, or KFAC."""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

import torch

from ..linalg import block_traces, eigs
from ..operators import (
    CURVATURES,
    KRONECKER_KINDS,
    KFACOperator,
    curvature_operator,
    kronecker_operator,
)
from ..problem.objective import Objective
from ._layers import batch_samples, macs_per_sample, output_axes, quantizable
from .quantizer import Quantizer, check_bits

METHODS = ("trace", "eig", "qbert", "kfac")
"""The ``kind`` of the Kronecker factors that approximate each curvature (``method="kfac"``)."""
RULE = (
    "omega[b] = max(s, 0) * delta_sq[b]: a layer whose score s comes out negative (flag "
    "'negative') is predicted to cost nothing when quantized; its estimate is reported as it is"
)


@dataclass(frozen=True)
class LayerSensitivity:
    r"""One quantizable layer (a weight matrix) and what quantizing it is predicted to cost.

    Attributes:
        name: Layer name (see :func:`hesse.quant.quantizable`).
        param: The parameter quantized.
        n_params: Its number of weights :math:`n_i`.
        macs: Multiply-accumulates of the weight per sample (for ``cost="bops"``), measured
            on the first batch (see :func:`hesse.quant._layers.macs_per_sample`).
        score: The curvature score :math:`s_i` of the method: ``trace_per_param`` (trace and
            kfac), ``top_eig`` (eig) or ``eig_mean + eig_std`` (qbert).
        negative: The score is below 0 (a non-convex direction or noise); see ``RULE``.
        trace: Hutchinson estimate of :math:`\mathrm{tr}(H_{ii})` (trace method), the exact
            trace of the KFAC block (kfac method), else None.
        trace_stderr: Its standard error (0 for kfac: no estimate).
        trace_ci95: Its 95% interval.
        trace_per_param: ``trace / n_params``.
        per_param_stderr: ``trace_stderr / n_params``.
        top_eig: Largest eigenvalue of the block (eig method), else None.
        eig_converged: Whether that eigenvalue met Lanczos's tolerance.
        eig_mean: Mean of the block's top eigenvalue over batches (qbert), else None.
        eig_std: Their sample standard deviation (qbert), else None.
        delta_sq: ``{bits: ||Q_b(W) - W||^2}`` of the quantizer ``quantize`` applies.
        omega: ``{bits: max(score, 0) * delta_sq[bits]}``.
    """

    name: str
    param: str
    n_params: int
    macs: int
    score: float
    negative: bool
    delta_sq: dict[int, float]
    omega: dict[int, float]
    trace: float | None = None
    trace_stderr: float | None = None
    trace_ci95: tuple[float, float] | None = None
    trace_per_param: float | None = None
    per_param_stderr: float | None = None
    top_eig: float | None = None
    eig_converged: bool | None = None
    eig_mean: float | None = None
    eig_std: float | None = None


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer sensitivities, one row per quantizable layer, in the model's order.

    Attributes:
        method: ``"trace"``, ``"eig"``, ``"qbert"`` or ``"kfac"``.
        bits: The widths ``delta_sq`` and ``omega`` are given for.
        layers: One :class:`LayerSensitivity` per layer.
        quantizer: The grid ``delta_sq`` was measured with.
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        n_matvecs: Curvature products spent.
        rule: How negative scores enter ``omega``.
        settings: ``budget`` and ``seed`` of the run.
    """

    method: str
    bits: tuple[int, ...]
    layers: tuple[LayerSensitivity, ...]
    quantizer: Quantizer
    curvature: str
    n_matvecs: int
    rule: str = RULE
    settings: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerSensitivity:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"Sensitivity: no layer {name!r}; layers: {[r.name for r in self.layers]}")

    @property
    def names(self) -> list[str]:
        """Layer names in order."""
        return [row.name for row in self.layers]

    def to_json(self) -> dict:
        """A JSON-able dictionary of everything (bit keys as strings)."""
        out = asdict(self)
        out["quantizer"] = asdict(self.quantizer)
        for row in out["layers"]:
            row["delta_sq"] = {str(b): v for b, v in row["delta_sq"].items()}
            row["omega"] = {str(b): v for b, v in row["omega"].items()}
        return out

    def columns(self) -> tuple[str, ...]:
        """Column names of :meth:`rows`."""
        head = ("layer", "n_params", "score", "+-", "negative")
        return head + tuple(f"omega@{b}" for b in self.bits)

    def rows(self) -> list[list]:
        """The table's rows: name, size, score with its standard error, flag, omega per width."""
        out = []
        for r in self.layers:
            err = r.per_param_stderr if self.method in ("trace", "kfac") else r.eig_std
            out.append(
                [r.name, r.n_params, r.score, err, "yes" if r.negative else ""]
                + [r.omega[b] for b in self.bits]
            )
        return out

    def table(self) -> str:
        """The table as text, one line per layer."""
        lines = ["  ".join(f"{c:>12}" for c in self.columns())]
        for row in self.rows():
            lines.append("  ".join(_cell(v) for v in row))
        return "\n".join(lines)


def sensitivity(
    obj: Objective,
    bits: Sequence[int] = (2, 3, 4, 8),
    *,
    method: str = "trace",
    quantizer: Quantizer | None = None,
    budget: int = 100,
    seed: int = 0,
    layers: Sequence[str] | None = None,
    curvature: str | None = None,
) -> Sensitivity:
    r"""How much the loss is predicted to rise when each layer is quantized to each width.

    For layer :math:`i` with weights :math:`W_i` (:math:`n_i` of them) and width :math:`b`,

    .. math:: \Omega_i(b) = \max(s_i, 0)\, \|Q_b(W_i) - W_i\|_2^2,

    the second-order term :math:`\tfrac12 \Delta^\top H_{ii} \Delta` with :math:`H_{ii}`
    replaced by :math:`s_i I` (the factor 1/2 dropped, as HAWQ-V2 does). The score :math:`s_i`:

    - ``"trace"``: :math:`\mathrm{tr}(H_{ii}) / n_i` (Dong et al. 2020, "HAWQ-V2: Hessian
      aware trace-weighted quantization of neural networks"), every block's Hutchinson trace
      from one sweep of ``budget`` shared probes (:func:`hesse.block_traces`), with its
      standard error and interval;
    - ``"eig"``: :math:`\lambda_{\max}(H_{ii})` (Dong et al. 2019, "HAWQ: Hessian aware
      quantization of neural networks with mixed-precision"), by Lanczos on each block with at
      most ``budget`` products;
    - ``"qbert"``: mean + standard deviation of the block's :math:`\lambda_{\max}` over the
      batches (Shen et al. 2020, "Q-BERT"), ``budget`` products per block and batch;
    - ``"kfac"``: :math:`\mathrm{tr}(K_{ii}) / n_i` for the KFAC block
      :math:`K_{ii} = G \otimes A` of the GGN (or the empirical Fisher) of the layer's weight,
      :math:`\mathrm{tr}(G)\,\mathrm{tr}(A)` from the factors (:class:`~hesse.KFACOperator`):
      one data pass, no products, no estimator error. Exact where KFAC is exact (a deep linear
      network with squared loss, where it also equals the Hessian's block trace).

    A layer the loss does not reach (in any batch, or for ``"qbert"`` in that batch) has a zero
    block, and scores 0 by every method. :math:`\|Q_b(W_i) - W_i\|^2` is taken along each
    weight's output axis (a GPT-2 ``Conv1D``'s columns), in float64.

    Args:
        obj: The loss, model and data; the layers' weights must be among its parameters.
        bits: Widths to evaluate, 1 to 16.
        method: ``"trace"``, ``"eig"``, ``"qbert"`` or ``"kfac"``.
        quantizer: The grid that ``quantize`` will apply (default ``Quantizer()``).
        budget: Curvature products (see ``method``; unused by ``"kfac"``).
        seed: Seed of the probes and start vectors.
        layers: Layer names or globs (default: every quantizable layer that ``obj`` analyses).
        curvature: ``"hessian"`` (the default), ``"ggn"`` or ``"fisher"`` (empirical);
            ``"kfac"`` approximates ``"ggn"`` (its default; factors of kind ``"exact"``) or
            ``"fisher"`` (kind ``"empirical"``).

    Returns:
        Sensitivity.

    Raises:
        ValueError: unknown method or curvature, bits outside 1-16, layers that match nothing
            or whose weights ``obj`` does not analyse, or a group size that does not divide.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False).double().eval()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> obj = Objective(model, (x, torch.zeros(2, 1, dtype=torch.float64)),
        ...                 loss=nn.functional.mse_loss)
        >>> row = sensitivity(obj, bits=(4,), budget=10)["weight"]  # H = diag(1, 4)
        >>> row.trace, row.trace_per_param, row.trace_stderr
        (5.0, 2.5, 0.0)
    """
    quantizer = quantizer or Quantizer()
    bits = tuple(sorted({check_bits(b, "sensitivity") for b in bits}))
    if method not in METHODS:
        raise ValueError(f"sensitivity: method must be one of {METHODS}, got {method!r}.")
    curvature = _curvature(method, curvature)
    chosen = _analysed(obj, layers)
    sub = obj.restrict(list(chosen.values()))
    scores, n_matvecs = _SCORES[method](sub, chosen, curvature, budget, seed)
    first = next(iter(obj.batches()))
    run = functools.partial(obj.batch_loss, obj.params, first)
    macs = macs_per_sample(obj.model, chosen, run, batch_samples(first))
    axes = output_axes(obj.model, chosen)
    weights = dict(obj.model.named_parameters())
    rows = []
    for name, param in chosen.items():
        W = weights[param]
        delta = {b: quantizer.error(W, b, name=name, axis=axes[name]) for b in bits}
        s = scores[name].pop("score")
        omega = {b: max(s, 0.0) * d for b, d in delta.items()}
        rows.append(
            LayerSensitivity(
                name, param, W.numel(), macs[name], s, s < 0, delta, omega, **scores[name]
            )
        )
    settings = {"budget": budget, "seed": seed}
    return Sensitivity(method, bits, tuple(rows), quantizer, curvature, n_matvecs, RULE, settings)


def _curvature(method: str, curvature: str | None) -> str:
    """The curvature of ``method``: the Hessian by default, the GGN for ``"kfac"``."""
    if method == "kfac":
        if curvature not in (None, *KRONECKER_KINDS):
            raise ValueError(
                f"sensitivity(method='kfac'): Kronecker factors approximate the GGN "
                f"(curvature='ggn') or the empirical Fisher (curvature='fisher'), not the "
                f"{curvature!r}; pass one of those, or method='trace' for the {curvature!r}."
            )
        return curvature or "ggn"
    if curvature not in (None, *CURVATURES):
        raise ValueError(
            f"sensitivity: curvature must be one of {tuple(CURVATURES)}, got {curvature!r}."
        )
    return curvature or "hessian"


def _analysed(obj: Objective, layers: Sequence[str] | None) -> dict[str, str]:
    found = quantizable(obj.model, layers)
    kept = {n: p for n, p in found.items() if p in obj.params}
    missing = [n for n, p in found.items() if p not in obj.params]
    if not kept or (layers is not None and missing):
        raise ValueError(
            f"sensitivity: the objective does not analyse the weights of {missing[:6]}; "
            "build the Objective with params= that include them (or leave params= out)."
        )
    return kept


def _trace_scores(
    sub: Objective, chosen: dict[str, str], curvature: str, budget: int, seed: int
) -> tuple[dict[str, dict], int]:
    op = curvature_operator(sub, curvature, "sensitivity")
    groups = {name: [param] for name, param in chosen.items()}
    found = block_traces(op, budget, groups=groups, seed=seed)
    out = {}
    for name, param in chosen.items():
        t, n = found[name], sub.params[param].numel()
        out[name] = {
            "score": t.value / n,
            "trace": t.value,
            "trace_stderr": t.stderr,
            "trace_ci95": t.ci95,
            "trace_per_param": t.value / n,
            "per_param_stderr": t.stderr / n,
        }
    return out, op.n_matvecs


def _eig_scores(
    sub: Objective, chosen: dict[str, str], curvature: str, budget: int, seed: int
) -> tuple[dict[str, dict], int]:
    op, out = curvature_operator(sub, curvature, "sensitivity"), {}
    reached = _reached(sub, chosen)
    for name, param in chosen.items():
        if name not in reached:  # the loss does not depend on it: its block is 0
            out[name] = {"score": 0.0, "top_eig": 0.0, "eig_converged": True}
            continue
        r = eigs(op.restrict([param]), k=1, max_matvecs=budget, seed=seed, progress=False)
        top = float(r.values[0])
        out[name] = {"score": top, "top_eig": top, "eig_converged": r.converged}
    return out, op.n_matvecs


def _reached(obj: Objective, chosen: dict[str, str]) -> set[str]:
    """The layers whose weight the loss depends on in some batch (one gradient per batch)."""
    found: set[str] = set()
    for batch in obj.batches():
        params = {n: p.detach().requires_grad_(True) for n, p in obj.params.items()}
        with torch.enable_grad():
            loss, _ = obj.batch_loss(params, batch)
            if not loss.requires_grad:
                continue
            weights = [params[p] for p in chosen.values()]
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
        found |= {n for n, g in zip(chosen, grads, strict=True) if g is not None}
    return found


def _qbert_scores(
    sub: Objective, chosen: dict[str, str], curvature: str, budget: int, seed: int
) -> tuple[dict[str, dict], int]:
    tops: dict[str, list[float]] = {name: [] for name in chosen}
    used = 0
    for batch in sub.batches():
        found, n = _eig_scores(sub.with_data([batch]), chosen, curvature, budget, seed)
        used += n
        for name in chosen:
            tops[name].append(found[name]["top_eig"])
    out = {}
    for name, values in tops.items():
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out[name] = {"score": mean + std, "eig_mean": mean, "eig_std": std}
    return out, used


def _kfac_scores(
    sub: Objective, chosen: dict[str, str], curvature: str, budget: int, seed: int
) -> tuple[dict[str, dict], int]:
    """Each layer's KFAC block trace per weight, exact from the factors (no budget, no seed)."""
    K = kronecker_operator(sub, "kfac", curvature)
    out = {}
    for name, param in chosen.items():
        block = cast(KFACOperator, K.restrict([param]))  # a KFAC block restricts to one
        t, n = block.trace(), sub.params[param].numel()
        out[name] = {
            "score": t / n,
            "trace": t,
            "trace_stderr": 0.0,
            "trace_ci95": (t, t),
            "trace_per_param": t / n,
            "per_param_stderr": 0.0,
        }
    return out, 0


_SCORES = {"trace": _trace_scores, "eig": _eig_scores, "qbert": _qbert_scores, "kfac": _kfac_scores}


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:>12.4g}" if math.isfinite(v) else f"{v!s:>12}"
    return f"{'' if v is None else v!s:>12}"

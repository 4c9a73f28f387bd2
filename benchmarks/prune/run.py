"""Measured pruning benchmark: loss and accuracy of pruned models, before and after a fine-tune.

Run from the repository root with the main environment (one thread, about 10 minutes):

    .venv/bin/python benchmarks/prune/run.py

Writes benchmarks/prune/results.json and benchmarks/prune/RESULTS.md. Every number in them is
measured here: held-out loss and accuracy (20% of each data set, never trained on), training
loss, after pruning without retraining and after a short masked fine-tune.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _cases import Case, bert_case, demo_case, fine_tune, mlp_case  # noqa: E402
from _report import write_markdown  # noqa: E402

from hesse import GGNOperator, HessianOperator, Objective, WoodburyFisher  # noqa: E402
from hesse.prune import prune  # noqa: E402

HERE = Path(__file__).parent
TUNE_STEPS = 100
SPARSITIES = [0.5, 0.7, 0.9, "2:4"]
METHODS = ["magnitude", "obd", "mfac", "layer_obs"]
GRADUAL = 4


def _prune(obj, target, method, recompute, **kw):
    structure = target if isinstance(target, str) else "unstructured"
    sparsity = None if isinstance(target, str) else target
    return prune(obj, sparsity, method, structure=structure, recompute=recompute, **kw)


def unstructured(case: Case) -> list[dict]:
    obj = Objective(case.model, case.train, case.loss, loss_fn=case.loss_fn)
    rows = []
    for target in SPARSITIES:
        for method in METHODS:
            for recompute in (1, GRADUAL) if method != "magnitude" else (1,):
                start = time.perf_counter()
                plan = _prune(obj, target, method, recompute)
                seconds = time.perf_counter() - start
                pruned = plan.apply(case.model)
                tuned = fine_tune(case, pruned, plan.masks, TUNE_STEPS)
                after = case.measure(tuned)
                rows.append({
                    "model": case.name, "sparsity": target, "method": method,
                    "schedule": "one-shot" if recompute == 1 else f"gradual x{recompute}",
                    **case.measure(pruned),
                    "tuned_test_loss": after["test_loss"],
                    "tuned_test_accuracy": after["test_accuracy"],
                    "removed": plan.removed_params, "total": plan.total_params,
                    "skipped": list(plan.skipped),
                    "relative_damping": max(plan.relative_damping, default=None),
                    "seconds": seconds,
                })  # fmt: skip
                print(_brief(rows[-1]), flush=True)
    return rows


def structured(case: Case) -> list[dict]:
    obj = Objective(case.model, case.train, case.loss, loss_fn=case.loss_fn)
    before = sum(p.numel() for p in case.model.parameters())
    rows = []
    for structure, fractions in (("heads", (0.25, 0.5)), ("channels", (0.25, 0.5, 0.75))):
        methods = ["nvit", "magnitude", "random"] + (["heapr"] if structure == "channels" else [])
        for fraction in fractions:
            for method in methods:
                for seed in (0, 1, 2) if method == "random" else (0,):
                    start = time.perf_counter()
                    plan = prune(obj, fraction, method, structure=structure, seed=seed, m=256)
                    seconds = time.perf_counter() - start
                    pruned = plan.apply(case.model)
                    tuned = fine_tune(case, pruned, {}, TUNE_STEPS)
                    after = case.measure(tuned)
                    rows.append({
                        "model": case.name, "structure": structure, "fraction": fraction,
                        "method": method, "seed": seed, "units": len(plan.units),
                        "params_before": before,
                        "params_after": sum(p.numel() for p in pruned.parameters()),
                        **case.measure(pruned),
                        "tuned_test_loss": after["test_loss"],
                        "tuned_test_accuracy": after["test_accuracy"], "seconds": seconds,
                    })  # fmt: skip
                    print(_brief(rows[-1]), flush=True)
    return rows


def indefinite(case: Case) -> dict:
    """Issue item 0: OBS with the exact Hessian of a trained MLP against PSD curvatures."""
    obj = Objective(case.model, case.train, F.cross_entropy)
    target = obj.restrict(["0.weight", "2.weight"])
    H = HessianOperator(target).to_dense()
    eig = torch.linalg.eigvalsh(H)
    out = {
        "train_loss": float(obj.value()),
        "hessian_eigs": [float(eig[0]), float(eig[-1])],
        "negative_eigs": int((eig < 0).sum()),
        "d": target.dim,
        "magnitude": case.measure(prune(obj, 0.7, "magnitude").apply(case.model)),
        "rows": [],
    }
    for rho in (1e-3, 1e-2, 1e-1):
        naive = _naive_obs(target, H, rho, 0.7)
        out["rows"].append(
            {
                "curvature": "hessian, no PD check",
                "damping": rho,
                "used": rho,
                **case.measure(_with(case.model, target, naive)),
            }
        )
        for curvature in ("hessian", "ggn", "fisher"):
            plan = prune(obj, 0.7, "obs", curvature=curvature, damping=rho, m=None)
            out["rows"].append({"curvature": curvature, "damping": rho,
                                "used": plan.relative_damping[0],
                                **case.measure(plan.apply(case.model))})  # fmt: skip
        print(out["rows"][-4:], flush=True)
    G = GGNOperator(target).to_dense()
    out["ggn_min_eig"] = float(torch.linalg.eigvalsh(G)[0])
    return out


def _naive_obs(target, H, rho, sparsity) -> torch.Tensor:
    """OBS as a plain implementation does it: (H + lam I)^-1 by LU, whatever its signs."""
    w = target.space.join(target.params)
    A = H + rho * H.diagonal().abs().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(A)
    Q = (w**2 / (2 * Hinv.diagonal())).argsort()[: int(round(sparsity * len(w)))]
    delta = -Hinv[:, Q] @ torch.linalg.solve(Hinv[Q][:, Q], w[Q])
    new = w + delta
    new[Q] = 0
    return new


def _with(model, target, flat):
    import copy

    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in target.space.split(flat).items():
            params[name].copy_(value)
    return model


def woodbury_speed(m: int = 256, d: int = 1_000_000, reps: int = 5) -> dict:
    """Products per second of WoodburyFisher at m gradients of d weights (float32, CPU)."""
    G = torch.randn(m, d, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    Fw = WoodburyFisher(G, damping=1e-4)
    build = time.perf_counter() - start
    v = torch.randn(d)
    out = {"m": m, "d": d, "dtype": "float32", "build_seconds": build}
    inverse = Fw.inverse()
    for name, op in (("F @ v", Fw), ("F^-1 @ v", inverse)):
        op @ v  # the first inverse product factorizes the m x m Gram matrix
        start = time.perf_counter()
        for _ in range(reps):
            op @ v
        out[name] = reps / (time.perf_counter() - start)
    start = time.perf_counter()
    Fw.update(torch.randn(d))
    out["update_seconds"] = time.perf_counter() - start
    out["grads_bytes"] = G.numel() * G.element_size()
    print(out, flush=True)
    return out


def _brief(row: dict) -> str:
    keys = ("model", "sparsity", "structure", "fraction", "method", "schedule", "test_loss")
    return " | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k])
                      for k in keys if k in row)  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    cases = [demo_case("digits"), demo_case("tiny-lm"), bert_case()]
    results = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or "cpu"},
        "settings": {"fine_tune_steps": TUNE_STEPS, "gradual_steps": GRADUAL, "m": 256,
                     "damping": 0.01, "fisher_block": 128, "curvature": "fisher"},
        "unstructured": [r for c in cases for r in unstructured(c)],
        "structured": [r for c in cases[1:] for r in structured(c)],
        "dense": {c.name: c.measure(c.model) for c in cases},
        "indefinite": indefinite(mlp_case()),
        "woodbury": woodbury_speed(),
    }  # fmt: skip
    results["seconds"] = time.perf_counter() - start
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, HERE / "RESULTS.md")
    print(f"done in {results['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

"""RESULTS.md from the benchmark's results (and peer.json when the captum run wrote it).

.venv/bin/python benchmarks/influence/report.py   # rewrite RESULTS.md from the JSON files
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def _f(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_f(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown(res: dict) -> str:
    lo, ml, un, hy, sc = (
        res[k] for k in ("loo_logistic", "loo_mlp", "unlearning", "hypergradient", "scale")
    )
    m = res["machine"]
    out = [
        "# Influence, unlearning and hypergradients: measured",
        "",
        f"`.venv/bin/python benchmarks/influence/run.py` on {m['cpu']}, {m['threads']} thread, "
        f"torch {m['torch']}; {res['seconds']:.0f} s in all. Every 'actual' number is a "
        "retrained model (exact Newton for the logistic regression, L-BFGS to a tiny gradient "
        "for the MLP). Convention: score = predicted change of the query loss when a point is "
        "REMOVED, (1/n) ∇L_qᵀ (H + λI)⁻¹ ∇ℓ_i; retraining drops the point's term ℓ_i/n.",
        "",
        "## 1. Leave-one-out retraining vs predicted change of the test loss",
        "",
        f"L2 logistic regression on scikit-learn digits ({lo['n_train']} training points, "
        f"650 parameters), test loss over {lo['queries']} test points, 50 random points removed "
        "one at a time; damping = λ (the weight decay), so H + λI is the exact Hessian. LiSSA's "
        "scale and depth are chosen by hesse from a Lanczos λmax (no hand tuning). slope = "
        "least-squares factor predicted/actual (1 = right magnitude).",
        "",
        _table(
            lo["rows"],
            [
                "lambda",
                "ihvp",
                "pearson",
                "spearman",
                "slope",
                "n_matvecs",
                "lissa_scale",
                "lissa_depth",
                "seconds",
            ],
        ),
        "",
        f"Small MLP (64-32-10, tanh, {ml['d']} parameters, weight decay {ml['weight_decay']}, "
        f"trained by L-BFGS to ‖∇‖ = {ml['gradient_norm']:.2g}); smallest eigenvalue of the "
        f"data Hessian {ml['lam_min_data_hessian']:.3g}. {ml['rows'][0]['points']} points "
        "removed, each retrained by L-BFGS from the trained weights (a non-convex model: "
        "retraining finds a nearby minimum).",
        "",
        _table(
            ml["rows"],
            [
                "curvature",
                "damping",
                "pearson",
                "spearman",
                "slope",
                "converged",
                "n_matvecs",
                "seconds",
            ],
        ),
        "",
        "## 2. Unlearning a random 5% of the training set",
        "",
        f"{un['forget']} forgotten, {un['remain']} remaining. distance = ‖θ − θ_retrain‖; "
        "MIA AUC = loss-threshold membership inference between forget set and test set "
        "(0.5: indistinguishable); loss gap = test loss − forget loss.",
        "",
    ]
    cols = [
        "method",
        "distance_to_retrained",
        "forget_loss",
        "forget_accuracy",
        "remain_accuracy",
        "test_accuracy",
        "mia_auc",
        "loss_gap",
        "seconds",
    ]
    cols_mlp = cols[:1] + ["distance_to_warm_retrain"] + cols[1:]
    out += [
        f"Logistic regression (weight decay {un['logistic']['weight_decay']}; retraining is "
        "from scratch, convex so the same optimum):",
        "",
        _table(un["logistic"]["rows"], cols),
        "",
        f"MLP (weight decay {un['mlp']['weight_decay']}; Newton damped by "
        f"{un['mlp']['extra_damping']:.3g} more, from the remaining Hessian's smallest "
        f"eigenvalue {un['mlp']['lam_min_remain_hessian']:.3g}; retraining from the same "
        "initialisation without the forget set, and warm: L-BFGS from the trained weights, the "
        "nearby minimum that a Newton step aims at):",
        "",
        _table(un["mlp"]["rows"], cols_mlp),
        "",
    ]
    out += [
        "## 3. Hypergradient of the validation loss with respect to weight decay",
        "",
        "Logistic regression on digits, λ = 0.01, validation = 180 held-out points; finite "
        "differences of the retrained (Newton) solution at λ ± 1e-6.",
        "",
        _table(
            hy["checks"],
            ["ihvp", "ift", "finite_difference", "relative_error", "n_matvecs", "seconds"],
        ),
        "",
        f"Per-tensor decays (weight, bias): IFT {[f'{v:.6g}' for v in hy['per_tensor']['ift']]}, "
        f"finite differences {[f'{v:.6g}' for v in hy['per_tensor']['finite_difference']]}.",
        "",
        "Hyperparameter optimisation from λ = 1: steps of 20·d/dlog λ on log λ (clipped to "
        "±1.5) with the IFT hypergradient (CG), retraining at each step; "
        "test = the other 180 held-out points.",
        "",
        _table(
            hy["hpo"],
            ["step", "lambda", "validation_loss", "test_loss", "test_accuracy", "d_dloglambda"],
        ),
        "",
        "## 4. Scale: 10⁴ training images × 10 queries",
        "",
        f"The digits demo's CNN ({sc['d']} parameters) trained on digits augmented to "
        f"{sc['n_train']} images (train accuracy {sc['train_accuracy']:.3f}, test "
        f"{sc['test_accuracy']:.3f}); damping {sc['damping']:.3g} = 5% of the empirical "
        "Fisher's λmax. One pass of per-sample gradients (vmap) for the training set. Woodbury "
        "is the exact inverse of the damped empirical Fisher, so it is the reference for "
        "'cg (empirical Fisher)' (solver error only); the GGN is another curvature (agreement).",
        "",
        _table(
            sc["rows"],
            [
                "method",
                "seconds",
                "inverse_seconds",
                "n_matvecs",
                "converged",
                "relative_error",
                "spearman",
                "top10_overlap",
            ],
        ),
        "",
        "Memory of the large items (bytes, from the result's `memory`; kept graphs from "
        "`hesse.plan`):",
        "",
    ]
    for r in sc["rows"]:
        items = ", ".join(f"{k} {v:,}" for k, v in r["memory_bytes"].items())
        out.append(f"- {r['method']}: {items}")
    return "\n".join(out + _peer()) + "\n"


def _peer() -> list[str]:
    path = HERE / "peer.json"
    if not path.is_file():
        return []
    peer = json.loads(path.read_text())
    return [
        "",
        f"## 5. Side by side: captum {peer['captum']} `NaiveInfluenceFunction`",
        "",
        f"`benchmarks/.venv/bin/python benchmarks/influence/peer_captum.py`: the logistic "
        f"regression of section 1 (λ = {peer['lambda']}), {peer['queries']} test points, "
        f"{peer['removed']} points removed. factor = least-squares factor from hesse's scores "
        "to captum's (sign and scale convention). captum adds `hessian_reg` to the Hessian of "
        "the *sum* of the losses, so n·λ matches the weight decay; with `hessian_reg = λ` its "
        "Hessian is nearly the data Hessian alone, which is singular for softmax regression.",
        "",
        _table(
            peer["rows"], ["method", "factor_vs_hesse", "pearson_loo", "spearman_loo", "seconds"]
        ),
    ]


if __name__ == "__main__":
    results = json.loads((HERE / "results.json").read_text())
    (HERE / "RESULTS.md").write_text(markdown(results))

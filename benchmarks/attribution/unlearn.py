r"""Unlearning scored against retraining: ``hesse.unlearn`` (Newton, IAU) on the three workloads.

    OMP_NUM_THREADS=1 benchmarks/attribution/.venv/bin/python benchmarks/attribution/unlearn.py \\
        [--only mlp-digits cnn-digits tiny-lm]

For each workload and forget set F (random 1% and 5% of the training set, fixed seeds; for the
classifiers also the 10% of points whose labels were flipped, with run.py's flips and model),
the model trained on everything (seed 0) is unlearned by ``hesse.unlearn`` and compared with
the model retrained on the rest from the same initialisation and seed (the workload's own
training function). Reported, with :math:`\theta_o` the original, :math:`\theta_r` the retrained
and :math:`\theta_u` the unlearned parameters:

- param ratio :math:`\|\theta_u - \theta_r\| / \|\theta_o - \theta_r\|` (1 = no better than not
  unlearning at all, 0 = exactly the retrained model);
- output ratio: the same ratio for the query outputs (margins; mean token losses for the LM);
- retraining's own noise: the same ratios for models retrained on the same points from seeds
  1 and 2 in place of :math:`\theta_u` (the networks are non-convex: other seeds land elsewhere).

Rows are cached in ``.cache/unlearn/``; the section "Unlearning against retraining" of RESULTS.md
is (re)written at the end of the file, the rest of RESULTS.md is left as it is.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector

sys.path.insert(0, str(Path(__file__).parent))
import methods as M  # noqa: E402
import workloads as W  # noqa: E402

from hesse.influence import unlearn  # noqa: E402

CACHE = M.CACHE / "unlearn"
RESULTS = Path(__file__).parent / "RESULTS.md"
HEADER = "## Unlearning against retraining"
FRACTIONS = {"mlp-digits": (0.01, 0.05), "cnn-digits": (0.01, 0.05), "tiny-lm": (0.01, 0.05)}
SEEDS = (0, 1, 2)
CG = {"ihvp": "cg", "tol": 1e-4, "max_matvecs": 300}
METHODS = {
    "newton-cg-ggn": {"method": "newton", "curvature": "ggn", **CG},
    "newton-cg-hessian": {"method": "newton", "curvature": "hessian", **CG},
    "newton-kfac": {"method": "newton", "ihvp": "kfac"},
    "newton-ekfac": {"method": "newton", "ihvp": "ekfac"},
    "influence-cg-ggn": {"method": "influence", "curvature": "ggn", **CG},
    "influence-kfac": {"method": "influence", "ihvp": "kfac"},
    "influence-ekfac": {"method": "influence", "ihvp": "ekfac"},
    "iau-ggn": {"method": "iau", "curvature": "ggn"},
    "newton-cg-ggn-d0.1": {"method": "newton", "curvature": "ggn", "damping": 0.1, **CG},
    "newton-ekfac-d0.1": {"method": "newton", "ihvp": "ekfac", "damping": 0.1},
}
"""hesse's unlearning settings: the workload's weight decay, and extra damping where named."""


def flipped(w: W.Workload) -> tuple[W.Workload, torch.Tensor]:
    """run.py's mislabel workload (10% flipped, generator seed 7): its model is cached there."""
    g = torch.Generator().manual_seed(7)
    mask = torch.zeros(len(w.y), dtype=torch.bool)
    mask[torch.randperm(len(w.y), generator=g)[: len(w.y) // 10]] = True
    y = w.y.clone()
    y[mask] = (y[mask] + torch.randint(1, w.classes, (int(mask.sum()),), generator=g)) % w.classes
    return W.Workload(**{**w.__dict__, "y": y, "name": w.name + "-flip"}), mask


def forget_sets(w: W.Workload) -> list[tuple[str, W.Workload, torch.Tensor]]:
    """``(label, workload whose seed-0 model is the original, forget mask)``."""
    out = []
    for k, frac in enumerate(FRACTIONS[w.name]):
        g = torch.Generator().manual_seed(100 + k)
        mask = torch.zeros(len(w.x), dtype=torch.bool)
        mask[torch.randperm(len(w.x), generator=g)[: max(1, round(frac * len(w.x)))]] = True
        out.append((f"random {frac:.0%}", w, mask))
    if w.output == "margin":
        noisy, mask = flipped(w)
        out.append(("flipped 10%", noisy, mask))
    return out


def retrained(w: W.Workload, label: str, mask: torch.Tensor, seed: int):
    """``(model, seconds)``: ``w``'s model trained without the masked points (cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{w.name}-{label.replace(' ', '').replace('%', 'pc')}-{seed}.pt"
    model = w.make(seed)
    if path.exists():
        state = torch.load(path, weights_only=True)
        seconds = float(state.pop("_seconds"))
        model.load_state_dict(state)
        return model.eval(), seconds
    start = time.perf_counter()
    model = w.train(torch.nonzero(~mask)[:, 0], seed)
    seconds = time.perf_counter() - start
    torch.save({**model.state_dict(), "_seconds": torch.tensor(seconds)}, path)
    return model, seconds


def warm(w: W.Workload, label: str, mask: torch.Tensor, original):
    """The original model trained further on the remaining points (the workload's ``fit``).

    The local target a Newton step aims at: the minimum of the remaining objective in the
    original's basin (cached).
    """
    path = CACHE / f"{w.name}-{label.replace(' ', '').replace('%', 'pc')}-warm.pt"
    model = copy.deepcopy(original)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = w.fit(model.train(), w.x[~mask], w.y[~mask], 0).eval()
    torch.save(model.state_dict(), path)
    return model


def _ratios(w, model, original, retrain) -> tuple[float, float]:
    flat = lambda m: parameters_to_vector(m.parameters()).detach().double()  # noqa: E731
    p = (flat(model) - flat(retrain)).norm() / (flat(original) - flat(retrain)).norm()
    out = (w.outputs(model) - w.outputs(retrain)).norm()
    return float(p), float(out / (w.outputs(original) - w.outputs(retrain)).norm())


def rows_of(w: W.Workload) -> list[dict]:
    """Every method and the retraining noise on every forget set of ``w``."""
    rows = []
    for label, source, mask in forget_sets(w):
        original = M.trained(source, 0)
        models = [retrained(source, label, mask, s) for s in SEEDS]
        retrain, retrain_s = models[0]
        local = warm(source, label, mask, original)
        base = {"workload": w.name, "forget": label, "n_forget": int(mask.sum()),
                "retrain_s": retrain_s}  # fmt: skip
        for s, (other, _) in list(enumerate(models))[1:]:
            p, o = _ratios(w, other, original, retrain)
            pw, ow = _ratios(w, other, original, local)
            rows.append(base | {"method": f"retrain seed {SEEDS[s]}", "param": p, "output": o,
                                "param_warm": pw, "output_warm": ow})  # fmt: skip
        forget = M.batches(source.x[mask], source.y[mask])
        remain = M.batches(source.x[~mask], source.y[~mask])
        for name, settings in METHODS.items():
            settings = dict(settings)
            if w.output == "loss" and settings.get("ihvp") in ("kfac", "ekfac"):
                settings["curvature"] = "fisher"  # as methods.py: the LM's GGN factors cost 92x
            row = base | {"method": name}
            try:
                r = unlearn(original, forget, remain, w.loss, weight_decay=w.wd, **settings)
                p, o = _ratios(w, r.model, original, retrain)
                pw, ow = _ratios(w, r.model, original, local)
                ok = r.inverse.converged if r.inverse is not None else True
                row |= {"param": p, "output": o, "param_warm": pw, "output_warm": ow,
                        "seconds": r.seconds, "matvecs": r.n_matvecs, "converged": ok,
                        "residual": r.residual}  # fmt: skip
            except Exception as err:  # an unlearning that fails is reported, not hidden
                row["error"] = f"{type(err).__name__}: {str(err)[:160]}"
                traceback.print_exc(limit=1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| workload | forget set | method | param ratio | output ratio | param ratio, warm "
        "| output ratio, warm | wall s | retrain s | residual |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["workload"], f"{r['forget']} ({r['n_forget']})", r["method"]]
        if "error" in r:
            cells += [f"failed: {r['error'][:90]}", "", "", "", "", "", ""]
        else:
            note = "" if r.get("converged", True) else " (not converged)"
            wall = f"{r['seconds']:.2f}{note}" if "seconds" in r else "-"
            cells += [f"{r[k]:.3f}" for k in ("param", "output", "param_warm", "output_warm")]
            cells += [
                wall,
                f"{r['retrain_s']:.2f}",
                f"{r['residual']:.1f}" if "residual" in r else "",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(rows: list[dict]) -> list[str]:
    """Per forget set: the best method by output ratio, against retraining's own noise."""
    lines = [
        "| workload | forget set | best output ratio (method, wall s) | best warm output ratio "
        "(method) | other seeds' output ratio | retrain s |",
        "|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys((r["workload"], r["forget"]) for r in rows):
        mine = [r for r in rows if (r["workload"], r["forget"]) == key]
        done = [r for r in mine if "seconds" in r]
        noise = [r["output"] for r in mine if r["method"].startswith("retrain seed")]
        best = min(done, key=lambda r: r["output"])
        warm = min(done, key=lambda r: r["output_warm"])
        lines.append(
            f"| {key[0]} | {key[1]} | {best['output']:.3f} ({best['method']}, "
            f"{best['seconds']:.2f}) | {warm['output_warm']:.3f} ({warm['method']}) | "
            f"{min(noise):.3f}-{max(noise):.3f} | {mine[0]['retrain_s']:.2f} |"
        )
    return lines


def write(rows: list[dict]) -> None:
    """Replace (or append) the unlearning section at the end of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    before, _, after = text.partition("\n" + HEADER)
    rest = after.partition("\n## ")[2]  # sections others added after this one stay
    text = before.rstrip("\n") + ("\n\n## " + rest.rstrip("\n") if rest else "")
    section = [
        "",
        HEADER,
        "",
        "Generated by `unlearn.py` (torch 2.13.0+cpu, one thread on a shared 2-core machine).",
        "The original model (seed 0, all training points) is unlearned by `hesse.unlearn` and",
        "compared with the model retrained without the forget set from the same initialisation",
        "and seed. Ratios are `||x_unlearned - x_retrained|| / ||x_original - x_retrained||` for",
        "the parameters and for the query outputs (margins; mean token losses for the LM): 1 is",
        "no better than not unlearning, 0 is the retrained model. Rows 'retrain seed s' put a",
        "model retrained on the same points from another seed in place of the unlearned one:",
        "retraining's own noise (the networks are non-convex, so another seed lands in another",
        "basin). Weight decay is the workload's; '-d0.1' adds damping 0.1; CG at tol 1e-4, <= 300",
        "products; the LM's KFAC/EK-FAC use the empirical Fisher's factors (as methods.py does).",
        "'warm' columns measure against the original model trained further on the remaining",
        "points by the same training function (warm start): the minimum in the original's basin",
        "that a Newton step aims at. Retrain s: one retraining from scratch. 'newton' steps by",
        "the remaining objective's whole gradient, 'influence' by the forget set's share of it",
        "only (the two agree at a minimum of the training objective); residual is",
        "`UnlearnResult.residual`, `||grad J|| / ||(W_F/W) d||` at the original model: how far it",
        "is from a minimum of its training objective, in units of the removal's own gradient.",
        "",
        *summary(rows),
        "",
        "Every row (retraining times are of one retraining; the first one measured includes",
        "start-up):",
        "",
        *table(rows),
        "",
    ]
    RESULTS.write_text(text + "\n" + "\n".join(section))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=list(W.WORKLOADS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        rows = rows_of(W.WORKLOADS[name]())
        (CACHE / f"{name}-rows.json").write_text(json.dumps(rows, indent=1))
    every = []
    for name in W.WORKLOADS:
        path = CACHE / f"{name}-rows.json"
        every += json.loads(path.read_text()) if path.exists() else []
    write(every)


if __name__ == "__main__":
    main()

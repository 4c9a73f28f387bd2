"""HESSO benchmark: train-and-prune in one run against prune-after-training, equal parameters.

Models and data come from benchmarks/prune (``_cases``): the digits CNN demo and the small
BERT on digits read as patch tokens, 20% held out. For each target group sparsity:

- ``hesso scratch``: HESSO from the initialisation, for the dense training budget plus the
  fine-tune budget (the paper's one run);
- ``hesso tuned`` and ``hesso+cric tuned``: HESSO from the trained model for the fine-tune
  budget (CRIC adds its cycles);
- prune-after-training: the trained model, groups ranked by magnitude, NViT (hesse's
  ``group_saliency``, empirical Fisher), HEAPr (BERT MLP neurons) or group OBS (digits: the
  dense damped empirical Fisher, saliency ½ w_Sᵀ[(F⁻¹)_SS]⁻¹ w_S and the joint OBS update),
  removed greedily until as many parameters are gone as HESSO tuned removed, then the same
  fine-tune budget with the removed groups held at zero.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hesso/run.py``; writes results.json and
RESULTS.md here. ``oto_run.py`` (its own venv) adds only-train-once's HESSO when it runs.
"""

from __future__ import annotations

import copy
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "prune"))
sys.path.insert(0, str(HERE))

from _cases import Case, bert_case, demo_case, fine_tune  # noqa: E402
from _hesso_report import write_results  # noqa: E402

from hesse import Objective  # noqa: E402
from hesse.demo import digits, load_demo  # noqa: E402
from hesse.prune import (  # noqa: E402  # noqa: E402
    CRIC,
    HESSO,
    collect_gradients,
    expert_saliency,
    group_saliency,
    hesso_groups,
    remove_groups,
)
from hesse.prune._units import unit_index  # noqa: E402

TUNE = 300  # the fine-tune budget (optimizer steps)
CACHE = HERE / ".cache"
_OBS: dict = {}


def size(model) -> dict:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    widths = [p.shape[0] for n, p in model.named_parameters() if p.ndim > 1]
    return {"params": sum(p.numel() for p in model.parameters()), "bytes": buf.tell(),
            "widths": widths}  # fmt: skip


def batches(case: Case, steps: int, seed: int = 0):
    order = torch.randperm(len(case.tune_batches), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        yield case.tune_batches[int(order[step % len(order)])]


def run_hesso(case: Case, model, steps: int, cric=None, seed: int = 0, **kw):
    """Train ``model`` with HESSO for ``steps`` (plus CRIC's cycles); the pruned copy."""
    model = copy.deepcopy(model).train()
    opt = HESSO(model, cric=cric, **kw)
    it = batches(case, 10**9, seed)
    t0 = time.perf_counter()
    while not (opt.finished and opt.n_steps >= steps + opt.cric_steps):
        batch = next(it)

        def closure(batch=batch):
            opt.zero_grad()
            loss = case.batch_loss(model, batch)
            loss.backward()
            return loss

        opt.step(closure)
    result = opt.result()
    assert result.finished and result.zero_groups >= len(result.units)
    small = result.apply(model.eval())
    return small, result, time.perf_counter() - t0, opt.n_steps


def greedy(units, scores, model, target_removed: int) -> list:
    """Lowest scores first (each module keeps one) until ``target_removed`` params are gone."""
    total, chosen = size(model)["params"], []
    left = {u.module: sum(v.module == u.module for v in units) for u in units}
    for i in scores.argsort().tolist():
        if left[units[i].module] == 1:
            continue
        chosen.append(units[i])
        left[units[i].module] -= 1
        if total - size(remove_groups(model, chosen))["params"] >= target_removed:
            break
    return chosen


def masks_of(model, units) -> dict:
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for u in units:
        for name, dim, idx in u.slices:
            masks[name].index_fill_(dim, torch.tensor(idx), False)
    return masks


def zeroed(model, masks, weights=None):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if weights is not None:
                p.copy_(weights[name])
            p.mul_(masks[name])
    return model


def obs_scores(obj: Objective, units, damping=1e-2):
    """Group OBS with the dense damped empirical Fisher: scores and the joint-update function."""
    G = collect_gradients(obj, m=None).to(torch.float64)
    F = G.T @ G / len(G)
    F += damping * F.diagonal().mean() * torch.eye(len(F), dtype=F.dtype)
    Finv = torch.linalg.inv(F)
    w = obj.space.join(obj.params).detach().to(torch.float64)
    index = [unit_index(obj.space, u) for u in units]
    scores = torch.stack([0.5 * w[i] @ torch.linalg.solve(Finv[i][:, i], w[i]) for i in index])

    def update(chosen) -> dict:
        S = torch.cat([unit_index(obj.space, u) for u in chosen]).unique()
        new = w - Finv[:, S] @ torch.linalg.solve(Finv[S][:, S], w[S])
        new[S] = 0
        return {n: t.to(torch.float32) for n, t in obj.space.split(new).items()}

    return scores, update


def scores_of(method: str, case: Case, dense, units, seed: int):
    obj = Objective(dense, case.train, loss=case.loss, loss_fn=case.loss_fn)
    if method == "magnitude":
        params = dict(dense.named_parameters())
        return torch.stack(
            [
                sum((params[n].index_select(d, torch.tensor(i)) ** 2).sum() for n, d, i in u.slices)
                for u in units
            ]
        ).double(), None
    if method == "nvit":
        return group_saliency(obj, units, m=256, seed=seed).scores, None
    if method == "heapr":
        got = expert_saliency(obj)
        by_unit = dict(zip(got.units, got.scores.tolist(), strict=True))
        return torch.tensor([by_unit.get(u, float("inf")) for u in units]), None
    if case.name not in _OBS:  # seed-independent and the slowest: once per case
        _OBS[case.name] = obs_scores(obj, units)
    return _OBS[case.name]


def after_training(case: Case, dense, method: str, target_removed: int, seed: int) -> dict:
    t0 = time.perf_counter()
    units = hesso_groups(dense)
    scores, update = scores_of(method, case, dense, units, seed)
    chosen = greedy(units, scores, dense, target_removed)
    masks = masks_of(dense, chosen)
    pruned = zeroed(dense, masks, None if update is None else update(chosen))
    before = case.measure(pruned)
    tuned = fine_tune(case, pruned, masks, TUNE, seed=seed)
    small = remove_groups(tuned, chosen)
    return {"method": f"{method} + fine-tune", "steps": TUNE, "groups": len(chosen),
            "before_tune": before, **case.measure(small), **size(small),
            "seconds": time.perf_counter() - t0}  # fmt: skip


def hesso_row(name, case, small, result, seconds, steps) -> dict:
    return {"method": name, "steps": steps, "groups": len(result.units),
            "cric_cycles": result.cycles, **case.measure(small), **size(small),
            "seconds": seconds}  # fmt: skip


def compare(case, fresh, sparsities, base: dict, scratch: dict, methods, seeds) -> list[dict]:
    return [
        {"seed": seed, **row}
        for s in sparsities
        for seed in seeds
        for row in _compare_at(case, fresh, s, base, scratch, methods, seed)
    ]


def _compare_at(case, fresh, s, base, scratch, methods, seed) -> list[dict]:
    rows, dense = [], case.model
    tuned_kw = dict(base, target_group_sparsity=s, pruning_steps=200, pruning_periods=4, seed=seed)
    small, result, sec, n = run_hesso(case, dense, TUNE, **tuned_kw)
    rows.append({"sparsity": s, **hesso_row("hesso tuned", case, small, result, sec, n)})
    target = result.removed_params
    cric = CRIC(sampling_steps=25, max_cycles=4)
    small, res, sec, n = run_hesso(case, dense, TUNE, cric=cric, **tuned_kw)
    rows.append({"sparsity": s, **hesso_row("hesso+cric tuned", case, small, res, sec, n)})
    kw = {k: v for k, v in scratch.items() if k != "steps"}
    small, res, sec, n = run_hesso(
        case, fresh, scratch["steps"], target_group_sparsity=s, seed=seed, **kw
    )
    rows.append({"sparsity": s, **hesso_row("hesso scratch", case, small, res, sec, n)})
    for method in methods:
        rows.append({"sparsity": s, **after_training(case, dense, method, target, seed)})
    print(f"{case.name} {s} seed {seed}: done", file=sys.stderr)
    return rows


def digits_rows() -> tuple[dict, list[dict]]:
    case = demo_case("digits")
    demo = load_demo("digits", holdout=0.2)
    epochs = demo.training["epochs"]
    fresh = digits.build_model(digits.Config(seed=0))
    steps = epochs * len(case.tune_batches) + TUNE
    base = dict(lr=case.lr, variant="sgd")
    scratch = dict(lr=0.1, variant="sgd", steps=steps, start_pruning_step=int(0.3 * steps),
                   pruning_steps=int(0.4 * steps), pruning_periods=5)  # fmt: skip
    export_for_oto(case, fresh, steps, 0.1, "digits")
    methods = ["magnitude", "nvit", "obs"]
    rows = compare(case, fresh, [0.5, 0.75], base, scratch, methods, seeds=(0, 1, 2))
    info = {"dense": {**case.measure(case.model), **size(case.model)},
            "dense_steps": steps - TUNE, "groups": len(hesso_groups(case.model))}  # fmt: skip
    return info, rows


def export_for_oto(case: Case, fresh, steps: int, lr: float, name: str) -> None:
    """A model (initial and trained, whole modules) and its data, for ``oto_run.py``."""
    CACHE.mkdir(exist_ok=True)
    data = {"fresh": fresh, "dense": case.model, "tune_batches": case.tune_batches,
            "test": case.test, "lr": case.lr, "scratch_lr": lr, "steps": steps,
            "tune": TUNE}  # fmt: skip
    torch.save(data, CACHE / f"{name}_for_oto.pt")


def bert_rows() -> tuple[dict, list[dict]]:
    CACHE.mkdir(exist_ok=True)
    path = CACHE / "bert_dense.pt"
    fresh = bert_case(steps=0)
    case = bert_case(steps=0)
    if path.exists():
        case.model.load_state_dict(torch.load(path))
    else:
        case = bert_case(steps=1200)
        torch.save(case.model.state_dict(), path)
    case.model.eval()
    base = dict(lr=case.lr, variant="adam")
    steps = 1200 + TUNE
    scratch = dict(lr=3e-3, variant="adam", steps=steps, start_pruning_step=int(0.3 * steps),
                   pruning_steps=int(0.4 * steps), pruning_periods=5)  # fmt: skip
    export_for_oto(case, fresh.model, steps, 3e-3, "bert")
    methods = ["magnitude", "nvit", "heapr"]
    rows = compare(case, fresh.model, [0.3, 0.6], base, scratch, methods, seeds=(0,))
    info = {"dense": {**case.measure(case.model), **size(case.model)},
            "dense_steps": 1200, "groups": len(hesso_groups(case.model))}  # fmt: skip
    return info, rows


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = {"fine_tune_steps": TUNE, "torch": torch.__version__, "cases": {}}
    for name, fn in (("digits CNN", digits_rows), ("small BERT", bert_rows)):
        info, rows = fn()
        results["cases"][name] = {**info, "rows": rows}
    oto = CACHE / "oto.json"
    if oto.exists():
        results["oto"] = json.loads(oto.read_text())
    results["seconds"] = time.perf_counter() - t0
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_results(results, HERE / "RESULTS.md")
    print(f"done in {results['seconds']:.0f} s", file=sys.stderr)


def report() -> None:
    """Rewrite RESULTS.md from results.json, with only-train-once's rows when they exist."""
    results = json.loads((HERE / "results.json").read_text())
    oto = CACHE / "oto.json"
    if oto.exists():
        results["oto"] = json.loads(oto.read_text())
        (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_results(results, HERE / "RESULTS.md")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report() if sys.argv[1:] == ["--report"] else main()

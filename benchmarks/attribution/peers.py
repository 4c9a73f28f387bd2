"""The peers on a workload: kronfluence (EK-FAC), TRAK (traker, CPU projector), dattri.

Each function returns ``(scores (n_query, n_train), seconds)`` in the PEER's own sign and
scale; ``run.py`` measures the factor to hesse's convention (hesse.influence's docstring)
against hesse's exact scores and reports it. Query/train batches of 100, CPU, one thread.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from workloads import Workload, margins

BATCH = 100


def _sum_loss(w: Workload, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


# ---------------------------------------------------------------- kronfluence
def kronfluence_scores(w: Workload, model, *, damping: float | None = 1e-8, strategy="ekfac",
                       self_scores: bool = False):  # fmt: skip
    """Kronfluence 1.0 pairwise scores; ``damping=None`` is its 0.1 x mean-eigenvalue heuristic.

    Its documented defaults: EK-FAC, damping_factor 1e-8, the "true" Fisher from labels
    sampled from the model (``compute_train_loss(sample=True)``), measurement = the margin
    for classification and the loss for a language model (its examples' choices).
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            out = model(x)
            if sample:
                with torch.no_grad():
                    probs = out.detach().movedim(1, -1).softmax(-1)
                    y = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(y.shape)
            return _sum_loss(w, out, y)

        def compute_measurement(self, batch, model):
            x, y = batch
            out = model(x)
            if w.output == "loss":
                return _sum_loss(w, out, y)
            return margins(out, y).sum()

    out_dir = tempfile.mkdtemp(prefix="kronfluence-")
    try:
        start = time.perf_counter()
        m = prepare_model(copy.deepcopy(model), _Task())  # it freezes and wraps the model
        analyzer = Analyzer("a", m, _Task(), cpu=True, disable_tqdm=True, output_dir=out_dir)
        train = TensorDataset(w.x, w.y)
        analyzer.fit_all_factors(
            "f", dataset=train, per_device_batch_size=BATCH,
            factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True,
        )  # fmt: skip
        args = ScoreArguments(damping_factor=damping)
        if self_scores:
            analyzer.compute_self_scores(
                "s", "f", train_dataset=train, per_device_train_batch_size=BATCH,
                score_args=args, overwrite_output_dir=True,
            )  # fmt: skip
            scores = analyzer.load_self_scores("s")["all_modules"][None, :]
        else:
            analyzer.compute_pairwise_scores(
                "s", "f", query_dataset=TensorDataset(w.xq, w.yq), train_dataset=train,
                per_device_query_batch_size=BATCH, per_device_train_batch_size=BATCH,
                score_args=args, overwrite_output_dir=True,
            )  # fmt: skip
            scores = analyzer.load_pairwise_scores("s")["all_modules"]
        return scores.double(), time.perf_counter() - start
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


# ---------------------------------------------------------------- traker
def _lm_output():
    from trak.modelout_functions import AbstractModelOutput

    class LMOutput(AbstractModelOutput):
        """Output = log-likelihood of the sequence (minus its mean token loss); out-to-loss 1."""

        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, tokens, targets):
            logits = torch.func.functional_call(model, (weights, buffers), tokens.unsqueeze(0))
            return -F.cross_entropy(logits, targets.unsqueeze(0))

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)

    return LMOutput()


def trak_scores(w: Workload, models, *, proj_dim: int = 2048, lambda_reg: float = 0.0,
                queries=None, half: bool = True):  # fmt: skip
    """TRAK scores ``(n_query, n_train)`` by traker 0.3 over ``models`` (CPU projector).

    Its defaults: proj_dim 2048, lambda_reg 0, half precision; the margin output for
    classification (``task="image_classification"``), for the LM a log-likelihood output.
    """
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    xq, yq = queries if queries is not None else (w.xq, w.yq)
    save = tempfile.mkdtemp(prefix="trak-")
    try:
        start = time.perf_counter()
        models = [copy.deepcopy(m) for m in models]
        model = models[0]
        d = sum(p.numel() for p in model.parameters())
        dtype = torch.float16 if half else torch.float32
        projector = BasicProjector(d, proj_dim, seed=0, proj_type=ProjectionType.rademacher,
                                   device="cpu", dtype=dtype)  # fmt: skip
        task = _lm_output() if w.output == "loss" else "image_classification"
        traker = TRAKer(
            model=model, task=task, train_set_size=len(w.x), save_dir=save, device="cpu",
            projector=projector, proj_dim=proj_dim, use_half_precision=half,
            lambda_reg=lambda_reg, logging_level=40,
        )  # fmt: skip
        for i, m in enumerate(models):
            traker.load_checkpoint(m.state_dict(), model_id=i)
            for a in range(0, len(w.x), BATCH):
                batch = (w.x[a : a + BATCH], w.y[a : a + BATCH])
                traker.featurize(batch=batch, num_samples=len(batch[0]))
        traker.finalize_features()
        for i, m in enumerate(models):
            traker.start_scoring_checkpoint("q", m.state_dict(), model_id=i, num_targets=len(xq))
            for a in range(0, len(xq), BATCH):
                batch = (xq[a : a + BATCH], yq[a : a + BATCH])
                traker.score(batch=batch, num_samples=len(batch[0]))
        scores = torch.as_tensor(traker.finalize_scores("q")).double().T
        return scores, time.perf_counter() - start
    finally:
        shutil.rmtree(save, ignore_errors=True)


# ---------------------------------------------------------------- dattri
DATTRI = ("explicit", "cg", "lissa", "arnoldi", "ekfac", "tracin", "trak")


def _dattri_task(w: Workload, models):
    from dattri.task import AttributionTask

    model, per_sample = models[0], w.x.dim() - 1

    def f(params, data):
        x, y = data
        if x.dim() == per_sample:  # dattri's vmapped attributors pass one sample
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return F.cross_entropy(torch.func.functional_call(model, params, x), y)

    def p_correct(params, data):
        return torch.exp(-f(params, data))

    ckpts = [m.state_dict() for m in models]
    task = AttributionTask(
        loss_func=f, model=model, checkpoints=ckpts if len(ckpts) > 1 else ckpts[0]
    )
    return task, p_correct


def dattri_scores(w: Workload, models, method: str, *, damping: float | None = None,
                  queries=None):  # fmt: skip
    """Scores of dattri 0.3, ``(n_query, n_train)``; ``damping=None``: the attributor's default."""
    from dattri.algorithm import influence_function as IF
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor

    xq, yq = queries if queries is not None else (w.xq, w.yq)
    task, p_correct = _dattri_task(w, [copy.deepcopy(m) for m in models])
    reg = {} if damping is None else {"regularization": damping}
    build = {
        "explicit": lambda: IF.IFAttributorExplicit(task=task, **reg),
        "cg": lambda: IF.IFAttributorCG(task=task, **reg),
        "lissa": lambda: IF.IFAttributorLiSSA(task=task, **reg),
        "arnoldi": lambda: IF.IFAttributorArnoldi(task=task, **reg),
        "ekfac": lambda: IF.IFAttributorEKFAC(
            task=task, **({} if damping is None else {"damping": damping})
        ),
        "tracin": lambda: TracInAttributor(
            task=task, weight_list=torch.ones(len(models)), normalized_grad=False
        ),
        "trak": lambda: TRAKAttributor(
            task=task, correct_probability_func=p_correct, device="cpu", **reg
        ),
    }
    start = time.perf_counter()
    attributor = build[method]()
    train = DataLoader(TensorDataset(w.x, w.y), batch_size=BATCH)
    test = DataLoader(TensorDataset(xq, yq), batch_size=BATCH)
    if method == "trak":
        attributor.cache(train)
        with torch.no_grad():
            scores = attributor.attribute(test)
    else:
        if method != "tracin":
            attributor.cache(train)
        scores = attributor.attribute(train, test)
    return scores.detach().double().T, time.perf_counter() - start

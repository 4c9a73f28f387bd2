"""The loss a Hugging Face model computes for itself, told from its class and config.

A ``transformers`` model given ``labels`` returns its own loss, but hesse's GGN and Fisher
need that loss as a function of the logits. The task of the model's class says which loss it
is (``modeling_auto``'s task tables, else the class name's ending), the config says which
problem a sequence classifier solves, and the first batch that counts labels confirms it: a
subclass that computes another loss keeps its own. The same table of tasks names the Auto class
that :func:`hesse.hf.load_model` loads a folder with.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._losses import IGNORE_INDEX, LOSS_BY_KIND, LossSpec, ResolvedLoss, target_weight


@dataclass(frozen=True)
class Task:
    """A Hugging Face task: how its models load, how they are told, and the loss they compute.

    Attributes:
        auto_class: The ``transformers`` Auto class that loads a model folder for the task.
        mapping: ``modeling_auto``'s table of the task's model classes.
        suffixes: Class name endings that imply the task (for classes outside the table).
        loss: The loss the task's models compute, as ``Objective.loss_source`` names it.
    """

    auto_class: str
    mapping: str
    suffixes: tuple[str, ...]
    loss: str


# most likely first, for a class listed in several tables
TASKS = {
    "causal-lm": Task(
        "AutoModelForCausalLM",
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        ("ForCausalLM", "LMHeadModel"),
        "token cross-entropy, shifted",
    ),
    "masked-lm": Task(
        "AutoModelForMaskedLM",
        "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
        ("ForMaskedLM",),
        "token cross-entropy",
    ),
    "token-classification": Task(
        "AutoModelForTokenClassification",
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
        ("ForTokenClassification",),
        "token cross-entropy",
    ),
    "sequence-classification": Task(
        "AutoModelForSequenceClassification",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        ("ForSequenceClassification",),
        "cross-entropy",
    ),
}
# the loss of a sequence classifier with problem_type "regression" (one output by default)
REGRESSION = "regression"
OWN_LOSS = "model(**batch).loss"  # Objective.loss_source of a model's own loss, used as it is


def loss_words(task: str) -> str:
    """The loss of a task (or of :data:`REGRESSION`), as ``Objective.loss_source`` names it."""
    return "mean squared error" if task == REGRESSION else TASKS[task].loss


def infer_own_loss(
    model: nn.Module,
    labels: torch.Tensor,
    batches: Iterable[Mapping[str, torch.Tensor]],
    forward: Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
) -> ResolvedLoss:
    """The loss a model computes for itself, as a function of its logits when hesse knows it.

    Args:
        model: The model that computes its own loss from dict batches with ``labels``.
        labels: The ``labels`` of the first batch.
        batches: The data (:func:`match_task` confirms the loss on it).
        forward: ``forward(batch) -> (logits, own_loss)``.

    Returns:
        The inferred loss; else the model's own loss used as it is (no ``call``), weighted as
        its class's task when it has one (a subclass that computes another loss).
    """
    tasks = hf_tasks(model, labels)
    if not tasks:
        return ResolvedLoss(None, None, OWN_LOSS)
    task = match_task(tasks, batches, forward)
    if task is None:
        return ResolvedLoss(None, None, OWN_LOSS, task=tasks[0])
    spec = task_spec(task)
    source = f"inferred from {type(model).__name__}: {loss_words(task)}"
    return ResolvedLoss(LOSS_BY_KIND[spec.kind], spec, source, task=task)


def hf_tasks(model: nn.Module, labels: torch.Tensor) -> list[str]:
    """Tasks whose loss a transformers model computes, for its most specific known class.

    Args:
        model: Any module; only a ``transformers.PreTrainedModel`` has tasks.
        labels: The ``labels`` of a batch (their dtype tells single- from multi-label).

    Returns:
        Candidate tasks (keys of :data:`TASKS`, or :data:`REGRESSION`), most likely first;
        empty when the loss is not one hesse knows (not a transformers model, or a multi-label
        classifier's BCE).
    """
    transformers = sys.modules.get("transformers")  # a transformers model implies the import
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return []
    from transformers.models.auto import modeling_auto

    tables = {t: _class_names(getattr(modeling_auto, task.mapping)) for t, task in TASKS.items()}
    for cls in type(model).__mro__:
        tasks = [t for t, names in tables.items() if cls.__name__ in names]
        tasks = tasks or [t for t, task in TASKS.items() if cls.__name__.endswith(task.suffixes)]
        if tasks:
            return [p for p in (_problem(model, t, labels) for t in tasks) if p is not None]
    return []


def task_spec(task: str) -> LossSpec:
    """The loss of a task: MSE for regression, cross-entropy ignoring -100 for the others."""
    return LossSpec("mse") if task == REGRESSION else LossSpec("cross_entropy", IGNORE_INDEX)


def task_outputs(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Logits in the layout the task's loss reads: ``(samples, outputs)`` or ``(tokens, C)``.

    Token tasks give one row per token, sample-major (sample ``j``'s tokens are consecutive
    rows); a causal LM drops the last position, whose prediction has no label.
    """
    if task == "causal-lm":
        logits = logits[..., :-1, :]
    if task == REGRESSION:
        return logits.reshape(logits.shape[0], -1)
    return logits.reshape(-1, logits.shape[-1])


def task_targets(task: str, labels: torch.Tensor) -> torch.Tensor:
    """Labels matching :func:`task_outputs` row for row (a causal LM's shifted by one)."""
    if task == "causal-lm":
        labels = labels[..., 1:]
    if task == REGRESSION:
        return labels.reshape(labels.shape[0], -1)
    return labels.reshape(-1)


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32, as transformers computes its losses."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def match_task(
    tasks: list[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    forward: Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
) -> str | None:
    """The first task whose loss of the logits equals the model's own loss on a batch.

    A batch confirms only the tasks that count some of its labels: the model's mean over no
    label is 0/0, so a batch whose labels are all ignored (for a causal LM, all but the first
    of each row) says nothing, and the next batch is tried.

    Args:
        tasks: Candidate tasks, most likely first (:func:`hf_tasks`).
        batches: The data, as the objective yields it.
        forward: ``forward(batch) -> (logits, own_loss)``, the model's outputs on a batch.

    Returns:
        The confirmed task; None when a batch that counts labels for every task matches none
        (a subclass that computes another loss), or when no batch counts any label.
    """
    for batch in batches:
        labels = batch["labels"]
        counted = [t for t in tasks if target_weight(task_targets(t, labels), task_spec(t)) > 0]
        if not counted:
            continue
        logits, own = forward(batch)
        for task in counted:
            mine = LOSS_BY_KIND[task_spec(task).kind](
                upcast(task_outputs(task, logits)), task_targets(task, labels)
            )
            # transformers computes LM losses in float32 whatever the model's dtype
            if torch.isclose(mine.float(), own.float(), rtol=1e-4):
                return task
        if len(counted) == len(tasks):
            return None
    return None


def _class_names(table: Mapping) -> set[str]:
    names: set[str] = set()
    for value in table.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _problem(model: nn.Module, task: str, labels: torch.Tensor) -> str | None:
    """A sequence classifier's loss as transformers picks it (None: multi-label, BCE)."""
    if task != "sequence-classification":
        return task
    config: Any = model.config  # a transformers PretrainedConfig, read as transformers reads it
    problem = config.problem_type
    if problem is None:
        problem = "regression" if config.num_labels == 1 else "multi_label_classification"
        if config.num_labels > 1 and not labels.is_floating_point():
            problem = "single_label_classification"
    return {"regression": REGRESSION, "single_label_classification": task}.get(problem)

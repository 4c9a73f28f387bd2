"""The loss a Hugging Face model computes for itself, told from its class and config.

A ``transformers`` model given ``labels`` returns its own loss, but hesse's GGN and Fisher
need that loss as a function of the logits. The task of the model's class says which loss it
is (``modeling_auto``'s task tables, else the class name's ending), the config says which
problem a sequence classifier solves, and one batch confirms it: a subclass that computes
another loss keeps its own.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch
from torch import nn

from ._losses import IGNORE_INDEX, LOSS_BY_KIND, LossSpec, target_weight

# what each task's loss is, as ``Objective.loss_source`` names it
TASKS = {
    "causal-lm": "token cross-entropy, shifted",
    "masked-lm": "token cross-entropy",
    "token-classification": "token cross-entropy",
    "sequence-classification": "cross-entropy",
    "regression": "mean squared error",
}
# each task's table of model classes in transformers, and the class name endings that imply it
_HF_TABLES = {
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", ("ForCausalLM", "LMHeadModel")),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", ("ForMaskedLM",)),
    "token-classification": (
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
        ("ForTokenClassification",),
    ),
    "sequence-classification": (
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        ("ForSequenceClassification",),
    ),
}


def hf_tasks(model: nn.Module, labels: torch.Tensor) -> list[str]:
    """Tasks whose loss a transformers model computes, for its most specific known class.

    Args:
        model: Any module; only a ``transformers.PreTrainedModel`` has tasks.
        labels: The ``labels`` of a batch (their dtype tells single- from multi-label).

    Returns:
        Candidate tasks (keys of :data:`TASKS`), most likely first; empty when the loss is not
        one hesse knows (not a transformers model, or a multi-label classifier's BCE).
    """
    transformers = sys.modules.get("transformers")  # a transformers model implies the import
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return []
    from transformers.models.auto import modeling_auto

    tables = {t: (_class_names(getattr(modeling_auto, n)), s) for t, (n, s) in _HF_TABLES.items()}
    for cls in type(model).__mro__:
        tasks = [t for t, (names, _) in tables.items() if cls.__name__ in names]
        tasks = tasks or [t for t, (_, ends) in tables.items() if cls.__name__.endswith(ends)]
        if tasks:
            return [p for p in (_problem(model, t, labels) for t in tasks) if p is not None]
    return []


def task_spec(task: str) -> LossSpec:
    """The loss of a task: MSE for regression, cross-entropy ignoring -100 for the others."""
    return LossSpec("mse") if task == "regression" else LossSpec("cross_entropy", IGNORE_INDEX)


def task_outputs(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Logits in the layout the task's loss reads: ``(samples, outputs)`` or ``(tokens, C)``.

    Token tasks give one row per token, sample-major (sample ``j``'s tokens are consecutive
    rows); a causal LM drops the last position, whose prediction has no label.
    """
    if task == "causal-lm":
        logits = logits[..., :-1, :]
    if task == "regression":
        return logits.reshape(logits.shape[0], -1)
    return logits.reshape(-1, logits.shape[-1])


def task_targets(task: str, labels: torch.Tensor) -> torch.Tensor:
    """Labels matching :func:`task_outputs` row for row (a causal LM's shifted by one)."""
    if task == "causal-lm":
        labels = labels[..., 1:]
    if task == "regression":
        return labels.reshape(labels.shape[0], -1)
    return labels.reshape(-1)


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32, as transformers computes its losses."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def match_task(
    tasks: list[str], logits: torch.Tensor, labels: torch.Tensor, own: torch.Tensor
) -> str | None:
    """The first task whose loss of ``logits`` equals the model's own loss ``own`` on a batch.

    A batch whose labels are all ignored confirms nothing: its first task is taken. None when
    no task's loss matches (a subclass that computes another loss).
    """
    for task in tasks:
        spec, y = task_spec(task), task_targets(task, labels)
        if target_weight(y, spec) == 0:
            return task
        mine = LOSS_BY_KIND[spec.kind](upcast(task_outputs(task, logits)), y)
        # transformers computes LM losses in float32 whatever the model's dtype
        if torch.isclose(mine.float(), own.float(), rtol=1e-4):
            return task
    return None


def _class_names(table: Mapping) -> set[str]:
    names = set()
    for value in table.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _problem(model: nn.Module, task: str, labels: torch.Tensor) -> str | None:
    """A sequence classifier's loss as transformers picks it (None: multi-label, BCE)."""
    if task != "sequence-classification":
        return task
    config = model.config
    problem = config.problem_type
    if problem is None:
        problem = "regression" if config.num_labels == 1 else "multi_label_classification"
        if config.num_labels > 1 and not labels.is_floating_point():
            problem = "single_label_classification"
    return {"regression": "regression", "single_label_classification": task}.get(problem)

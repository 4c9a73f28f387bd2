"""Hugging Face checkpoints and text files as the model and data of an Objective.

``load_model`` opens a local model folder (``config.json``, weights, tokenizer) offline with
the Auto class of a task; ``text_batches`` turns a ``.txt``, ``.csv`` or ``.jsonl`` file into
padded dict batches (``input_ids``, ``attention_mask``, ``labels``) that the model's own loss
accepts. ``transformers`` is imported only when these functions run.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, cast

import torch

from ._hf_losses import TASKS
from .params import _shorten

__all__ = ["MASK_RATE", "TASKS", "infer_task", "load_model", "text_batches"]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_TOKENIZER = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
MASK_RATE = 0.15  # share of tokens masked for masked-LM data (Devlin et al. 2019)
_SHOWN = 4  # missing weights named in an error


def load_model(path: str | os.PathLike, task: str | None = None) -> tuple[Any, Any, str]:
    """Load a local Hugging Face model folder and its tokenizer, offline, in eval mode.

    Args:
        path: A folder written by ``save_pretrained`` (``config.json``, ``model.safetensors``
            or ``pytorch_model.bin``) with the tokenizer saved beside it.
        task: One of :data:`TASKS`; default: from ``config.architectures`` (a classification
            head when the config names one).

    Returns:
        ``(model, tokenizer, task)``; the attention implementation is the model's default.

    Raises:
        ValueError: the folder or one of its files is missing, the task is unknown, or the
            folder holds no weights for some parameters of the task's model (a head that
            ``from_pretrained`` would fill with random numbers: the folder was saved for
            another task).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"path={str(folder)!r} is not a folder; pass the folder of save_pretrained."
        )
    _need_file(folder, ("config.json",), "the model config")
    _need_file(folder, _WEIGHTS, "the model weights")
    _need_file(folder, _TOKENIZER, "the tokenizer (save it with tokenizer.save_pretrained)")
    task = task or infer_task(folder)
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; choose one of {', '.join(TASKS)}.")
    import transformers

    auto = getattr(transformers, TASKS[task].auto_class)
    model, info = auto.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    _check_loaded(folder, task, type(model).__name__, info)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        # causal LMs such as GPT-2 ship without a padding token; padded positions carry
        # attention_mask 0 and label -100, so which token fills them does not matter
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.eval(), tokenizer, task


def infer_task(folder: str | os.PathLike) -> str:
    """The task of a model folder, from ``config.json``'s ``architectures``.

    Raises:
        ValueError: the config names no architecture of a known task, nor class labels.
    """
    config = _config(Path(folder))
    task = _saved_task(config)
    if task is not None:
        return task
    if "id2label" in config:
        return "sequence-classification"
    raise ValueError(
        f"path={str(folder)!r}: cannot tell the task (config.json names no known "
        f"architecture); pass task=, one of {', '.join(TASKS)}."
    )


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def _saved_task(config: dict[str, Any]) -> str | None:
    """The task of the first architecture in ``config`` with a known class-name ending."""
    for arch in config.get("architectures") or []:
        for name, task in TASKS.items():
            if arch.endswith(task.suffixes):
                return name
    return None


def _check_loaded(folder: Path, task: str, cls: str, info: dict[str, Any]) -> None:
    """Refuse a model some of whose weights the folder lacks (``from_pretrained`` draws them)."""
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
    missing = sorted(map(str, [*info.get("missing_keys", ()), *mismatched]))
    if not missing:
        return
    config = _config(folder)
    saved = _saved_task(config)
    archs = ", ".join(config.get("architectures") or []) or "no architecture"
    if saved is not None and saved != task:
        fix = f"the folder holds a {archs}, saved for task={saved!r}: pass task={saved!r}, or"
    else:
        fix = f"its config.json names {archs}: pass"
    raise ValueError(
        f"task={task!r}: path={str(folder)!r} holds no weights for {len(missing)} tensors of "
        f"{cls} ({_shorten(missing, _SHOWN)}), which from_pretrained would fill with "
        f"random numbers; {fix} a folder saved with the {task} head."
    )


def text_batches(
    path: str | os.PathLike,
    tokenizer: Any,
    task: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label2id: dict[str, int] | None = None,
    max_length: int = 128,
    batch_size: int = 16,
    limit: int | None = None,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Tokenized dict batches of a text file, padded per batch.

    ``.txt`` holds one example per line (language modelling); ``.csv`` and ``.jsonl`` hold
    records with ``text_column`` and, for classification, ``label_column`` (a class name from
    ``label2id`` or an integer; for token classification, space-separated tags, one per
    space-separated word of the text). Labels of causal LMs are the input ids with -100 on
    padding (the model shifts them); masked LMs mask 15% of the tokens with a fixed ``seed``.

    Args:
        path: The data file.
        tokenizer: The folder's tokenizer.
        task: One of :data:`TASKS`.
        text_column: Column (or key) of the text.
        label_column: Column (or key) of the label.
        label2id: Class names to indices (``model.config.label2id``).
        max_length: Longest sequence in tokens; longer texts are truncated.
        batch_size: Examples per batch.
        limit: Use the first ``limit`` examples only.
        seed: Seed of the masked-LM masks.

    Returns:
        A list of dicts of ``(batch, length)`` tensors.

    Raises:
        ValueError: the file is missing, empty, of an unknown type, or lacks a column.
    """
    texts, labels = _read(Path(path), text_column, label_column, _classifies(task))
    if limit is not None:
        texts = texts[:limit]
        labels = labels[:limit] if labels is not None else None
    out = []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(texts), batch_size):
        chunk = slice(start, start + batch_size)
        ys = labels[chunk] if labels is not None else None
        out.append(_batch(tokenizer, task, texts[chunk], ys, label2id, max_length, gen))
    return out


def _classifies(task: str) -> bool:
    return task in ("sequence-classification", "token-classification")


def _need_file(folder: Path, names: tuple[str, ...], what: str) -> None:
    if not any((folder / n).exists() for n in names):
        raise ValueError(f"path={str(folder)!r} lacks {what}: expected one of {', '.join(names)}.")


def _read(
    path: Path, text_column: str, label_column: str, labelled: bool
) -> tuple[list[str], list[Any] | None]:
    """Texts and (for classification) raw labels of a .txt, .csv or .jsonl file."""
    if not path.is_file():
        raise ValueError(f"path={str(path)!r} is not a file; pass the data file.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if labelled:
            raise ValueError(
                f"path={str(path)!r}: {path.name} is plain text, but classification needs "
                "labels; pass a .csv or .jsonl file with a label column."
            )
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        rows: list[dict] = []  # plain text has no columns (and no labels, checked above)
    elif suffix in (".csv", ".jsonl"):
        rows = _records(path, suffix)
        _need_column(path, rows, text_column, "text_column")
        if labelled:
            _need_column(path, rows, label_column, "label_column")
        texts = [str(r[text_column]) for r in rows]
    else:
        raise ValueError(f"path={str(path)!r}: {path.name} is not .txt, .csv or .jsonl.")
    if not texts:
        raise ValueError(f"path={str(path)!r}: {path.name} holds no examples.")
    return texts, [r[label_column] for r in rows] if labelled else None


def _records(path: Path, suffix: str) -> list[dict]:
    with path.open(newline="") as f:
        if suffix == ".csv":
            return list(csv.DictReader(f))
        rows = []
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"path={str(path)!r}: {path.name} line {i} is not JSON ({err})."
                    ) from None
        return rows


def _need_column(path: Path, rows: list[dict], column: str, parameter: str) -> None:
    have = list(rows[0]) if rows else []
    if not rows or column not in rows[0]:
        raise ValueError(
            f"path={str(path)!r}: {path.name} has no column {column!r} (columns: "
            f"{', '.join(have) or 'none'}); name the right one with {parameter}=."
        )


def _batch(
    tokenizer: Any,
    task: str,
    texts: list[str],
    labels: list[Any] | None,
    label2id: dict[str, int] | None,
    max_length: int,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One padded dict batch of ``texts`` with the ``labels`` of ``task``."""
    words = task == "token-classification"
    enc = tokenizer(
        [t.split() for t in texts] if words else texts,
        is_split_into_words=words,
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if task == "sequence-classification":
        # _read gives labels for the classifying tasks
        batch["labels"] = torch.tensor([_label(y, label2id) for y in cast(list, labels)])
    elif words:
        batch["labels"] = _word_labels(enc, cast(list, labels), label2id)
    elif task == "causal-lm":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch["input_ids"], batch["labels"] = _mask(tokenizer, batch, gen)
    return batch


def _label(y: Any, label2id: dict[str, int] | None) -> int:
    if label2id and str(y) in label2id:
        return int(label2id[str(y)])
    try:
        return int(y)
    except (TypeError, ValueError):
        names = ", ".join(label2id or {}) or "none (the config has no label names)"
        raise ValueError(
            f"label {y!r} is neither a class name of the model ({names}) nor an integer; "
            "check label_column= and label2id=."
        ) from None


def _word_labels(enc, tags: list[Any], label2id) -> torch.Tensor:
    """Word tags onto tokens: the first token of a word carries its tag, the rest -100."""
    out = torch.full(enc["input_ids"].shape, -100, dtype=torch.long)
    for i, row in enumerate(tags):
        row_tags = [_label(t, label2id) for t in str(row).split()]
        previous = None
        for j, word in enumerate(enc.word_ids(i)):
            if word is not None and word != previous and word < len(row_tags):
                out[i, j] = row_tags[word]
            previous = word
    return out


def _mask(tokenizer, batch, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM inputs and labels: ``MASK_RATE`` of the real, non-special tokens masked."""
    if tokenizer.mask_token_id is None:
        raise ValueError(
            "task='masked-lm': the tokenizer has no mask token, so no token can be masked; "
            "pass a folder whose tokenizer has one, or another task=."
        )
    ids = batch["input_ids"]
    special = torch.tensor(
        [
            tokenizer.get_special_tokens_mask(r, already_has_special_tokens=True)
            for r in ids.tolist()
        ]
    ).bool()
    can = (batch["attention_mask"] == 1) & ~special
    chosen = (torch.rand(ids.shape, generator=gen) < MASK_RATE) & can
    # at least one masked token per sequence, or the sequence adds nothing to the loss
    first = torch.argmax(can.int(), dim=1)
    none = ~chosen.any(1) & can.any(1)
    chosen[none, first[none]] = True
    labels = ids.masked_fill(~chosen, -100)
    return ids.masked_fill(chosen, tokenizer.mask_token_id), labels

"""The samples ``hesse influence`` explains and ranks: selected, labelled, shown as text.

Tensor ``(inputs, targets)`` batches are concatenated; Hugging Face dict batches (padded per
batch) are addressed by ``(batch, row)``, and their text is the tokenizer's decoding of what
the model saw (truncated to ``--max-length``, without padding or special tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..problem import hf
from ..problem._positions import rows_of, samples_in
from ._inputs import UsageError


class Samples:
    """The samples of a list of batches, one by one: selection, label, text or image.

    ``(inputs, targets)`` tensor batches are concatenated; Hugging Face dict batches (padded
    per batch) are kept and addressed by ``(batch, row)``, their text decoded by the tokenizer.
    """

    def __init__(self, batches: Any, tokenizer: Any = None, id2label: Any = None, shift: int = 0):
        """The samples of ``batches``.

        Args:
            batches: A list of batches, a ``DataLoader``, or one dict batch.
            tokenizer: Decodes the texts of dict batches (None: token ids are shown).
            id2label: Class names by index (a classifier's config).
            shift: 1 for a causal LM: its first label is predicted by nothing, so the counted
                tokens exclude it.
        """
        batches = [batches] if isinstance(batches, Mapping) else list(batches)  # or a loader
        self.dicts = all(isinstance(b, Mapping) for b in batches)
        self.tokenizer, self.id2label, self.shift = tokenizer, id2label or {}, shift
        if self.dicts:
            self.batches = batches
            self.where = [
                (b, r)
                for b, batch in enumerate(batches)
                for r in range(samples_in(batch, "hesse influence"))
            ]
            self.n = len(self.where)
            return
        pairs = [b for b in batches if isinstance(b, (tuple, list)) and len(b) == 2]
        if not pairs or len(pairs) != len(batches):
            raise UsageError(
                "hesse influence needs data as (inputs, targets) batches of tensors or Hugging "
                "Face dict batches (--hf)."
            )
        self.x = torch.cat([b[0] for b in pairs])
        self.y = torch.cat([b[1] for b in pairs])
        self.n = len(self.x)

    def select(self, index: torch.Tensor) -> list:
        """The batches of the samples ``index``: one (x, y) batch, or one dict batch each."""
        if not self.dicts:
            return [(self.x[index], self.y[index])]
        return [self.row(i) for i in index.tolist()]

    def row(self, i: int) -> Any:
        """Sample ``i`` as a batch of one (dict batches)."""
        b, r = self.where[i]
        return rows_of(self.batches[b], slice(r, r + 1))

    def label(self, i: int) -> Any:
        """The class of sample ``i``, or for token labels the number it counts."""
        y = self.row(i)["labels"] if self.dicts else self.y[i]
        if y.numel() == 1 and not y.is_floating_point():
            return self.id2label.get(int(y), int(y))
        if self.dicts:
            return f"{int((y[..., self.shift :] != -100).sum())} tokens"
        return y.tolist()

    def text(self, i: int) -> str:
        """The text of a Hugging Face sample as the model saw it (decoded, no padding)."""
        if not self.dicts:
            return ""
        row = self.row(i)
        ids = row["input_ids"][0]
        mask = row.get("attention_mask")
        ids = ids if mask is None else ids[mask[0].bool()]
        if self.tokenizer is None:
            return " ".join(map(str, ids.tolist()))
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()

    def tokens(self, i: int, positions: list[int]) -> list[str]:
        """The tokens at ``positions`` of dict sample ``i`` (ids without a tokenizer)."""
        ids = self.row(i)["input_ids"][0]
        chosen = [int(ids[t]) if t < len(ids) else -1 for t in positions]
        if self.tokenizer is None:
            return [str(c) for c in chosen]
        return [self.tokenizer.convert_ids_to_tokens(c) if c >= 0 else "" for c in chosen]

    def images(self) -> bool:
        """Whether the inputs are images (one picture per point)."""
        shape = () if self.dicts else tuple(self.x.shape[1:])
        return len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))


def hf_tokenizer(folder: str | None) -> Any:
    """The ``--hf`` folder's tokenizer (to show texts), or None."""
    if not folder:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None


def hf_task(args: Any) -> str | None:
    """The task of the ``--hf`` folder (``--hf-task`` or its config), or None."""
    if not args.hf:
        return None
    try:
        return args.hf_task or hf.infer_task(args.hf)
    except ValueError:
        return None


def hf_labels(args: Any, model: Any) -> dict[str, Any]:
    """``Samples``' ``id2label`` and ``shift`` for an ``--hf`` model (empty otherwise)."""
    if not args.hf:
        return {}
    task = hf_task(args)
    config = getattr(model, "config", None)
    names = getattr(config, "id2label", None) if task == "sequence-classification" else None
    return {"id2label": names, "shift": 1 if task == "causal-lm" else 0}

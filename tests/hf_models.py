"""Small seeded Hugging Face models, padded dict batches, and their losses written by hand.

The models are built from configs (nothing is downloaded) with their DEFAULT attention
implementation unless ``attn=`` names another: in ``transformers`` 5 that is
``scaled_dot_product_attention``, whose fused CPU kernel has no double backward and no forward
mode. Code that differentiates twice through such a model needs the math backend of SDPA
(:func:`math_attention`); the hand-written losses here are what tests compare ``hesse`` with.

Builds are cached and every caller gets its own copy, so a test may modify its model (train
mode, frozen parameters, new weights) without changing the next test's. Random numbers come
from private generators, so building a model or a batch leaves the global RNG untouched.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
)

IGNORE = -100
Batch = dict[str, torch.Tensor]


def math_attention():
    """Context that runs ``scaled_dot_product_attention`` on its twice-differentiable math path."""
    return sdpa_kernel(SDPBackend.MATH)


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _copied(build: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    """Cache ``build``'s models by arguments and hand every caller a deep copy of its own."""
    cached = functools.cache(build)

    @functools.wraps(build)
    def copy_of(*args, **kwargs) -> torch.nn.Module:
        return copy.deepcopy(cached(*args, **kwargs))

    return copy_of


@_copied
def bert_classifier(
    dtype: torch.dtype = torch.float64,
    attn: str | None = None,
    *,
    cls: type[PreTrainedModel] = BertForSequenceClassification,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 37,
    vocab: int = 60,
    max_positions: int = 32,
    num_labels: int = 3,
    init_range: float = 0.2,
    seed: int = 0,
    **config,
) -> PreTrainedModel:
    """A BERT-style encoder with a classification head (or ``cls``'s), in eval mode and ``dtype``.

    ``init_range`` is the standard deviation of the initial weights: larger than the Hugging
    Face default (0.02) so that losses and curvature differ visibly between samples and batches.
    The weights are drawn in float32 and then cast, so the same ``seed`` gives the same numbers
    in every dtype (a float64 model is the exact float64 twin of the float32 one). ``config``
    holds further ``BertConfig`` settings (``problem_type=``, ``return_dict=``).
    """
    if attn is not None:
        config["attn_implementation"] = attn
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
        initializer_range=init_range,
        **config,
    )
    model = _seeded(seed, lambda: cls(config))
    return model.to(dtype).eval()


@_copied
def gpt2_lm(
    dtype: torch.dtype = torch.float64,
    attn: str | None = None,
    *,
    layers: int = 2,
    embd: int = 32,
    heads: int = 2,
    vocab: int = 50,
    positions: int = 32,
    init_range: float = 0.2,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A GPT-2-style causal LM (tied input/output embeddings), in eval mode and ``dtype``.

    ``init_range`` as in :func:`bert_classifier`.
    """
    kwargs = {} if attn is None else {"attn_implementation": attn}
    config = GPT2Config(
        n_layer=layers,
        n_embd=embd,
        n_head=heads,
        vocab_size=vocab,
        n_positions=positions,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=init_range,
        **kwargs,
    )
    model = _seeded(seed, lambda: GPT2LMHeadModel(config))
    return model.to(dtype).eval()


def _padded_ids(gen, n: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``(n, length)`` right-padded with 0, and the attention mask.

    Row 0 is full, every other row has 2 to ``length - 1`` tokens (so every batch is padded).
    """
    lengths = torch.randint(2, length, (n,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (n, length), generator=gen) * mask
    return ids, mask


def classifier_batches(
    sizes: Sequence[int] = (4, 4, 2),
    lengths: Sequence[int] = (7, 9, 5),
    *,
    vocab: int = 60,
    num_labels: int = 3,
    seed: int = 0,
) -> list[Batch]:
    """Dict batches ``{input_ids, attention_mask, labels}`` for a sequence classifier.

    Batch ``b`` has ``sizes[b]`` rows right-padded with 0 to ``lengths[b]`` tokens
    (``attention_mask`` zeros on padding; row 0 of each batch is full, the others are not).
    ``labels`` are classes ``(n,)``.
    """
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for n, length in zip(sizes, lengths, strict=True):
        ids, mask = _padded_ids(gen, n, length, vocab)
        labels = torch.randint(0, num_labels, (n,), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def lm_batches(
    sizes: Sequence[int] = (4, 4, 2),
    lengths: Sequence[int] = (3, 11, 6),
    *,
    vocab: int = 50,
    seed: int = 1,
) -> list[Batch]:
    """Dict batches ``{input_ids, attention_mask, labels}`` for a causal LM.

    Rows are padded as in :func:`classifier_batches`; the short first batch makes the share of
    each batch in the token count change a lot with the shift (2-3 labels per row, 1-2 after
    it). ``labels`` are the input ids with -100 on padding, and on the first two tokens of row 0 of
    the first batch (a masked prompt), so that the shifted and unshifted token counts of the
    batches are not proportional.
    """
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for n, length in zip(sizes, lengths, strict=True):
        ids, mask = _padded_ids(gen, n, length, vocab)
        labels = ids.masked_fill(mask == 0, IGNORE)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    batches[0]["labels"][0, :2] = IGNORE
    return batches


def inputs(batch: Batch) -> Batch:
    """The model inputs of a batch (everything but ``labels``)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def logits(model: torch.nn.Module, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """The model's logits on ``batch`` with ``params`` substituted (others are the model's)."""
    return functional_call(model, params, (), inputs(batch)).logits


def lm_token_count(batch: Batch) -> int:
    """Tokens a causal LM's loss is over: shifted labels ``labels[:, 1:]`` that are not -100."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def classifier_loss(model, params: dict[str, torch.Tensor], batches: Sequence[Batch]):
    r"""Full-data mean cross-entropy :math:`\frac1N\sum_n \ell_n` over every sample."""
    total = sum(
        F.cross_entropy(logits(model, params, b), b["labels"], reduction="sum") for b in batches
    )
    return total / sum(len(b["labels"]) for b in batches)


def lm_loss(model, params: dict[str, torch.Tensor], batches: Sequence[Batch]):
    """Full-data mean next-token cross-entropy over every shifted, non-ignored token."""
    total = 0.0
    for b in batches:
        z = logits(model, params, b)[:, :-1]
        y = b["labels"][:, 1:]
        total = total + F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="sum")
    return total / sum(lm_token_count(b) for b in batches)


def flat_params(model: torch.nn.Module, names: Sequence[str]):
    """``(theta, split)``: the named parameters as one flat vector, and its inverse map.

    ``theta`` is detached and follows the order of ``names``; ``split(t)`` returns
    ``{name: tensor}`` views of a flat ``t``.
    """
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])

    def split(t: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(t, [s.numel() for s in shapes])
        return {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}

    return theta, split

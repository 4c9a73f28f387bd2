"""A small BERT-style classifier (BertForSequenceClassification from a config) on a made-up task.

The task: sequences of 16 tokens drawn from 40 word ids; the label says whether words from
set A (ids 5-16) outnumber words from set B (ids 17-28), flipped for 10% of the sequences
(so the loss cannot fall to 0 and the curvature does not vanish). Counting over the whole
sequence needs attention; 600 AdamW steps (about 25 s on one CPU thread) reach about the
90% accuracy the noise allows. Nothing is downloaded.
"""

from __future__ import annotations

import torch
import transformers

VOCAB, LENGTH, N_TRAIN, N_TEST = 45, 16, 2048, 512


def data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, LENGTH), generator=g)
    ids[:, 0] = 2  # [CLS]
    a = ((ids >= 5) & (ids <= 16)).sum(1)
    b = ((ids >= 17) & (ids <= 28)).sum(1)
    flip = torch.rand(n, generator=g) < 0.1
    labels = ((a > b) ^ flip).long()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def batches(d: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = len(d["labels"])
    return [{k: v[i : i + size] for k, v in d.items()} for i in range(0, n, size)]


def build(seed: int = 0) -> transformers.BertForSequenceClassification:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=LENGTH, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


def trained(steps: int = 600, seed: int = 0):
    """The trained model (eval mode) and its training and held-out batches."""
    model = build(seed)
    train, test = data(N_TRAIN, seed), data(N_TEST, seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(N_TRAIN, (64,), generator=g)
        loss = model(**{k: v[idx] for k, v in train.items()}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), batches(train, 256), batches(test, 256)

"""Models curvlinops cannot take: ignored labels, Embedding, LayerNorm, Conv1D, tied weights.

For each, curvlinops' answer (its error, or the matrix it computes silently) and hesse's
operators with their ``curvature_gap`` against the exact GGN (float64, small models).
"""

from __future__ import annotations

import time

import tools as T
import torch
import torch.nn.functional as F
import workloads as W
from torch import nn

import hesse

DT = torch.float64
IGNORE = -100


class TokenHead(nn.Module):
    """A per-token linear classifier: ``(B, T, f) -> (B, classes, T)``."""

    def __init__(self, f: int, classes: int):
        super().__init__()
        self.head = nn.Linear(f, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).transpose(1, 2)


class EmbedLN(nn.Module):
    """Token ids -> Embedding -> LayerNorm -> Linear -> tanh -> Linear, logits ``(B, V, T)``."""

    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.emb, self.ln = nn.Embedding(vocab, d), nn.LayerNorm(d)
        self.fc, self.out = nn.Linear(d, d), nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(self.ln(self.emb(ids))))).transpose(1, 2)


def ignored_labels() -> dict:
    """One sequence, one counted token (the others -100), one linear layer: KFAC is the GGN.

    hesse drops the tokens no loss term reaches, so its KFAC equals the exact GGN; curvlinops
    takes the -100 labels without an error and counts every token.
    """
    torch.manual_seed(4)
    model = TokenHead(4, 3).to(DT).eval()
    X = torch.randn(1, 5, 4, dtype=DT)
    y = torch.full((1, 5), IGNORE)
    y[0, 2] = 1
    obj = hesse.Objective(model, [(X, y)], F.cross_entropy)
    G = hesse.reference.dense_ggn(obj)
    w = W.Workload(
        "token_head", model, [(X, y)], F.cross_entropy, obj.space.names, model, [(X, y)], 1, 5
    )
    out = {
        "case": "-100 labels: one counted token of 5, one linear layer (KFAC = GGN)",
        "d": obj.dim,
    }
    for kind in ("exact", "empirical"):
        Kh = T.build("hesse", w, "KFAC", kind, obj.space.names).to_dense()
        Kc = T.build("curvlinops", w, "KFAC", kind, obj.space.names) @ torch.eye(obj.dim, dtype=DT)
        ref = G if kind == "exact" else hesse.reference.dense_fisher(obj)
        out[kind] = {"hesse_vs_exact": _rel(Kh, ref), "curvlinops_vs_exact": _rel(Kc, ref)}
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _ids(n: int, t: int, vocab: int, seed: int):
    """Right-padded ids (rows of 3..t tokens), the mask, and labels with a -100 prompt."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (n, t), generator=g) * mask
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :2] = IGNORE  # a masked prompt
    return ids, mask, labels


def embed_ln(quick: bool) -> dict:
    torch.manual_seed(5)
    vocab, n, t = 24, 8, 6
    model = EmbedLN(vocab, 12).to(DT).eval()
    ids, _, labels = _ids(n, t, vocab, 5)
    data = [(ids[:5], labels[:5]), (ids[5:], labels[5:])]
    obj = hesse.Objective(model, data, F.cross_entropy)
    row = {"case": "Embedding + LayerNorm + Linear, per-token loss, -100 labels", "d": obj.dim}
    row["curvlinops"] = _curvlinops_refusal(model, data, n, t)
    return row | _hesse_rows(obj, quick)


def gpt2_tied(quick: bool) -> dict:
    gpt = W.gpt2_model(DT, "agree", tied=True)
    ids, mask, labels = _ids(6, 8, gpt.config.vocab_size, 6)
    data = [
        {"input_ids": ids[s], "attention_mask": mask[s], "labels": labels[s]}
        for s in (slice(0, 4), slice(4, 6))
    ]
    obj = hesse.Objective(gpt, data)
    row = {
        "case": "GPT-2 from a config, tied wte/lm_head, Conv1D, LayerNorm, padding, -100 prompt",
        "d": obj.dim,
    }
    row["curvlinops"] = _curvlinops_refusal(W.ShiftedHead(gpt), [(ids, ids[:, 1:])], 6, 7)
    return row | _hesse_rows(obj, quick)


def _curvlinops_refusal(model, data, n: int, terms: int) -> str:
    try:
        T.KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(),
            list(model.parameters()),
            data,
            fisher_type="type-2",
            check_deterministic=False,
            num_data=n,
            num_per_example_loss_terms=terms,
        ).compute_kronecker_factors()
    except Exception as e:  # noqa: BLE001 - recorded
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return "(no error)"


def _hesse_rows(obj: hesse.Objective, quick: bool) -> dict:
    out = {}
    for op, kind in (("KFAC", "exact"), ("EKFAC", "exact"), ("KFAC", "mc")):
        t0 = time.perf_counter()
        K = T.HESSE[op](obj, kind=kind)
        build_s = time.perf_counter() - t0
        gap = hesse.curvature_gap(obj, K, k=5, budget=10 if quick else 30, seed=0)
        out[f"{op} {kind}"] = {
            "build_s": build_s,
            "dense_blocks": [n for n, b in K.factors.items() if hasattr(b, "matrix")],
            "whole_rel_frobenius": gap.whole.relative_frobenius,
            "whole_rel_frobenius_ci95": [
                x / gap.whole.exact_frobenius.value for x in gap.whole.frobenius.ci95
            ],
            "eigenvalue_errors": gap.eigenvalue_errors.tolist(),
            "max_principal_angle": float(gap.principal_angles.max()),
            "block_rel_frobenius": {n: b.relative_frobenius for n, b in gap.blocks.items()},
            "n_matvecs": gap.n_matvecs,
            "converged": gap.converged,
        }
        print("beyond", op, kind, out[f"{op} {kind}"]["whole_rel_frobenius"], flush=True)
    return out


def run(has_hf: bool, quick: bool) -> list[dict]:
    rows = [ignored_labels(), embed_ln(quick)]
    return rows + ([gpt2_tied(quick)] if has_hf else [])

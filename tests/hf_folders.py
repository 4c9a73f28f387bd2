"""Small Hugging Face folders written by ``save_pretrained``, with a word-level tokenizer."""

from __future__ import annotations

import tokenizers
import torch
import transformers

WORDS = "the a cat dog sat ran on mat fast slow good bad movie plot was is very not".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer():
    """A PreTrainedTokenizerFast over WORDS with BERT's special tokens."""
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def save_bert(folder, head="BertForSequenceClassification", **extra):
    """A one-layer BERT with the ``head`` class and its tokenizer, saved into ``folder``."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        **extra,
    )
    getattr(transformers, head)(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def save_gpt2(folder):
    """A one-layer GPT-2 LM and a tokenizer without a padding token, saved into ``folder``."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(SPECIAL) + len(WORDS), n_positions=32, n_embd=16, n_layer=1, n_head=2
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok = make_tokenizer()
    tok.pad_token = None  # like GPT-2's own tokenizer
    tok.save_pretrained(folder)
    return folder

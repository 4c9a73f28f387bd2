"""Transformer blocks from parameter names: the attention and the MLP of each layer.

The per-layer tables of Q-BERT (Shen et al. 2020, "Q-BERT: Hessian based ultra low precision
quantization of BERT") and of most Hessian studies of transformers have one row per attention
and per MLP sub-layer; one row per leaf module (ten for a BERT layer) hides that structure.

A layer is a module indexed under ``layer``, ``layers``, ``h``, ``block``, ``blocks``,
``resblocks`` or ``albert_layers`` (``bert.encoder.layer.3``, ``transformer.h.3``,
``model.layers.3``), or torchvision's ``layers.encoder_layer_3``. Within it, the sub-module
names of the common Hugging Face layouts (BERT, RoBERTa, DeBERTa, ELECTRA, DistilBERT, ALBERT,
ESM, GPT-2, GPT-J, GPT-NeoX, Falcon, BLOOM, MPT, OPT, LLaMA/Mistral/Qwen/Gemma/Phi/Mixtral,
T5, BART/Marian/Whisper, ViT, Swin, CLIP, Wav2Vec2, XLNet), of nanoGPT and of
``nn.TransformerEncoderLayer`` say which part is attention (cross-attention included) and
which is MLP. A layer norm counts with the sub-layer it feeds (pre-norm) or closes
(post-norm); one that feeds attention and MLP in parallel (GPT-J, Falcon, Phi) counts with the
attention.
"""

from __future__ import annotations

import re

# one layer index: ".layer.3", ".h.3", ".layers.3", ... followed by the rest of the name
_LAYER = re.compile(
    r"(?:^|\.)(?:(?:layer|layers|h|block|blocks|resblocks|albert_layers)\.\d+"
    r"|layers\.encoder_layer_\d+)(?=\.)"
)
# the first component(s) of a name within a layer that make it attention or MLP
_ATTENTION = re.compile(
    r"(?:attention|attn|self_attn|self_attention|crossattention|encoder_attn|cross_attn|rel_attn"
    r"|layer\.\d+\.(?:SelfAttention|EncDecAttention)"
    r"|ln_1|ln1|norm1|norm_1|layer_norm1|layernorm_before|input_layernorm|attention_norm|ln_attn"
    r"|sa_layer_norm|self_attn_layer_norm|encoder_attn_layer_norm|cross_attn_layer_norm"
    r"|ln_cross_attn|layer_norm)\."
)
_MLP = re.compile(
    r"(?:mlp|ffn|ffn_output|feed_forward|ff|intermediate|output|fc1|fc2|linear1|linear2"
    r"|block_sparse_moe|layer\.\d+\.DenseReluDense"
    r"|ln_2|ln2|norm2|norm_2|layer_norm2|layernorm_after|post_attention_layernorm|ffn_norm|ln_mlp"
    r"|pre_feedforward_layernorm|post_feedforward_layernorm|final_layer_norm|output_layer_norm"
    r"|full_layer_layer_norm|LayerNorm)\."
)
# Gemma 2/3 and OLMo 2 normalise the attention output with post_attention_layernorm and feed
# the MLP through pre_feedforward_layernorm; LLaMA feeds the MLP through post_attention_layernorm
_PRE_FEEDFORWARD = "pre_feedforward_layernorm."
_POST_ATTENTION = "post_attention_layernorm."


def transformer_blocks(names: list[str]) -> dict[str, list[str]]:
    """Group parameter names into ``"<layer>.attention"``, ``"<layer>.mlp"`` and the rest.

    Parameters of a layer that are neither attention nor MLP (Swin's patch merging, a Mamba
    mixer) form the block ``"<layer>"``, unless they sit in a sub-module whose other
    parameters are one of the two (T5's ``layer.1.layer_norm`` next to ``layer.1.EncDecAttention``).
    A parameter outside every layer belongs to its shortest module prefix that holds no layer
    (``"bert.embeddings"``, ``"model.norm"``, ``"lm_head"``), or is a block of its own when held
    by a module that also holds layers; without any layer, blocks are the top-level modules.

    Args:
        names: Parameter names in layout order.

    Returns:
        Block name to parameter names, blocks in order of first appearance.

    Example:
        >>> transformer_blocks(["wte.weight", "h.0.ln_1.weight", "h.0.attn.c_attn.weight",
        ...                     "h.0.ln_2.weight", "h.0.mlp.c_fc.weight", "lm_head.weight"])
        {'wte': ['wte.weight'], 'h.0.attention': ['h.0.ln_1.weight', 'h.0.attn.c_attn.weight'], \
'h.0.mlp': ['h.0.ln_2.weight', 'h.0.mlp.c_fc.weight'], 'lm_head': ['lm_head.weight']}
    """
    layers = {n: _layers(n) for n in names}
    kinds = {n: _kind(spans[0][1]) for n, spans in layers.items() if spans}
    _gemma_norms(layers, kinds)
    siblings = _sub_module_kinds(layers, kinds)
    containers = {p for spans in layers.values() if spans for p in module_prefixes(spans[0][0])}
    out: dict[str, list[str]] = {}
    for name in names:
        spans = layers[name]
        if spans:
            block = _layer_block(spans, kinds[name], siblings)
        else:
            block = _outside_block(name, containers)
        out.setdefault(block, []).append(name)
    return out


def _layers(name: str) -> list[tuple[str, str]]:
    """``(layer, rest)`` for each layer index in ``name``, the outermost first."""
    return [(name[: m.end()], name[m.end() + 1 :]) for m in _LAYER.finditer(name)]


def _kind(rest: str) -> str | None:
    if _ATTENTION.match(rest):
        return "attention"
    return "mlp" if _MLP.match(rest) else None


def _gemma_norms(layers: dict[str, list[tuple[str, str]]], kinds: dict[str, str | None]) -> None:
    """Count post_attention_layernorm with the attention in layers that have a pre-MLP norm."""
    gemma = {s[0][0] for s in layers.values() if s and s[0][1].startswith(_PRE_FEEDFORWARD)}
    for name, spans in layers.items():
        if spans and spans[0][0] in gemma and spans[0][1].startswith(_POST_ATTENTION):
            kinds[name] = "attention"


def _sub_module_kinds(
    layers: dict[str, list[tuple[str, str]]], kinds: dict[str, str | None]
) -> dict[str, str | None]:
    """The kind of every module within a layer whose parameters say it (None: both kinds)."""
    out: dict[str, str | None] = {}
    for name, kind in kinds.items():
        if kind is None:
            continue
        layer, rest = layers[name][0]
        for module in module_prefixes(rest):
            key = f"{layer}.{module}"
            out[key] = kind if out.get(key, kind) == kind else None
    return out


def _layer_block(
    spans: list[tuple[str, str]], kind: str | None, siblings: dict[str, str | None]
) -> str:
    layer, rest = spans[0]
    if kind is not None:
        return f"{layer}.{kind}"
    parent = rest.rpartition(".")[0].rpartition(".")[0]
    if siblings.get(f"{layer}.{parent}") is not None:
        return f"{layer}.{siblings[f'{layer}.{parent}']}"
    for inner, inner_rest in spans[1:]:  # a layer within a layer (Swin's blocks of a stage)
        inner_kind = _kind(inner_rest)
        if inner_kind is not None:
            return f"{inner}.{inner_kind}"
    return spans[-1][0]


def _outside_block(name: str, containers: set[str]) -> str:
    for module in module_prefixes(name):
        if module not in containers:
            return module
    return name


def module_prefixes(name: str) -> list[str]:
    """The module prefixes of a dotted name, shortest first (``"a.b.c"``: ``"a"``, ``"a.b"``)."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]

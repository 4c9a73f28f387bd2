"""Blocks of the parameter space: transformer sub-layers (attention, MLP) and user groups."""

import re

import pytest
import torch

import hesse
from hesse.problem.params import ParamSpace

transformers = pytest.importorskip("transformers")

from hf_models import bert_classifier, gpt2_lm, lm_batches  # noqa: E402 (needs transformers)

DT = torch.float64


def _names(model):
    return [n for n, _ in model.named_parameters()]


def _space(names):
    return ParamSpace(names, [(1,)] * len(names))


def _assert_partition(blocks, names):
    """Every name in exactly one block, each block in layout order."""
    flat = [n for members in blocks.values() for n in members]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    order = {n: i for i, n in enumerate(names)}
    for members in blocks.values():
        assert members == sorted(members, key=order.get)


# ------------------------------------------------------------------ by="block" on real layouts


def test_bert_blocks_are_attention_and_mlp_of_each_layer():
    names = _names(bert_classifier())
    blocks = _space(names).blocks(by="block")
    layers = [f"bert.encoder.layer.{i}" for i in range(2)]
    assert list(blocks) == [
        "bert.embeddings",
        *(f"{layer}.{kind}" for layer in layers for kind in ("attention", "mlp")),
        "bert.pooler",
        "classifier",
    ]
    for layer in layers:
        # the attention block holds the self-attention and its output projection and norm
        attention = [n for n in names if n.startswith(f"{layer}.attention.")]
        mlp = [n for n in names if n.startswith((f"{layer}.intermediate.", f"{layer}.output."))]
        assert blocks[f"{layer}.attention"] == attention and len(attention) == 10
        assert blocks[f"{layer}.mlp"] == mlp and len(mlp) == 6
    _assert_partition(blocks, names)


def test_gpt2_blocks_count_each_pre_norm_with_its_sub_layer():
    names = _names(gpt2_lm())
    blocks = _space(names).blocks(by="block")
    assert list(blocks) == [
        "transformer.wte",
        "transformer.wpe",
        "transformer.h.0.attention",
        "transformer.h.0.mlp",
        "transformer.h.1.attention",
        "transformer.h.1.mlp",
        "transformer.ln_f",
    ]
    for i in range(2):
        h = f"transformer.h.{i}"
        assert blocks[f"{h}.attention"] == [
            n for n in names if n.startswith((f"{h}.ln_1.", f"{h}.attn."))
        ]
        assert blocks[f"{h}.mlp"] == [n for n in names if n.startswith((f"{h}.ln_2.", f"{h}.mlp."))]
    _assert_partition(blocks, names)


TINY = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
# case: (config, model class, config arguments, {name pattern: the block of its matches}),
# where {layer} stands for the layer that the name is in
LAYOUTS = {
    "bart-cross-attention": (
        "BartConfig",
        "BartForConditionalGeneration",
        dict(
            d_model=8,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=8,
            decoder_ffn_dim=8,
            vocab_size=20,
            max_position_embeddings=8,
        ),
        {
            r"decoder\.layers\.0\.encoder_attn": "model.decoder.layers.0.attention",
            r"decoder\.layers\.0\.encoder_attn_layer_norm": "model.decoder.layers.0.attention",
            r"decoder\.layers\.0\.fc1": "model.decoder.layers.0.mlp",
            r"^model\.decoder\.embed_positions": "model.decoder.embed_positions",
        },
    ),
    "t5-norm-of-each-sub-layer": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2, vocab_size=20),
        {
            r"decoder\.block\.0\.layer\.1\.layer_norm": "decoder.block.0.attention",
            r"decoder\.block\.0\.layer\.1\.EncDecAttention": "decoder.block.0.attention",
            r"encoder\.block\.0\.layer\.1\.layer_norm": "encoder.block.0.mlp",
            r"decoder\.block\.0\.layer\.2\.": "decoder.block.0.mlp",
        },
    ),
    "vit-norm-before-attention": (
        "ViTConfig",
        "ViTForImageClassification",
        dict(TINY, image_size=8, patch_size=4),
        {r"layernorm_before": "{layer}.attention", r"layernorm_after": "{layer}.mlp"},
    ),
    "clip-numbered-norms": (
        "CLIPTextConfig",
        "CLIPTextModel",
        dict(TINY, vocab_size=20, max_position_embeddings=8),
        {r"layer_norm1": "{layer}.attention", r"layer_norm2": "{layer}.mlp"},
    ),
    "xlnet-relative-attention": (
        "XLNetConfig",
        "XLNetLMHeadModel",
        dict(d_model=8, n_layer=1, n_head=2, d_inner=8, vocab_size=20),
        {r"\.rel_attn\.": "{layer}.attention", r"\.ff\.": "{layer}.mlp"},
    ),
    "swin-blocks-of-a-stage": (
        "SwinConfig",
        "SwinForImageClassification",
        dict(image_size=8, patch_size=2, embed_dim=8, depths=[2], num_heads=[2], window_size=2),
        {
            r"layers\.0\.blocks\.1\.attention": "swin.encoder.layers.0.blocks.1.attention",
            r"layers\.0\.blocks\.1\.layernorm_before": "swin.encoder.layers.0.blocks.1.attention",
            r"layers\.0\.blocks\.0\.mlp": "swin.encoder.layers.0.blocks.0.mlp",
        },
    ),
    "gemma2-norm-after-attention": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(TINY, num_key_value_heads=2, head_dim=4, vocab_size=20),
        {
            r"post_attention_layernorm": "{layer}.attention",
            r"pre_feedforward_layernorm": "{layer}.mlp",
        },
    ),
    "mpt-numbered-norms": (
        "MptConfig",
        "MptForCausalLM",
        dict(d_model=8, n_heads=2, n_layers=1, vocab_size=20),
        {r"norm_1": "{layer}.attention", r"norm_2": "{layer}.mlp"},
    ),
}


@pytest.mark.parametrize("case", LAYOUTS)
def test_layouts_place_cross_attention_norms_and_nested_layers(case):
    config, cls, kwargs, rules = LAYOUTS[case]
    torch.manual_seed(0)
    names = _names(getattr(transformers, cls)(getattr(transformers, config)(**kwargs)))
    blocks = _space(names).blocks(by="block")
    block_of = {n: b for b, members in blocks.items() for n in members}
    for pattern, want in rules.items():
        hits = [n for n in names if re.search(pattern, n)]
        assert hits, f"{case}: no parameter matches {pattern!r}"
        for n in hits:
            layer = re.match(r"(.*\.(?:layer|layers|h|block|blocks)\.\d+)\.", n)
            assert block_of[n] == want.format(layer=layer and layer[1]), (n, block_of[n])
    _assert_partition(blocks, names)


def test_unknown_layer_parts_and_parameters_outside_layers():
    names = [
        "cls_token",  # held by the model itself, which holds the layers too
        "backbone.embeddings.weight",
        "backbone.layers.0.norm.weight",  # a Mamba layer: neither attention nor MLP
        "backbone.layers.0.mixer.in_proj.weight",
        "backbone.layers.1.mixer.in_proj.weight",
        "backbone.norm_f.weight",
        "head.0.weight",
    ]
    assert _space(names).blocks(by="block") == {
        "cls_token": ["cls_token"],
        "backbone.embeddings": ["backbone.embeddings.weight"],
        "backbone.layers.0": names[2:4],
        "backbone.layers.1": names[4:5],
        "backbone.norm_f": ["backbone.norm_f.weight"],
        "head": ["head.0.weight"],
    }
    # without any layer, blocks are the top-level modules
    cnn = ["features.0.weight", "features.3.weight", "classifier.1.weight"]
    assert _space(cnn).blocks(by="block") == {"features": cnn[:2], "classifier": cnn[2:]}


def test_unknown_by_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"'param', 'module' or 'block'"):
        _space(["a.w"]).blocks(by="layer")


# ------------------------------------------------------------------ user groups


def test_groups_take_names_prefixes_and_patterns_and_the_rest_is_one_block():
    names = _names(bert_classifier())
    space = _space(names)
    blocks = space.blocks(
        groups={
            "heads": ["classifier", "bert.pooler.dense.weight"],
            "queries": "bert.encoder.layer.*.attention.self.query",
            "layer 1": ["bert.encoder.layer.1.intermediate", "bert.encoder.layer.1.output.*"],
        }
    )
    assert list(blocks) == ["heads", "queries", "layer 1", "(rest)"]
    assert blocks["heads"] == ["bert.pooler.dense.weight", "classifier.weight", "classifier.bias"]
    assert blocks["queries"] == [
        f"bert.encoder.layer.{i}.attention.self.query.{p}"
        for i in (0, 1)
        for p in ("weight", "bias")
    ]
    assert len(blocks["layer 1"]) == 6
    _assert_partition(blocks, names)
    # every parameter in a group: no rest
    everything = space.blocks(
        groups={"encoder": "bert.encoder", "other": ["bert.embeddings", "bert.p*", "c*"]}
    )
    assert list(everything) == ["encoder", "other"]
    _assert_partition(everything, names)


def test_groups_that_overlap_are_refused_naming_the_parameter_and_both_groups():
    space = _space(_names(bert_classifier()))
    first = re.escape("'bert.encoder.layer.0.attention.output.dense.weight'")
    with pytest.raises(ValueError, match=rf"{first} is in group 'layer 0' and in group 'dense'"):
        space.blocks(groups={"layer 0": "bert.encoder.layer.0", "dense": "*.output.dense"})


@pytest.mark.parametrize(
    "groups, message",
    [
        ({"head": "classifer"}, r"group 'head'.*'classifer'.*close matches: 'classifier'"),
        ({"(rest)": "classifier"}, r"'\(rest\)' names the parameters in no group"),
        ({"head": []}, r"group 'head' has no entries"),
        ({}, r"no group given"),
    ],
    ids=["no-match", "reserved-name", "empty-group", "no-groups"],
)
def test_bad_groups_are_refused(groups, message):
    with pytest.raises(ValueError, match=message):
        _space(_names(bert_classifier())).blocks(groups=groups)


def test_a_group_may_name_a_tied_weight_by_its_alias():
    model = gpt2_lm()
    obj = hesse.Objective(model, lm_batches())
    blocks = obj.space.blocks(groups={"embedding": "lm_head"})  # tied to transformer.wte
    assert blocks["embedding"] == ["transformer.wte.weight"]


# ------------------------------------------------------------------ blocks of an operator


def test_ggn_blocks_by_transformer_block_equal_the_dense_sub_blocks():
    model = gpt2_lm(embd=8, vocab=20)
    params = [
        "transformer.h.1.ln_1",
        "transformer.h.1.attn.c_proj",
        "transformer.h.1.ln_2",
        "transformer.h.1.mlp.c_proj.bias",
        "transformer.ln_f",
    ]
    obj = hesse.Objective(model, lm_batches(vocab=20), params=params)
    dense = hesse.reference.dense_ggn(obj)
    blocks = hesse.GGNOperator(obj).blocks(by="block")
    assert {k: len(b.space.names) for k, b in blocks.items()} == {
        "transformer.h.1.attention": 4,
        "transformer.h.1.mlp": 3,
        "transformer.ln_f": 2,
    }
    slices = obj.space.slices()
    W = torch.randn(obj.dim, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    for key, block in blocks.items():
        idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in block.space.names])
        want = dense[idx][:, idx] @ W[idx]
        assert torch.allclose(block @ W[idx], want, rtol=1e-10, atol=1e-12 * dense.norm()), key

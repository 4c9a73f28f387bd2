"""Parameter selection: names, module prefixes, glob patterns, Parameter and Module objects."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from hesse.problem.params import ParamSpace

DT = torch.float64


class Encoder(nn.Module):
    """A BERT-shaped name tree: embeddings, 12 layers of attention + MLP, and a head."""

    def __init__(self, layers=12, width=3):
        super().__init__()
        self.embeddings = nn.Linear(width, width)
        self.layer = nn.ModuleList(
            nn.ModuleDict(
                {
                    "attention": nn.Linear(width, width),
                    "intermediate": nn.Linear(width, width),
                    "output": nn.LayerNorm(width),
                }
            )
            for _ in range(layers)
        )
        self.classifier = nn.Linear(width, 2)

    def forward(self, x):
        x = self.embeddings(x)
        for block in self.layer:
            x = block["output"](x + block["intermediate"](torch.tanh(block["attention"](x))))
        return self.classifier(x)


def _objective(model=None, **kwargs):
    torch.manual_seed(0)
    model = model or Encoder().to(DT).eval()
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    return model, hesse.Objective(model, (x, y), loss=F.cross_entropy, **kwargs)


def _names(obj):
    return obj.space.names


def test_space_select_rules():
    space = ParamSpace(
        ["enc.0.attn.w", "enc.0.mlp.w", "enc.1.attn.w", "enc.10.attn.w", "head.w", "head.b"],
        [(1,)] * 6,
    )
    assert space.select("head") == ["head.w", "head.b"]  # a module prefix
    assert space.select("enc.1") == ["enc.1.attn.w"]  # not enc.10
    assert space.select(["head.b", "enc.0.mlp.w"]) == ["enc.0.mlp.w", "head.b"]  # layout order
    assert space.select("enc.*.attn") == ["enc.0.attn.w", "enc.1.attn.w", "enc.10.attn.w"]
    assert space.select("enc.1?.*") == ["enc.10.attn.w"]
    assert space.select("*.w") == ["enc.0.attn.w", "enc.0.mlp.w", "enc.1.attn.w"] + [
        "enc.10.attn.w",
        "head.w",
    ]


def test_objective_params_take_prefixes_patterns_parameters_and_modules():
    model, full = _objective()
    layer5 = [n for n in _names(full) if n.startswith("layer.5.")]
    assert len(layer5) == 6
    for selection in [
        "layer.5",
        ["layer.5"],
        "layer.5.*",
        [model.layer[5]],
        list(model.layer[5].parameters()),
        [model.layer[5]["attention"], "layer.5.intermediate", "layer.5.output.*"],
    ]:
        _, obj = _objective(model, params=selection)
        assert _names(obj) == layer5, selection
    _, obj = _objective(model, params=[model.classifier.bias, "embeddings.weight"])
    assert _names(obj) == ["embeddings.weight", "classifier.bias"]
    sub = obj.restrict(model.classifier)
    assert _names(sub) == ["classifier.bias"]
    assert torch.equal(sub.gradient(), obj.gradient()[-2:])
    assert _names(full.restrict("layer.1?.attention.*")) == [
        "layer.10.attention.weight",
        "layer.10.attention.bias",
        "layer.11.attention.weight",
        "layer.11.attention.bias",
    ]


def test_unknown_names_get_close_matches_not_a_list_of_everything():
    _, full = _objective()
    assert len(full.space.names) == 76
    for build in (
        lambda: _objective(params=["layer.5", "clasifier"]),
        lambda: full.restrict("clasifier"),
    ):
        with pytest.raises(ValueError) as err:
            build()
        msg = str(err.value)
        assert "'classifier'" in msg and "embeddings" in msg and "layer (72 tensors)" in msg
        assert len(msg) < 500, msg
        assert "layer.7.output.bias" not in msg
    with pytest.raises(ValueError, match="close matches: 'layer.5.output'"):
        _objective(params="layer.5.ouput")  # a typo deep down: the closest prefixes are named


def test_frozen_and_foreign_selections_are_refused():
    torch.manual_seed(0)
    model = Encoder().to(DT).eval()
    model.classifier.requires_grad_(False)
    data = (torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="(?i)frozen.*classifier.weight"):
        hesse.Objective(model, data, loss=F.cross_entropy, params="classifier")
    with pytest.raises(ValueError, match="(?i)no parameter that may be analysed.*frozen"):
        hesse.Objective(model, data, loss=F.cross_entropy, params=[model.classifier])
    with pytest.raises(ValueError, match="not a parameter of this model"):
        hesse.Objective(model, data, loss=F.cross_entropy, params=[nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="not a submodule"):
        hesse.Objective(model, data, loss=F.cross_entropy, params=[nn.Linear(2, 2)])
    obj = hesse.Objective(model, data, loss=F.cross_entropy, params="layer.0")
    with pytest.raises(ValueError, match="(?i)not analysed.*layer.1.attention.weight"):
        obj.restrict("layer.1.attention")


def test_selection_errors_name_their_caller_once():
    # a foreign tensor in params= was reported as "Objective: params= Objective: a tensor ...",
    # and from restrict as "Objective: ..."
    torch.manual_seed(0)
    model = Encoder().to(DT).eval()
    data = (torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 1, 0]))
    foreign = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError) as err:
        hesse.Objective(model, data, loss=F.cross_entropy, params=[foreign])
    assert str(err.value).startswith("Objective(params=): a tensor of shape (2,)"), err.value
    assert str(err.value).count("Objective") == 1
    obj = hesse.Objective(model, data, loss=F.cross_entropy, params="layer.0")
    for selection in ([foreign], [nn.Linear(2, 2)], [model.layer[1]], [3]):
        with pytest.raises(ValueError) as err:
            obj.restrict(selection)
        assert str(err.value).startswith("Objective.restrict(names=): "), err.value


def test_module_blocks_of_top_level_parameters_are_the_root():
    space = ParamSpace(["scale", "enc.w", "enc.b"], [(1,), (2,), (2,)])
    assert space.blocks(by="module") == {"(root)": ["scale"], "enc": ["enc.w", "enc.b"]}


class Tied(nn.Module):
    """An output layer sharing the input embedding's weight (as language models do)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.mix = nn.Linear(3, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_tied_weights_are_selected_by_either_name():
    torch.manual_seed(0)
    model = Tied().to(DT).eval()
    data = (torch.tensor([0, 3, 4, 1]), torch.tensor([1, 2, 0, 4]))
    full = hesse.Objective(model, data, loss=F.cross_entropy)
    assert _names(full) == ["embed.weight", "mix.weight", "mix.bias"]
    for selection in ("head", "head.weight", [model.head]):
        obj = hesse.Objective(model, data, loss=F.cross_entropy, params=selection)
        assert _names(obj) == ["embed.weight"]
        assert _names(full.restrict(selection)) == ["embed.weight"]
    op = hesse.HessianOperator(full)
    assert op.restrict("head").shape == (15, 15)


def test_complex_parameters_are_refused_by_name():
    class Phase(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, dtype=torch.complex128))
            self.out = nn.Linear(1, 1).double()

        def forward(self, x):
            return self.out((x.to(self.w.dtype) @ self.w).abs()[:, None])

    model = Phase().eval()
    data = (torch.randn(4, 3, dtype=DT), torch.randn(4, 1, dtype=DT))
    with pytest.raises(ValueError, match="(?i)'w' is complex"):
        hesse.Objective(model, data, loss=F.mse_loss)
    assert _names(hesse.Objective(model, data, loss=F.mse_loss, params="out")) == [
        "out.weight",
        "out.bias",
    ]
    with pytest.raises(ValueError, match="(?i)real floating"):
        hesse.Objective(model, data, loss=F.mse_loss, params="out", dtype=torch.complex128)

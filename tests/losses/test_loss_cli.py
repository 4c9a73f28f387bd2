"""--loss takes the hesse.losses names with their parameters."""

import json

import pytest

from hesse.cli import main
from hesse.cli._inputs import UsageError, load_loss
from hesse.demo.digits import Config, loss_function
from hesse.losses import AnyLoss, CompSum, ZLoss

FACTORIES = """
import torch
from torch import nn

def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()

def make_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))]
"""


def test_load_loss_parses_names_and_parameters():
    assert load_loss("gce:q=0.7") == CompSum(1.7)
    assert load_loss("zloss:a=2,b=0.5") == ZLoss(2.0, 0.5)
    assert load_loss("anyloss:metric=g_mean,L=30") == AnyLoss("g_mean", L=30.0)
    with pytest.raises(UsageError, match="'p=1' is not a setting of gce"):
        load_loss("gce:p=1")
    with pytest.raises(UsageError, match="is not a float"):
        load_loss("zloss:a=big")


def test_digits_demo_takes_multiclass_losses_only():
    assert loss_function(Config(loss="mae")) == CompSum(2.0)
    assert Config(loss="mae").target() == 0.1
    with pytest.raises(ValueError, match="not a loss of"):
        loss_function(Config(loss="anyloss"))


@pytest.mark.parametrize("loss", ["gce:q=0.7", "zloss:a=2,b=1"])
def test_eigs_with_a_new_loss(loss, tmp_path, monkeypatch, capsys):
    (tmp_path / "loss_cli_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["eigs", "--model", "loss_cli_factories:make_model", "--data",
            "loss_cli_factories:make_data", "--loss", loss, "--curvature", "ggn", "--k", "2",
            "--budget", "20", "--json"]  # fmt: skip
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 0, err
    doc = json.loads(out)
    assert doc["problem"]["loss_name"] == loss
    assert len(doc["eigs"]["largest"]["values"]) == 2

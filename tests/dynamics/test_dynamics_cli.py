"""The dynamics commands' run(): ``hesse train-demo`` and ``hesse landscape`` pages."""

import argparse
import json

import pytest
import torch
from dynamics_problems import data, mlp
from torch import nn

from hesse.cli import landscape as _cli_landscape
from hesse.cli import train_demo as _cli_train
from hesse.report.page import Page


def _args(module, **given):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser.add_argument_group("app"))
    args = parser.parse_args([])
    shared = {"samples": None, "batch_size": None, "params": None, "dtype": None,
              "device": None, "seed": 0, "budget": None}  # fmt: skip
    for key, value in (shared | given).items():
        setattr(args, key, value)
    return args


@pytest.mark.slow
def test_train_demo_reaches_the_edge_of_stability(tmp_path):
    args = _args(_cli_train, lr=0.4, steps=400, every=40, monitor=True, samples=128)
    page = _cli_train.run(args, None)
    assert isinstance(page, Page) and "sharpness.png" in page.figures
    doc = page.doc
    sharp = [h["lambda_max"] for h in doc["history"]]
    assert [h["step"] for h in doc["history"]][:3] == [0, 40, 80] and not doc["diverged"]
    assert doc["threshold"] == pytest.approx(5.0)
    # progressive sharpening from below 2/η, then hovering near it (the benchmark measures it)
    assert sharp[0] < 0.8 * 5.0 and max(sharp) > 5.0
    assert 0.95 < doc["edge"]["mean_ratio"] < 1.25
    written = page.save(tmp_path)
    assert json.loads(written["results.json"].read_text())["results"]["edge"]["checks"] > 0


def test_train_demo_without_monitor_checks_at_the_start_and_end():
    args = _args(_cli_train, lr=0.1, steps=30, samples=64, momentum=0.5)
    doc = _cli_train.run(args, None).doc
    assert [h["step"] for h in doc["history"]] == [0, 30]
    assert doc["threshold"] == pytest.approx(30.0)


class _Problem:
    name = "tiny"
    loss = staticmethod(nn.functional.mse_loss)
    loss_fn = None

    def __init__(self, test=True):
        self.model = mlp()
        self.data = [data(24, seed=0)]
        self.test_data = [data(12, seed=1)] if test else None


def test_landscape_page_has_training_and_held_out_curves_and_criteria():
    args = _args(_cli_landscape, directions="hessian", span=0.5, steps=7, criteria=True)
    page = _cli_landscape.run(args, _Problem())
    doc = page.doc
    assert len(doc["values"]) == 7 and len(doc["test_values"]) == 7
    assert doc["test_values"][3] != pytest.approx(doc["values"][3])  # another data set
    assert doc["eigenvalues"][0] == pytest.approx(doc["criteria"]["lambda_max"], rel=1e-6)
    assert [s.title for s in page.sections] == ["Landscape", "Spectral criteria (LLA)"]
    assert "landscape.png" in page.figures and "loss at the weights" in page.text()
    held = dict(page.sections[0].rows)["held-out loss at the weights"]
    assert held == pytest.approx(doc["test_values"][3])


def test_landscape_2d_without_held_out_data_and_bad_steps():
    args = _args(_cli_landscape, dims=2, steps=5)
    doc = _cli_landscape.run(args, _Problem(test=False)).doc
    assert torch.tensor(doc["values"]).shape == (5, 5) and doc["test_values"] is None
    from hesse.cli._inputs import UsageError

    with pytest.raises(UsageError, match="odd"):
        _cli_landscape.run(_args(_cli_landscape, steps=4), _Problem())


def test_hesse_landscape_command_writes_its_page(tmp_path, capsys):
    from hesse import cli

    out = tmp_path / "ls"
    argv = ["landscape", "--model", "dynamics_problems:cli_model", "--data",
            "dynamics_problems:cli_data", "--loss", "mse", "--steps", "5", "--dims", "2",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    assert torch.tensor(doc["results"]["values"]).shape == (5, 5)
    assert (out / "landscape.png").exists() and (out / "report.html").exists()


def test_train_demo_refuses_a_step_that_is_not_positive():
    # lr 0 trained for the whole run, then divided by zero in the page
    from hesse.cli._inputs import UsageError

    with pytest.raises(UsageError, match="--lr must be positive"):
        _cli_train.run(_args(_cli_train, lr=0.0, steps=5, samples=16), None)

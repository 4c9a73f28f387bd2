import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from hesse.cli import main
from hesse.demo import load_demo
from hesse.report import validate

SMALL = ["--k", "3", "--budget", "12", "--steps", "6", "--probes", "2"]

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Custom:
        pass


    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


    def make_data():
        g = torch.Generator().manual_seed(0)
        return torch.randn(50, 4, generator=g), torch.randint(0, 2, (50,), generator=g)


    def make_list():
        return [1, 2, 3]


    def my_loss(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets)


    NOT_CALLABLE = 3
    """
)


@pytest.fixture(scope="module", autouse=True)
def env(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "hesse-cache"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HESSE_CACHE_DIR", str(cache))
        load_demo("digits")
        yield
    torch.set_num_threads(threads)  # the demos run single-threaded; give the suite its threads


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    folder = tmp_path_factory.mktemp("factories")
    (folder / "hesse_cli_factories.py").write_text(FACTORIES)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("hesse_cli_factories", None)


def run(argv, capsys):
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("command", ["analyze", "eigs", "trace", "density"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "examples:" in out and f"hesse {command} --demo digits" in out
    for option in ("--model", "--weights", "--curvature", "--checkpoint", "--json", "--quiet"):
        assert option in out


def test_analyze_digits_writes_json_plots_and_html(tmp_path, capsys):
    out_dir = tmp_path / "report"
    argv = ["analyze", "--demo", "digits", *SMALL, "--samples", "200", "--out", str(out_dir)]
    status, out, err = run(argv, capsys)
    assert status == 0, err
    assert "stability at η = 0.1" in out and "conv2" in out and "report.html" in out
    doc = json.loads((out_dir / "results.json").read_text())
    assert validate(doc) == [] and doc["problem"]["n_samples"] == 200
    assert doc["meta"]["command"].startswith("hesse analyze --demo digits")
    assert {p.name for p in out_dir.iterdir()} == {
        "results.json", "report.html", "spectrum.png", "density.png", "layers.png"
    }  # fmt: skip


def test_tiny_lm_separates_attention_and_mlp_blocks(tmp_path, capsys):
    argv = ["analyze", "--demo", "tiny-lm", *SMALL, "--samples", "24", "--quiet", "--json"]
    status, out, err = run([*argv, "--out", str(tmp_path)], capsys)
    assert status == 0, err
    doc = json.loads(out)
    kinds = {row["name"]: row["kind"] for row in doc["layers"]["rows"]}
    assert kinds["blocks.0.attn"] == "Attention" and kinds["blocks.0.mlp"] == "MLP"
    assert doc["problem"]["loss_name"] == "custom loss_fn" and not doc["ggn"]["available"]
    assert doc["stability"]["lr"] == 0.5


@pytest.mark.parametrize("command", ["eigs", "trace", "density"])
def test_single_sections_print_json_only(command, capsys):
    status, out, err = run([command, "--demo", "digits", *SMALL, "--samples", "100", "--json"],
                           capsys)  # fmt: skip
    assert status == 0, err
    doc = json.loads(out)
    assert validate(doc) == [] and doc["config"]["sections"] == [command]


def test_factories_weights_and_a_custom_loss(factories, tmp_path, capsys):
    weights = tmp_path / "w.pt"
    from hesse_cli_factories import make_model

    torch.save(make_model().state_dict(), weights)
    argv = [
        "trace",
        "--model",
        "hesse_cli_factories:make_model",
        "--data",
        "hesse_cli_factories:make_data",
        "--weights",
        str(weights),
        "--loss",
        "hesse_cli_factories:my_loss",
        "--budget",
        "8",
        "--batch-size",
        "16",
        "--json",
    ]
    status, out, err = run(argv, capsys)  # fmt: skip
    assert status == 0, err
    assert json.loads(out)["problem"]["n_samples"] == 50


def factory_args(model="hesse_cli_factories:make_model", data="hesse_cli_factories:make_data"):
    return ["eigs", "--model", model, "--data", data, "--k", "2", "--budget", "8", "--quiet"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (factory_args(model="no_such_module:make"), "module 'no_such_module' not found"),
        (factory_args(model="hesse_cli_factories:nope"), "has no 'nope'; it defines: "),
        (factory_args(model="hesse_cli_factories"), "expected 'package.module:name'"),
        (factory_args(model="hesse_cli_factories:make_list"),
         "returned a list; expected a torch.nn.Module"),
        (factory_args(data="hesse_cli_factories:make_list"),
         "returned a list; expected a torch Dataset"),
        (factory_args(model="hesse_cli_factories:NOT_CALLABLE"), "expected a function"),
        ([*factory_args()[:-5], "--k", "100", "--budget", "200"],
         "--k 100 is larger than the number of parameters (23)"),
        (["eigs", "--demo", "digits", "--loss", "hesse_cli_factories:my_loss"],
         "a custom loss needs --model"),
        (["eigs", "--demo", "digits", "--k", "20", "--budget", "10"], "pass budget >= 40"),
    ],
)  # fmt: skip
def test_bad_requests_exit_2_with_one_paragraph(factories, argv, message, capsys):
    status, out, err = run(argv, capsys)
    assert status == 2 and message in err, err
    assert err.startswith("hesse eigs: error:") and err.count("\n") == 1


def test_weights_that_do_not_fit_list_missing_and_unexpected_keys(factories, tmp_path, capsys):
    from hesse_cli_factories import make_model

    state = make_model().state_dict()
    state["extra.weight"] = state.pop("2.weight")
    state["0.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "w.pt")
    status, _, err = run([*factory_args(), "--weights", str(tmp_path / "w.pt")], capsys)
    assert status == 2
    assert "missing keys: 2.weight" in err and "unexpected keys: extra.weight" in err
    assert "0.bias (7,) vs (3,)" in err


def test_a_pickle_that_weights_only_refuses(factories, tmp_path, capsys):
    from hesse_cli_factories import Custom, make_model

    torch.save({"state": make_model().state_dict(), "extra": Custom()}, tmp_path / "w.pt")
    status, _, err = run([*factory_args(), "--weights", str(tmp_path / "w.pt")], capsys)
    assert status == 2 and "torch.load(weights_only=True) refused it" in err
    assert "torch.save(model.state_dict(), FILE)" in err


def test_an_output_folder_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    status, _, err = run(["eigs", "--demo", "digits", "--out", str(tmp_path / "file" / "x")],
                         capsys)  # fmt: skip
    assert status == 2 and "--out" in err and "cannot write there" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_a_read_only_output_folder(tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        status, _, err = run(["eigs", "--demo", "digits", "--out", str(tmp_path)], capsys)
    finally:
        tmp_path.chmod(0o700)
    assert status == 2 and "cannot write there" in err


def test_argument_errors_exit_2(capsys):
    for argv in (["eigs"], ["eigs", "--demo", "digits", "--model", "m:f"], ["eigs", "--k", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "give either --demo NAME" in capsys.readouterr().err


def hesse(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "hesse.cli", *argv], env


@pytest.mark.parametrize(
    ("command", "settings"),
    [("eigs", ["--k", "8", "--budget", "60"]), ("density", ["--steps", "40", "--probes", "4"])],
)
def test_a_killed_run_resumes_to_the_identical_result(command, settings, tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    options = [command, "--demo", "digits", *settings, "--json", "--quiet"]
    cmd, env = hesse(*options, "--checkpoint", str(checkpoint))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / "run.ckpt.parts"
    deadline = time.monotonic() + 120
    while not (parts.is_dir() and len(list(parts.glob("*.pt"))) >= 8):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before_kill = len(list(parts.glob("*.pt")))

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    cmd, env = hesse(*options)
    fresh = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 == fresh.returncode, resumed.stderr + fresh.stderr
    first, second = json.loads(resumed.stdout), json.loads(fresh.stdout)
    assert first[command] == second[command]
    assert done_before_kill < len(list(parts.glob("*.pt")))


def test_no_progress_bars_without_a_terminal():
    cmd, env = hesse("trace", "--demo", "digits", "--budget", "8", "--samples", "64")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Tr(H) =" in result.stdout
    assert "product/s" not in result.stderr and "%|" not in result.stderr

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from cli_env import digits_cache  # noqa: F401 (an autouse fixture: the demo's cache)

from hesse import Objective, reference
from hesse.cli import main
from hesse.demo import load_demo
from hesse.report import validate

SMALL = ["--k", "3", "--budget", "12", "--steps", "6", "--probes", "2"]

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset


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


    def make_batches():
        x, y = make_data()
        return [(x[:20], y[:20]), (x[20:], y[20:])]


    def make_loader():
        return DataLoader(TensorDataset(*make_data()), batch_size=16, shuffle=True)


    def make_dataset():
        return TensorDataset(*make_data())


    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, features):
            return self.net(features)


    def make_dict_model():
        return DictNet()


    def make_dict_batch():
        x, y = make_data()
        return {"features": x, "labels": y}


    def make_dict_batches():
        x, y = make_data()
        return [{"features": x[:30], "labels": y[:30]}, {"features": x[30:], "labels": y[30:]}]


    def my_loss(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets)


    NOT_CALLABLE = 3
    """
)


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
    assert doc["layers"]["by"] == "block"  # one row per attention and per MLP sub-layer
    assert kinds["blocks.0.attention"] == "attention" and kinds["blocks.0.mlp"] == "mlp"
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
         "returned a list whose item 0 (int) is not a batch; expected a DataLoader, a Dataset, "
         "a list of batches, or one batch"),
        (factory_args(model="hesse_cli_factories:NOT_CALLABLE"), "expected a function"),
        ([*factory_args()[:-5], "--k", "100", "--budget", "200"],
         "--k 100 is larger than the number of parameters (23)"),
        ([*factory_args()[:-5], "--k", "100000"],
         "--k 100000 is larger than the number of parameters (23)"),
        ([*factory_args()[:-5], "--k", "10", "--params", "2.weight,2.bias"],
         "--k 10 is larger than the number of parameters (8 selected by --params"),
        ([*factory_args(), "--params", "2.weight,encoder.*"],
         "--params 'encoder.*' matches no analysed parameter; top-level modules: 0 (2 tensors)"),
        ([*factory_args(), "--params", "2.wieght"],
         "--params '2.wieght' matches no analysed parameter; close matches: '2.weight'"),
        ([*factory_args(), "--params", ","], "--params ',': no names"),
        ([*factory_args(), "--max-memory", "lots"], "--max-memory 'lots': expected a positive"),
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
    assert "give one of --demo NAME" in capsys.readouterr().err


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


def top_eigenvalues(capsys, data, *extra, model="hesse_cli_factories:make_model"):
    argv = ["eigs", "--model", model, "--data", data, "--k", "2", "--budget", "60",
            "--dtype", "float64", "--json", *extra]  # fmt: skip
    status, out, err = run(argv, capsys)
    assert status == 0, err
    doc = json.loads(out)
    return doc["eigs"]["largest"]["values"], doc["problem"]["n_samples"]


def dense_top(samples=50):
    from hesse_cli_factories import make_data, make_model

    x, y = make_data()
    objective = Objective(make_model().double(), (x[:samples].double(), y[:samples]),
                                loss=torch.nn.functional.cross_entropy)  # fmt: skip
    return torch.linalg.eigvalsh(reference.dense_hessian(objective)).flip(0)[:2].tolist()


@pytest.mark.parametrize(
    ("data", "model"),
    [
        ("make_data", "make_model"),  # one (inputs, targets) batch
        ("make_batches", "make_model"),  # a list of batches, as Objective takes
        ("make_loader", "make_model"),  # a shuffling DataLoader: read in order
        ("make_dataset", "make_model"),
        ("make_dict_batch", "make_dict_model"),  # one dict batch
        ("make_dict_batches", "make_dict_model"),
    ],
)
def test_data_takes_whatever_objective_takes(factories, data, model, capsys):
    values, n = top_eigenvalues(
        capsys, f"hesse_cli_factories:{data}", model=f"hesse_cli_factories:{model}"
    )
    assert n in (50, None) and values == pytest.approx(dense_top(), rel=1e-8)


def test_samples_and_batch_size_cut_a_list_of_batches(factories, capsys):
    values, n = top_eigenvalues(
        capsys, "hesse_cli_factories:make_batches", "--samples", "30", "--batch-size", "8"
    )
    assert n == 30 and values == pytest.approx(dense_top(30), rel=1e-8)


@pytest.mark.parametrize("params", ["2.weight,2.bias", "2.*", "2"])
def test_params_choose_what_analyze_reports(factories, params, tmp_path, capsys):
    argv = ["analyze", "--model", "hesse_cli_factories:make_model", "--data",
            "hesse_cli_factories:make_data", "--params", params, "--dtype", "float64",
            *SMALL, "--budget", "40", "--out", str(tmp_path)]  # fmt: skip
    status, out, err = run(argv, capsys)
    assert status == 0, err
    line = f"parameters analysed: 8 of 23 (selection: {params.replace(',', ', ')})"
    assert line in out and line in err  # in the summary, and before the work starts
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == [] and doc["config"]["params"] == params.split(",")
    assert (doc["problem"]["n_params"], doc["problem"]["n_params_total"]) == (8, 23)
    assert [row["name"] for row in doc["layers"]["rows"]] == ["2"]
    from hesse_cli_factories import make_data, make_model

    objective = Objective(make_model().double(), make_data(), params=params.split(","),
                          loss=torch.nn.functional.cross_entropy)  # fmt: skip
    exact = torch.linalg.eigvalsh(reference.dense_hessian(objective)).flip(0)[:3]
    assert doc["eigs"]["largest"]["values"] == pytest.approx(exact.tolist(), abs=1e-8)


@pytest.mark.parametrize("how", ["terminal", "--progress"])
def test_long_runs_show_products_done_with_an_eta(how, monkeypatch, capsys):
    argv = ["analyze", "--demo", "digits", *SMALL, "--samples", "100", "--json"]
    if how == "terminal":
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    else:
        argv.append("--progress")
    status, _, err = run(argv, capsys)
    assert status == 0, err
    for step, total in (("eigs", 24), ("trace", 12), ("density", 12), ("ggn", 24)):
        assert re.search(rf"{step}: +\d+%\|.*\| \d+/{total} \[\d\d:\d\d<\d\d:\d\d", err), err
    assert re.search(r"layers: +\d+%\|.*\| \d+/\d+ \[\d\d:\d\d<", err)  # a total, so an ETA
    assert "product/s" in err and err.index("parameters analysed") < err.index("eigs:")


def test_max_memory_that_nothing_fits_is_refused_with_the_plan(capsys):
    argv = ["eigs", "--demo", "digits", *SMALL, "--samples", "100", "--max-memory", "1K"]
    status, _, err = run(argv, capsys)
    assert status == 2 and err.count("\n") == 1
    assert "more than --max-memory 1.0 kB" in err and "plan: d=3,658 params, 100 samples" in err


def test_the_plan_comes_first_and_goes_into_the_report(tmp_path, capsys):
    argv = ["analyze", "--demo", "digits", *SMALL, "--samples", "100", "--max-memory", "8G",
            "--out", str(tmp_path)]  # fmt: skip
    status, out, err = run(argv, capsys)
    assert status == 0, err
    first = err.splitlines()[0]
    assert first.startswith("hesse analyze: parameters analysed: 3658 of 3658 (all trainable); "
                            "plan: d=3,658 params, 100 samples")  # fmt: skip
    doc = json.loads((tmp_path / "results.json").read_text())
    plan = doc["plan"]
    assert validate(doc) == [] and plan["max_memory"] == 8 * 10**9 and plan["fits"]
    assert plan["summary"] in first and " ".join(plan["summary"].split()) in " ".join(out.split())
    assert (plan["dim"], plan["samples"], plan["probes"]) == (3658, 100, 2)


def test_max_memory_chooses_smaller_probe_groups_with_the_same_density(tmp_path, capsys):
    from hesse.operators.plan import plan

    demo = load_demo("digits")
    objective = Objective(demo.model, demo.batches(samples=100), loss=demo.loss)
    full = plan(objective, k=1, steps=6, probes=4)
    cap = full.total_bytes - full.block_bytes - full.probes_bytes // 2 + 60_000
    fitted = plan(objective, k=1, steps=6, probes=4, max_memory=cap)
    assert fitted.group < 4 and fitted.total_bytes <= cap
    argv = ["density", "--demo", "digits", *SMALL, "--probes", "4", "--samples", "100", "--json"]
    status, out, err = run([*argv, "--max-memory", str(cap)], capsys)
    assert status == 0, err
    grouped = json.loads(out)
    chosen = (grouped["plan"]["group"], grouped["plan"]["block_size"])
    assert chosen == (fitted.group, fitted.block_size)
    status, out, err = run(argv, capsys)
    assert status == 0, err
    whole = json.loads(out)
    assert whole["plan"]["group"] == 4
    for key in ("nodes", "weights"):  # probe i is the same whatever the group
        got, want = (torch.tensor(doc["density"][key]) for doc in (grouped, whole))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_unconverged_top_says_why(capsys):
    argv = ["eigs", "--demo", "digits", "--k", "5", "--budget", "16", "--samples", "200"]
    status, out, err = run(argv, capsys)
    assert status == 0, err
    assert "NOT converged" in out
    assert "note: The 5 largest eigenvalues are NOT converged: budget of 16 products spent" in out
    status, out, err = run([*argv, "--json"], capsys)
    reason = json.loads(out)["eigs"]["largest"]["reason"]
    assert reason.startswith("budget of 16 products spent") and "pairs within tol" in reason

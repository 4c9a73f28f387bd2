"""The application commands' plumbing: registration, problem loading, pages written."""

import json
import sys
import types

import pytest

from hesse import cli
from hesse.report.page import Page, Section

SEEN = {}


def _fake_app():
    app = types.ModuleType("hesse_fake_app")
    app.SUMMARY = "A fake application (100% measured)."
    app.EXAMPLES = "examples:\n  hesse fake --demo digits\n"

    def add_arguments(group):
        group.add_argument("--level", type=int, default=3)

    def run(args, problem):
        SEEN.update(problem=problem, args=args)
        section = Section("numbers", "one table", ("level", "samples"), [[args.level, 1.5]])
        return Page("fake page", {"level": args.level}, [section], {"f.png": b"\x89PNG"})

    app.add_arguments, app.run = add_arguments, run
    return app


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "hesse_fake_app", _fake_app())
    monkeypatch.setattr(cli, "APPS", {"fake": "hesse_fake_app", "gone": "hesse_not_installed"})
    SEEN.clear()


def test_root_help_lists_commands_and_percent_signs_do_not_break_it(fake, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "fake" in out and "100% measured" in out and "95% CI" in out
    assert "gone" not in out  # a command whose module is not installed is left out


def test_app_help_has_its_own_and_the_source_options_only(fake, capsys):
    with pytest.raises(SystemExit):
        cli.main(["fake", "--help"])
    out = capsys.readouterr().out
    assert "--level" in out and "--demo" in out and "--test-data" in out and "--out" in out
    assert "--checkpoint" not in out and "--layers-by" not in out


def test_demo_app_gets_held_out_data_and_writes_the_page(fake, tmp_path, capsys):
    out_dir = tmp_path / "out"
    status = cli.main(["fake", "--demo", "digits", "--level", "5", "--out", str(out_dir)])
    out, err = capsys.readouterr()
    assert status == 0, err
    problem = SEEN["problem"]
    n_train = sum(len(x) for x, _ in problem.data)
    n_test = sum(len(x) for x, _ in problem.test_data)
    assert n_train + n_test == 1797 and n_test == round(0.2 * 1797)
    assert SEEN["args"].progress is False
    assert "numbers" in out and "level" in out
    doc = json.loads((out_dir / "results.json").read_text())
    assert doc["results"]["level"] == 5 and doc["results"]["command"].startswith("hesse fake")
    assert doc["sections"][0]["rows"] == [[5, 1.5]]
    assert (out_dir / "f.png").read_bytes() == b"\x89PNG"
    assert "<h2>numbers</h2>" in (out_dir / "report.html").read_text()


def test_app_json_output(fake, tmp_path, capsys):
    status = cli.main(["fake", "--demo", "digits", "--json", "--out", str(tmp_path)])
    out, _ = capsys.readouterr()
    assert status == 0 and json.loads(out)["title"] == "fake page"


def test_test_data_with_a_demo_is_refused(fake, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fake", "--demo", "digits", "--test-data", "x:y"])
    assert exit_info.value.code == 2
    assert "--test-data goes with --model or --hf" in capsys.readouterr().err


def test_a_self_contained_command_needs_no_source_and_refuses_one(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hesse_fake_app", _fake_app())
    monkeypatch.setattr(cli, "APPS", {"fake": "hesse_fake_app"})
    monkeypatch.setattr(cli, "SELF_CONTAINED", ("fake",))
    SEEN.clear()
    assert cli.main(["fake", "--quiet", "--out", ""]) == 0
    assert SEEN["problem"] is None
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fake", "--demo", "digits"])
    assert exit_info.value.code == 2 and "builds its own model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "--demo", "digits", "--method", "kfac", "--samples", "256"],
        ["influence", "--demo", "digits", "--ihvp", "ekfac", "--query", "0:2", "--top", "3",
         "--samples", "256"],
    ],
)  # fmt: skip
def test_kronecker_methods_run_from_the_command_line(argv, tmp_path):
    # --method kfac needed --curvature ggn and then had no score words; --ihvp ekfac needed it too
    assert cli.main([*argv, "--out", str(tmp_path), "--quiet"]) == 0


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        (["influence", "--demo", "digits", "--curvature", "kfac", "--query", "0:1"], "--ihvp kfac"),
        (["quantize", "--demo", "digits", "--curvature", "ekfac"], "--method kfac"),
    ],
)
def test_a_kronecker_curvature_where_it_is_no_option_is_a_usage_error(argv, fix, tmp_path, capsys):
    # it failed deep inside with a ValueError (exit 1) instead of naming the option to use
    assert cli.main([*argv, "--samples", "64", "--out", str(tmp_path), "--quiet"]) == 2
    assert fix in capsys.readouterr().err

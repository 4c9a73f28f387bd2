import copy
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hesse.analysis import analyze
from hesse.report import SCHEMA_VERSION, render_text, validate, write_all, write_json


@pytest.fixture(scope="module")
def doc():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(30, 3), torch.randint(0, 2, (30,))
    report = analyze(model, (x, y), F.cross_entropy, lr=0.2, k=3, budget=12, steps=8, probes=2)
    return report.to_dict()


@pytest.fixture(scope="module")
def written(doc, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    return folder, write_all(doc, folder)


def test_the_document_is_valid_json_with_its_schema_version(doc, written):
    folder, files = written
    loaded = json.loads((folder / "results.json").read_text())
    assert loaded == json.loads(json.dumps(doc))
    assert validate(loaded) == [] and loaded["schema_version"] == SCHEMA_VERSION
    assert {"hesse", "torch", "numpy", "python"} <= loaded["meta"].keys()
    assert loaded["config"]["seed"] == 0
    assert sorted(files) == ["density.png", "layers.png", "report.html", "results.json",
                             "spectrum.png"]  # fmt: skip
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["problem"].pop("loss"), "$.problem.loss: missing"),
        (lambda d: d["trace"].update(value="big"), "$.trace.value: expected a number, got str"),
        (lambda d: d["eigs"]["largest"].update(converged=1), "converged: expected bool"),
        (lambda d: d.update(extra=1), "$.extra: unexpected key"),
        (lambda d: d["layers"]["rows"][0].update(n_params=True), "n_params: expected int"),
        (lambda d: d.update(schema_version=99), "expected 1, got 99"),
    ],
)
def test_the_checker_names_what_is_wrong(doc, edit, message):
    broken = copy.deepcopy(doc)
    edit(broken)
    assert any(message in error for error in validate(broken)), validate(broken)
    with pytest.raises(ValueError, match="does not match its schema"):
        write_json(broken, "/nonexistent/never-written.json")


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.images, self.styles = [], [], []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "action", "data", "poster", "srcset"):
                self.urls.append(value or "")
            if name == "style":
                self.styles.append(value or "")
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.styles.append(data)


def test_the_html_is_self_contained(written):
    folder, _ = written
    page = (folder / "report.html").read_text()
    parser = Links()
    parser.feed(page)
    assert len(parser.images) == 3
    assert all(url.startswith("data:image/png;base64,") for url in parser.urls)
    assert not re.search(r"url\(\s*['\"]?(https?:|//)", " ".join(parser.styles))
    assert "<script" not in page and "@import" not in page


def test_the_terminal_summary_lists_the_sections(doc):
    text = render_text(doc)
    for word in ("λ_i (largest)", "trace:", "GGN:", "outliers:", "block", "stability at η"):
        assert word in text
    assert max(len(line) for line in text.splitlines()) <= 100


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_chromium_renders_the_report_without_console_errors(written, tmp_path):
    folder, _ = written
    result = subprocess.run(
        ["chromium", "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
         "--v=0", f"--user-data-dir={tmp_path}", "--dump-dom",
         (folder / "report.html").as_uri()],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and "Bulk and outliers" in result.stdout
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "error" in line.lower()], console

"""The HTML report (--report on match and rewrite, OUT/report.html of train and fold): what it shows agrees
with the data the commands print as JSON and write into artifacts; names from the model and the rule file
are escaped; nothing in it reaches out of the file.

One tiny ViT (two blocks) through match, rewrite, train (two epochs on 30 images) and fold, once per module.
"""

import json
import math
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from utune_fx.cli import main
from utune_fx.report_data import collect
from utune_fx.report_html import render
from utune_fx.trace import trace

SPEC = (
    "timm:vit_tiny_patch16_224?img_size=16&patch_size=4&depth=2&embed_dim=32&num_heads=2&num_classes=10&global_pool=avg"
)
DUAL, LORA = "rules/dual_utuner.yaml", "rules/lora.yaml"


class Page(HTMLParser):
    """Elements as (tag, attributes, text directly inside); the stack of open elements is kept for text."""

    VOID = {"meta", "br", "img", "input", "link", "rect", "circle", "line", "polyline"}

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[dict] = []
        self.stack: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for element in self.stack:
            element["text"] += data

    def find(self, tag=None, **attrs):
        return [
            e
            for e in self.elements
            if (tag is None or e["tag"] == tag)
            and all(e["attrs"].get(k.rstrip("_").replace("_", "-")) == v for k, v in attrs.items())
        ]


def _self_contained(text: str) -> None:
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"<(link|iframe|img|object|embed)\b", text)
    assert not any({"src", "href"} & set(e["attrs"]) for e in Page(text).elements)
    assert "@import" not in text and "url(" not in text
    assert len(re.findall(r"<script\b", text)) == 1  # the page's own few lines


def _colour(element: dict) -> str:
    return re.search(r"--c:([^;\"]+)", element["attrs"].get("style", "")).group(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    for c in range(10):
        (images / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 20 * c + 7 * i, np.uint8)).save(images / f"class{c}" / f"{i}.png")
    train = ["train", SPEC, "--rules", DUAL, "--rules", LORA, "--data", f"imagefolder:{images}", "--epochs", "2"]
    assert main([*train, "--val-size", "10", "--no-augment", "--batch-size", "10", "-o", str(root / "run")]) == 0
    assert main(["fold", str(root / "run"), "-o", str(root / "folded")]) == 0
    assert main(["rewrite", SPEC, "--rules", DUAL, "--rules", LORA, "-o", str(root / "tuned"), "--report",
                 str(root / "rewrite.html")]) == 0  # fmt: skip
    return root


def test_match_report_shows_each_rules_regions_in_its_colour(tmp_path, capsys):
    page_path = tmp_path / "pages" / "match.html"
    assert main(["match", SPEC, "--rules", DUAL, "--json", "--report", str(page_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    text = page_path.read_text()
    _self_contained(text)
    page = Page(text)
    legend = {e["attrs"]["data-rule"]: e for e in page.elements if "legend" in e["attrs"].get("class", "")}
    assert set(legend) == {entry["rule"] for entry in report["results"]} == {"mha", "ffn", "classifier"}
    assert len({_colour(e) for e in legend.values()}) == 3  # a colour per rule
    rows = page.find("table", id="regions")
    assert rows
    for entry in report["results"]:
        rule, colour = entry["rule"], _colour(legend[entry["rule"]])
        assert int(legend[rule]["attrs"]["data-regions"]) == len(entry["regions"])
        chips = [e for e in page.find("span", data_rule=rule) if e["attrs"].get("data-count")]
        assert int(chips[0]["attrs"]["data-count"]) == len(entry["regions"])  # the model's own summary line
        assert _colour(chips[0]) == colour
        # each region's output node is drawn in its rule's colour (block 0 in full; block 1 is 'the same')
        for region in entry["regions"]:
            ops = [e for e in page.find("span") if e["attrs"].get("title", "").startswith(region["output"] + ":")]
            if region["scope"].startswith("blocks.1"):
                assert not ops
                continue
            assert ops and _colour(ops[0]) == colour, region["output"]
    total = sum(len(e["regions"]) for e in report["results"])
    assert len(re.findall(r'<tr><td><span class="sw"', text.split('id="regions"')[1])) == total
    same = page.elements[[e["attrs"].get("class") for e in page.elements].index("run")]
    assert same["attrs"]["data-same"] == "1" and "identical to 0" in same["text"]


def _manifest(directory):
    return json.loads((directory / "manifest.json").read_text())


def _tuner_rows(page: Page) -> dict[str, list[str]]:
    table = page.elements.index(page.find("table", id="tuners")[0])
    rows, current = {}, None
    for element in page.elements[table + 1 :]:
        if element["tag"] == "table":
            break
        if element["tag"] == "tr":
            current = []
        elif element["tag"] == "td" and current is not None:
            current.append(element["text"].strip())
            if len(current) == 1:
                rows[current[0]] = current
    return rows


def test_rewrite_report_draws_every_tuner_where_it_reads_and_writes(runs):
    text = (runs / "rewrite.html").read_text()
    _self_contained(text)
    page = Page(text)
    manifest = _manifest(runs / "tuned")
    tuners = {".".join(name.split(".")[:3]) for name in manifest["tensors"] if name.startswith("utune.")}
    rows = _tuner_rows(page)
    assert set(rows) - {"total"} == tuners and len(tuners) == 2 * 2 + 2 * 2  # mha, ffn; lora on qkv, proj
    scopes = {s["rule"]: s["scopes"] for s in manifest["summary"]}
    for module, (_, rule, _, parameters, reads, writes) in ((m, r) for m, r in rows.items() if m != "total"):
        index = int(module.rsplit(".", 1)[1])
        region = scopes[rule][index]
        site = re.fullmatch(r"(\S+) \((\S+)\)", writes)
        assert site, writes  # one node it adds to, with its module
        assert site.group(2) == region or site.group(2).startswith(region + "."), (module, writes, region)
        assert re.fullmatch(r"\S+ \(\S+\)(, \S+ \(\S+\))*", reads), reads
        own = sum(math.prod(shape) for name, shape in manifest["tensors"].items() if name.startswith(module + "."))
        assert int(parameters.replace(",", "")) == own
    # the totals: every trainable tensor of the artifact, and the tuners' share of it
    trainable = sum(math.prod(shape) for shape in manifest["tensors"].values())
    totals = page.find("p", id="totals")[0]["attrs"]
    assert int(totals["data-trainable"]) == trainable
    added = sum(math.prod(s) for n, s in manifest["tensors"].items() if n.startswith("utune."))
    assert int(rows["total"][3].replace(",", "")) == added
    # a tuner drawn in the tree, under the module of its region, in its rule's colour
    lora = page.find("div", class_="tuner")
    assert any("utune.lora.0" in e["text"] and "reads" in e["text"] and "writes" in e["text"] for e in lora)


def test_train_report_has_the_curves_of_its_epochs(runs):
    text = (runs / "run" / "report.html").read_text()
    _self_contained(text)
    page = Page(text)
    history = [json.loads(line) for line in (runs / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for metric in ("loss", "accuracy"):
        svg = page.find("svg", data_metric=metric)
        assert len(svg) == 1
        lines = [e["attrs"]["points"].split() for e in page.find("polyline")]
    assert len(lines) == 4 and all(len(points) == 2 for points in lines)  # train and val, each panel, 2 epochs
    trainable = sum(math.prod(s) for s in _manifest(runs / "run" / "tuned")["tensors"].values())
    assert int(page.find("p", id="totals")[0]["attrs"]["data-trainable"]) == trainable


def test_fold_report_gives_each_tuner_its_fold_status(runs):
    text = (runs / "folded" / "report.html").read_text()
    _self_contained(text)
    page = Page(text)
    fold = json.loads((runs / "folded" / "fold.json").read_text())
    rows = _tuner_rows(page)
    statuses = {e["module"]: e["status"] for e in fold["entries"] if e["module"].startswith("utune.")}
    assert statuses and {m: rows[m][6].split()[0] for m in statuses} == statuses
    assert {"folded", "kept"} <= set(statuses.values())  # LoRA merges, parallel adapters stay branches
    assert page.find("p", id="fold-counts") and page.find("svg", data_metric="loss")  # the run's curves too
    assert "rules/dual_utuner.yaml" in text and "/tmp" not in page.find("p", class_="meta")[0]["text"].split(";")[0]


class Hostile(nn.Module):
    def __init__(self):
        super().__init__()
        self.add_module("<script>alert(1)</script>", nn.Linear(4, 4))
        self.add_module("a&b'<i>", nn.ReLU())

    def forward(self, x):
        return getattr(self, "a&b'<i>")(getattr(self, "<script>alert(1)</script>")(x))


def test_names_from_the_model_and_rules_are_escaped():
    model = Hostile()
    gm = trace(model, (torch.randn(2, 4),))
    rule = '<img src=x onerror=alert(3)>" onmouseover="alert(2)'
    report = {
        "rules": "<b>rules</b>.yaml",
        "results": [
            {
                "rule": rule,
                "tuner": "lora</td>",
                "position": "parallel",
                "where": "&amp;",
                "pattern": "p",
                "regions": [
                    {
                        "index": 0,
                        "scope": "<script>alert(1)</script>",
                        "in_shape": [2, 4],
                        "out_shape": [2, 4],
                        "added_parameters": 3,
                        "inputs": [],
                        "output": "x",
                    }
                ],
                "added_parameters": 3,
                "trained_parameters": 0,
            }
        ],
        "added_parameters": 3,
        "trained_parameters": 0,
    }
    text = render(collect(gm, model, name="<script>name</script>", kind="match", match_reports=[report]))
    _self_contained(text)  # one <script>, no src=
    assert "alert(1)" in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert (
        'onmouseover="' not in text
        and "&lt;img src=x" in text
        and "&amp;amp;" in text
        and "a&amp;b&#x27;&lt;i&gt;" in text
    )
    page = Page(text)
    assert page.find("details", data_path="<script>alert(1)</script>") or page.find(
        "div", data_path="<script>alert(1)</script>"
    )  # the escaped name reads back as the module's own


def test_a_report_that_cannot_be_written_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["match", SPEC, "--rules", DUAL, "--report", str(blocker / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {blocker / 'r.html'}: cannot write the report") and len(err) == 1


@pytest.mark.parametrize(
    "damage, expected",
    [
        (("metrics.jsonl", '{"epoch": 1, "train_loss": 2.0}\n["not", "a", "row"]\n'), "metrics.jsonl:2: not a row"),
        (("summary.json", '{"best_val_accuracy": "x"}'), "summary.json: "),
    ],
)
def test_fold_of_a_run_with_damaged_metrics_is_one_line_and_writes_nothing(runs, tmp_path, capsys, damage, expected):
    """A run directory is data someone may send: its curves and summary are checked before fold writes."""
    run = tmp_path / "run"
    shutil.copytree(runs / "run", run)
    (run / damage[0]).write_text(damage[1])
    capsys.readouterr()
    assert main(["fold", str(run), "-o", str(tmp_path / "folded")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run / damage[0]}") and expected in err[0], err
    assert not (tmp_path / "folded").exists()

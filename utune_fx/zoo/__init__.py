"""The zoo sweep: a catalogue of models through trace -> ... -> ONNX Runtime parity.

    python cli.py zoo --models ci -o runs/zoo-ci              timm's fixed CI sample (7 models)
    python cli.py zoo --models all -o runs/zoo --markdown docs/coverage.md
                                                              one model per timm family (191)
    python cli.py zoo --catalog transformers --models all -o runs/zoo-hf
                                                              transformers families from small configs
    python cli.py zoo --catalog torchvision --models all -o runs/zoo-tv
                                                              every torchvision classification model
    python cli.py zoo --rules res_tuning_bypass -o runs/zoo-bypass
                                                              other shipped rule files through the chain
                                                              (the ground-truth counts check only the default pair)

stages.py runs one model through the chain (in its own process), runner.py runs many (two at
a time, bounded, resumable), catalog.py picks the timm models, hf_catalog.py and
torchvision_catalog.py the others with their ground truth (truth.py checks it), catalogs.py
selects and builds by catalogue, report.py writes the tables.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from utune_fx.atomic import write_text
from utune_fx.zoo.stages import RULE_FILES

TITLES = {
    "timm": "timm architectures",
    "transformers": "Hugging Face transformers",
    "torchvision": "torchvision classification models",
}
BUILT = {
    "timm": "Every model: timm, pretrained=False, its smallest input size",
    "transformers": "Every model: an hf: spec, a small config with random weights (utune_fx/zoo/hf_catalog.py); "
    "counts checked against the config (zoo/truth.py)",
    "torchvision": "Every model: torchvision, weights=None, 64 x 64 where it allows "
    "(utune_fx/zoo/torchvision_catalog.py); counts checked against the builders' depths (zoo/truth.py)",
}


def _versions(catalog: str) -> str:
    import importlib

    return f"{catalog} {importlib.import_module(catalog).__version__}"  # each catalogue is its package's name


def run_zoo(
    which: str,
    out: Path,
    jobs: int,
    timeout: float,
    memory_gb: float,
    markdown: Path | None,
    catalog: str = "timm",
    rule_files: tuple[str, ...] = RULE_FILES,
) -> dict:
    import torch

    from utune_fx.zoo.catalogs import select_models
    from utune_fx.zoo.report import coverage_report, render_markdown
    from utune_fx.zoo.runner import sweep

    names = select_models(catalog, which)
    records = sweep(
        names,
        out / "results.jsonl",
        jobs=jobs,
        timeout=timeout,
        memory_gb=memory_gb,
        catalog=catalog,
        rule_files=rule_files,
    )
    report = coverage_report(records)
    write_text(out / "report.json", json.dumps(report, indent=1))
    files = " and ".join(f"rules/{name}.yaml" for name in rule_files)
    preamble = (
        f"`python cli.py zoo --catalog {catalog} --models {which}` on {date.today().isoformat()}: {len(names)} "
        f"models, torch {torch.__version__}, {_versions(catalog)}, {jobs} at a time, {timeout:.0f} s and "
        f"{memory_gb:g} GB each. {BUILT[catalog]}; rule files {files}, unchanged."
    )
    text = render_markdown(report, f"Coverage: the whole chain on {TITLES[catalog]}", preamble)
    write_text(markdown or out / "coverage.md", text)
    return report

"""The zoo sweep: every timm architecture family through trace -> ... -> ONNX Runtime parity.

    python cli.py zoo --models ci -o runs/zoo-ci              the fixed CI sample (30 models)
    python cli.py zoo --models all -o runs/zoo --markdown docs/coverage.md
                                                              one model per timm family (191)

stages.py runs one model through the chain (in its own process), runner.py runs many (two at
a time, bounded, resumable), catalog.py picks the models, report.py writes the tables.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from utune_fx.atomic import write_text
from utune_fx.errors import UtuneError


def select_models(which: str) -> list[str]:
    from utune_fx.zoo.catalog import CI_SAMPLE, families

    if which == "ci":
        return list(CI_SAMPLE)
    if which == "all":
        return families()
    import timm

    names = [name.strip() for name in which.split(",") if name.strip()]
    unknown = [name for name in names if name not in timm.list_models()]
    if unknown or not names:
        raise UtuneError(
            f"--models {which!r}: {unknown[0] if unknown else 'nothing'} is not a timm model; "
            "give 'ci', 'all' or timm names separated by commas"
        )
    return names


def run_zoo(which: str, out: Path, jobs: int, timeout: float, memory_gb: float, markdown: Path | None) -> dict:
    import timm
    import torch

    from utune_fx.zoo.report import coverage_report, render_markdown
    from utune_fx.zoo.runner import sweep

    names = select_models(which)
    records = sweep(names, out / "results.jsonl", jobs=jobs, timeout=timeout, memory_gb=memory_gb)
    report = coverage_report(records)
    write_text(out / "report.json", json.dumps(report, indent=1))
    preamble = (
        f"`python cli.py zoo --models {which}` on {date.today().isoformat()}: {len(names)} models, "
        f"torch {torch.__version__}, timm {timm.__version__}, {jobs} at a time, {timeout:.0f} s and "
        f"{memory_gb:g} GB each. Every model: timm, pretrained=False, its smallest input size; rule files "
        "rules/dual_utuner.yaml and rules/lora.yaml, unchanged."
    )
    text = render_markdown(report, "Coverage: the whole chain on timm architectures", preamble)
    write_text(markdown or out / "coverage.md", text)
    return report

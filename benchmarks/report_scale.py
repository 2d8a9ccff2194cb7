"""The HTML report (utune_fx/report_html.py) on big models: its size in bytes and the seconds it takes.

    python benchmarks/report_scale.py [-o DIR]     (default runs/report_scale)

- ViT with 96 blocks (timm vit_tiny_patch16_224, depth 96, 32x32 images, patches of 4): the match
  report of rules/dual_utuner.yaml (192 regions), then the rewrite report of dual_utuner + lora
  (192 adapters and 384 LoRA branches);
- the 7B Llama config (LlamaForCausalLM, hidden 4096, 32 layers, 6.7e9 parameters) built on the meta
  device, traced, matched and rewritten with rules/lora.yaml and rules/dual_utuner.yaml (nothing computed).

Prints one line per page (bytes, seconds to collect and render, regions, tuners) and writes the pages to
DIR (benchmarks/report_screenshot.sh takes screenshots of them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utune_fx  # noqa: E402, F401  (before timm and transformers)
from benchmarks.trace_depth import LLAMA_7B  # noqa: E402


def _page(out: Path, name: str, build) -> dict:
    from utune_fx.report_html import render

    start = time.perf_counter()
    data = build()
    collected = time.perf_counter()
    page = render(data)
    rendered = time.perf_counter()
    path = out / f"{name}.html"
    path.write_text(page)
    row = {
        "page": str(path),
        "bytes": len(page.encode()),
        "collect_s": round(collected - start, 2),
        "render_s": round(rendered - collected, 2),
        "regions": len(data["regions"]),
        "tuners": len(data["tuners"]),
        "modules": len(data["modules"]),
    }
    print(json.dumps(row), flush=True)
    return row


def vit_96(out: Path) -> list[dict]:
    from utune_fx.match import MatchContext, load_rules, match_rules
    from utune_fx.match.report import match_report
    from utune_fx.report_data import collect
    from utune_fx.rewrite import rewrite
    from utune_fx.specs import load_model
    from utune_fx.trace import trace

    spec = "timm:vit_tiny_patch16_224?depth=96&img_size=32&patch_size=4"
    start = time.perf_counter()
    loaded = load_model(spec, None)
    gm = trace(loaded.model, loaded.inputs, name=loaded.name)
    print(f"ViT-96: built and traced in {time.perf_counter() - start:.1f} s", flush=True)
    rules = load_rules("dual_utuner")
    ctx = MatchContext(gm)
    matched = match_rules(gm, rules, ctx)
    report = match_report(gm, loaded.model, rules, spec, None, ctx, matched)
    rows = [
        _page(
            out,
            "vit96_match",
            lambda: collect(gm, loaded.model, name=spec, kind="match", match_reports=[report], matches=[matched]),
        )
    ]
    result = rewrite(gm, [rules, load_rules("lora")])
    rows.append(
        _page(out, "vit96_rewrite", lambda: collect(gm, loaded.model, name=spec, kind="rewrite", result=result))
    )
    return rows


def llama_7b(out: Path) -> list[dict]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from utune_fx.match import load_rules
    from utune_fx.report_data import collect
    from utune_fx.rewrite import rewrite
    from utune_fx.trace import trace

    start = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B))
    gm = trace(model, (torch.zeros(2, 16, dtype=torch.long),))
    print(f"Llama 7B (meta): built and traced in {time.perf_counter() - start:.1f} s", flush=True)
    result = rewrite(gm, [load_rules("lora"), load_rules("dual_utuner")])
    name = "LlamaForCausalLM 7B config (meta device)"
    return [_page(out, "llama7b_rewrite", lambda: collect(gm, model, name=name, kind="rewrite", result=result))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", default="runs/report_scale", metavar="DIR")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    vit_96(out)
    llama_7b(out)


if __name__ == "__main__":
    main()

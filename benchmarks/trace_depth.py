"""Tracing and matching cost against model depth: do they grow linearly?

    python benchmarks/trace_depth.py [--depths 12 24 48 96] [--repeats 3]

For vit_base_patch16_224 and ViT-B/16 models of 12, 24, 48 and 96 blocks
(width 768, 224 px, batch 1, random weights) it times the three stages of
``utune_fx.trace`` and the matcher separately, median of --repeats runs:

- fx: symbolic tracing (utune_fx's tracer: leaf policy, shape branches)
- annotate: one shape-propagating forward pass plus op-kind/scope annotation
- match: every shipped pattern of the prelude matched (attention, mlp, ffn,
  blocks, residuals, head, linear, conv, norm; utune_fx.match.find_operations)

and prints a markdown table, with each stage's time per block relative to
the 12-block model (1.00 = perfectly linear). Python's garbage collector is
paused inside the timed regions, as timeit does. Results also go to
benchmarks/results/trace_depth.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import timm
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import utune_fx  # noqa: F401  (torchvision compatibility before timm)
from utune_fx.match import find_operations
from utune_fx.trace.annotate import annotate
from utune_fx.trace.fx_frontend import fx_trace


def measure(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict:
    times = {"fx": [], "annotate": [], "match": []}
    for repeat in range(repeats + 1):  # the first run only warms caches up
        gc.collect()
        gc.disable()  # as timeit does: a full collection walks every live object, so its cost grows with the heap
        start = time.perf_counter()
        gm = fx_trace(model, (x,)).gm
        traced = time.perf_counter()
        annotate(gm, (x,))
        annotated = time.perf_counter()
        ops = find_operations(gm)
        done = time.perf_counter()
        gc.enable()
        if repeat == 0:
            continue
        times["fx"].append(traced - start)
        times["annotate"].append(annotated - traced)
        times["match"].append(done - annotated)
    counts = {kind: len(ops[kind]) for kind in ("attention", "ffn", "block")}
    return {"nodes": len(gm.graph.nodes), **counts, **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 24, 48, 96])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    x = torch.randn(1, 3, 224, 224)
    cases = [("vit_base_patch16_224", 12, {})] + [(f"ViT-B/16, {d} blocks", d, {"depth": d}) for d in args.depths]
    rows = []
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns) as progress:
        task = progress.add_task("tracing", total=len(cases))
        for label, depth, kwargs in cases:
            progress.update(task, description=f"building {label}")
            model = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
            progress.update(task, description=f"tracing {label}")
            rows.append({"model": label, "blocks": depth, **measure(model, x, args.repeats)})
            del model
            progress.advance(task)

    base = next(r for r in rows if r["model"].startswith("ViT-B/16") and r["blocks"] == min(args.depths))
    print(
        "\n| model | blocks | nodes | attention / ffn found | fx s | annotate s | match ms | total s "
        "| per-block cost vs smallest (fx / annotate / match) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        ratios = " / ".join(
            f"{(row[k] / row['blocks']) / (base[k] / base['blocks']):.2f}" for k in ("fx", "annotate", "match")
        )
        total = row["fx"] + row["annotate"] + row["match"]
        print(
            f"| {row['model']} | {row['blocks']} | {row['nodes']} | {row['attention']} / {row['ffn']} "
            f"| {row['fx']:.3f} | {row['annotate']:.3f} | {1000 * row['match']:.1f} | {total:.3f} | {ratios} |"
        )
    out = Path(__file__).parent / "results" / "trace_depth.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()

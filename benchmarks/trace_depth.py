"""Tracing and matching cost against model depth: do they grow linearly? And what does tracing a
model that does not fit in memory cost?

    python benchmarks/trace_depth.py [--depths 12 24 48 96] [--repeats 3] [--llama-7b]

For vit_base_patch16_224 and ViT-B/16 models of 12, 24, 48 and 96 blocks
(width 768, 224 px, batch 1, random weights) it times the three stages of
``utune_fx.trace`` and the matcher separately, median of --repeats runs:

- fx: symbolic tracing (utune_fx's tracer: leaf policy, shape branches)
- annotate: shapes propagated on the meta device (nothing computed) plus
  op-kind/scope annotation, as ``trace`` does now
- annotate (forward): the same annotation with shapes from one real forward
  pass, as ``trace`` did before: the old cost, measured in the same run, so the
  new/old ratio holds on a noisy machine too
- match: every shipped pattern of the prelude matched (attention, mlp, ffn,
  blocks, residuals, head, linear, conv, norm; utune_fx.match.find_operations)

and prints a markdown table, with each stage's time per block relative to
the smallest ViT-B/16 (1.00 = perfectly linear). Python's garbage collector is
paused inside the timed regions, as timeit does. Results also go to
benchmarks/results/trace_depth.json.

``--llama-7b`` then builds the 7B Llama config (LlamaForCausalLM, 6.7e9 parameters) on the meta
device in a fresh process and traces, matches (rules/lora.yaml, rules/dual_utuner.yaml) and
rewrites it (both files at once, tuners on the meta device), printing each stage's seconds, the
regions found and the process's peak resident memory (VmHWM; ``--llama-7b-worker`` is that process: one
JSON line; tests/test_meta_trace.py runs it too).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import utune_fx  # noqa: F401  (torchvision compatibility before timm)

LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
STAGES = ("fx", "annotate", "annotate_forward", "match")


def measure(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict:
    from utune_fx.match import find_operations
    from utune_fx.trace.annotate import annotate
    from utune_fx.trace.fx_frontend import fx_trace

    times = {stage: [] for stage in STAGES}
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
        annotate(gm, (x,), shapes_by="forward")  # the old way, for the ratio
        forward = time.perf_counter()
        gc.enable()
        if repeat == 0:
            continue
        times["fx"].append(traced - start)
        times["annotate"].append(annotated - traced)
        times["match"].append(done - annotated)
        times["annotate_forward"].append(forward - done)
    counts = {kind: len(ops[kind]) for kind in ("attention", "ffn", "block")}
    return {"nodes": len(gm.graph.nodes), **counts, **{k: statistics.median(v) for k, v in times.items()}}


def depth_table(depths: list[int], repeats: int) -> None:
    import timm
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    torch.set_grad_enabled(False)
    x = torch.randn(1, 3, 224, 224)
    cases = [("vit_base_patch16_224", 12, {})] + [(f"ViT-B/16, {d} blocks", d, {"depth": d}) for d in depths]
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("tracing", total=len(cases))
        for label, depth, kwargs in cases:
            bar.update(task, description=f"building {label}")
            model = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
            bar.update(task, description=f"tracing {label}")
            rows.append({"model": label, "blocks": depth, **measure(model, x, repeats)})
            del model
            bar.advance(task)

    base = next(r for r in rows if r["model"].startswith("ViT-B/16") and r["blocks"] == min(depths))
    print(
        "\n| model | blocks | nodes | attention / ffn found | fx s | annotate s | match ms | total s "
        "| before: annotate by forward s | total s | new / before "
        "| per-block cost vs smallest (fx / annotate / match) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        ratios = " / ".join(
            f"{(row[k] / row['blocks']) / (base[k] / base['blocks']):.2f}" for k in ("fx", "annotate", "match")
        )
        total = row["fx"] + row["annotate"] + row["match"]
        before = row["fx"] + row["annotate_forward"] + row["match"]
        print(
            f"| {row['model']} | {row['blocks']} | {row['nodes']} | {row['attention']} / {row['ffn']} "
            f"| {row['fx']:.3f} | {row['annotate']:.3f} | {1000 * row['match']:.1f} | {total:.3f} "
            f"| {row['annotate_forward']:.3f} | {before:.3f} | {total / before:.2f} | {ratios} |"
        )
    out = Path(__file__).parent / "results" / "trace_depth.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(out)


def llama_7b_worker() -> dict:
    """Build, trace, match and rewrite the 7B Llama config on the meta device; seconds per stage,
    regions per rule, peak resident memory of this process (MiB), where the tuners landed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from utune_fx.match import load_rules, match_rules
    from utune_fx.rewrite import rewrite
    from utune_fx.trace import trace, trace_report

    seconds, cpu_seconds = {}, {}  # wall time, and this process's CPU time (robust to a busy machine)

    def timed(stage: str, work):
        start, cpu = time.perf_counter(), time.process_time()
        value = work()
        seconds[stage], cpu_seconds[stage] = time.perf_counter() - start, time.process_time() - cpu
        return value

    def build():
        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(**LLAMA_7B))

    model = timed("build", build)
    ids = torch.zeros(2, 16, dtype=torch.long)  # trace moves it to the model's meta device
    gm = timed("trace", lambda: trace(model, (ids,)))
    rule_sets = [load_rules("lora"), load_rules("dual_utuner")]
    regions = timed(
        "match",
        lambda: {found.rule.name: len(found.regions) for rules in rule_sets for found in match_rules(gm, rules)},
    )
    result = timed("rewrite", lambda: rewrite(gm, rule_sets))
    report = trace_report(gm)
    tuner_devices = sorted({p.device.type for n, p in result.module.named_parameters() if n.startswith("utune.")})
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "frontend": report.frontend,
        "shapes_by": report.shapes_by,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 2),
        "cpu_seconds": {k: round(v, 2) for k, v in cpu_seconds.items()},
        "total_cpu_seconds": round(sum(cpu_seconds.values()), 2),
        "regions": regions,
        "tuners": sum(s.regions for s in result.summaries),
        "tuner_devices": tuner_devices,
        "peak_rss_mib": peak_rss_mib(),
    }


def peak_rss_mib() -> int:
    """This process's peak resident memory. Linux's VmHWM belongs to the process's own memory map;
    getrusage's ru_maxrss also keeps the parent's peak when the parent forked this process before
    exec (a benchmark holding a 96-block ViT-B made the worker look 4 GB large), so it is the
    fallback where /proc is missing."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_llama_7b() -> dict:
    """The worker in a fresh process, so its peak memory is the trace's own."""
    done = subprocess.run([sys.executable, __file__, "--llama-7b-worker"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the Llama 7B worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 24, 48, 96])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama-7b", action="store_true", help="then trace the 7B Llama config on the meta device")
    parser.add_argument("--llama-7b-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_7b_worker:
        print(json.dumps(llama_7b_worker()))
        return
    depth_table(args.depths, args.repeats)
    if args.llama_7b:
        found = run_llama_7b()
        print(
            f"\nLlama 7B config on the meta device ({found['parameters']:,} parameters): "
            f"build {found['seconds']['build']} s, trace {found['seconds']['trace']} s ({found['frontend']}, "
            f"shapes by {found['shapes_by']}), match {found['seconds']['match']} s, "
            f"rewrite {found['seconds']['rewrite']} s; total {found['total_seconds']} s "
            f"({found['total_cpu_seconds']} s of CPU time), "
            f"peak RSS {found['peak_rss_mib']} MiB; regions {found['regions']}, "
            f"{found['tuners']} tuners on {', '.join(found['tuner_devices'])}"
        )


if __name__ == "__main__":
    main()

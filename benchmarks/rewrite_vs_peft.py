"""utune_fx against PEFT on vit_base_patch16_224: rewrite time, one training step.

    python benchmarks/rewrite_vs_peft.py [--batch 8] [--steps 3]

Each variant runs in its own subprocess (so peak memory is its own):

- utune_fx dual U-Tuner: trace + match + rewrite with rules/dual_utuner.yaml
- utune_fx LoRA: the same, with LoRA (r=8, alpha=16) on qkv, proj, fc1, fc2
- PEFT LoRA: get_peft_model with the same layers, rank and alpha

Per variant: set-up time (utune_fx: tracing included), the median time of
--steps AdamW training steps (forward, backward, step) on random images after
one warm-up step, and the peak resident memory of the process during the
training steps above what it held once the model was ready (optimizer state,
activations, gradients). Ratios are against PEFT LoRA in the
same run, because these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LORA_RULES = ROOT / "benchmarks" / "rules" / "lora_vit_linears.yaml"
VARIANTS = ("utune_fx dual U-Tuner", "utune_fx LoRA", "PEFT LoRA")


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _resident_kb() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() // 1024


def worker(variant: str, batch: int, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import timm
    import torch

    import utune_fx  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).train()
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    start = time.perf_counter()
    if variant == "PEFT LoRA":
        import peft

        tuned = peft.get_peft_model(
            model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))")
        )
    else:
        from utune_fx.match import load_rules
        from utune_fx.rewrite import rewrite
        from utune_fx.trace import trace

        if variant == "utune_fx LoRA":
            path = LORA_RULES
        else:
            path = ROOT / "rules" / "dual_utuner.yaml"
        tuned = rewrite(trace(model, x[:2]), load_rules(path)).module
        tuned.train()
    setup = time.perf_counter() - start
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> float:
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(tuned(x), y).backward()
        optimizer.step()
        return time.perf_counter() - began

    before = _resident_kb()  # model and tuners in place; optimizer state and activations to come
    step()  # warm-up
    times = [step() for _ in range(steps)]
    return {
        "variant": variant,
        "setup_s": setup,
        "step_s": statistics.median(times),
        "peak_mb": max(_peak_kb() - before, 0) / 1024,
        "trainable": sum(p.numel() for p in trainable),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.steps)))
        return
    from rich.progress import Progress

    rows = []
    with Progress() as progress:
        task = progress.add_task("variants", total=len(VARIANTS))
        for variant in VARIANTS:
            progress.update(task, description=variant)
            done = subprocess.run(
                [sys.executable, __file__, "--worker", variant, "--batch", str(args.batch), "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            progress.advance(task)
    peft_row = next(r for r in rows if r["variant"] == "PEFT LoRA")
    print(f"\nvit_base_patch16_224, batch {args.batch}, AdamW, CPU; ratios against PEFT LoRA (lower is better)\n")
    print("| variant | trainable | set-up s | step s | step / PEFT | training peak MB | peak / PEFT |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['trainable']:,} | {row['setup_s']:.2f} | {row['step_s']:.2f} "
            f"| {row['step_s'] / peft_row['step_s']:.2f} | {row['peak_mb']:.0f} "
            f"| {row['peak_mb'] / max(peft_row['peak_mb'], 1):.2f} |"
        )


if __name__ == "__main__":
    main()

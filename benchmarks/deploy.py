"""What deployment costs: base vs tuned vs folded vs ONNX Runtime inference, as ratios in one run.

    python benchmarks/deploy.py [--model vit_small_patch16_224] [--rounds 15] [--batch-sizes 1,32]

Two artifacts of one model (random weights; tuners moved away from identity, as after training):

- LoRA (r=8, alpha=16) on qkv, proj, fc1, fc2: it folds completely, so "folded" is the base graph again
  and folded / base should be 1.00 within noise;
- the dual U-Tuner (rules/dual_utuner.yaml): ReLU adapters beside every MHA and FFN do not fold, so
  tuned / base is its real inference overhead.

Each is timed by utune_fx.bench (the code behind cli.py bench): base eager, tuned eager, folded eager,
and the folded graph in ONNX Runtime, calls interleaved round by round. The table prints the ratios;
the JSON (benchmarks/results/deploy.json) has the medians too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utune_fx  # noqa: E402,F401  (before timm)
from utune_fx.bench import benchmark, ratios  # noqa: E402
from utune_fx.match import load_rules  # noqa: E402
from utune_fx.rewrite.artifact import TunedSource, build_tuned  # noqa: E402

LORA_RULES = ROOT / "benchmarks" / "rules" / "lora_vit_linears.yaml"


def _tuned(spec: str, rules_path: Path):
    import torch

    result = build_tuned(TunedSource(spec, ["1,3,224,224"], "auto"), [load_rules(rules_path)])
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in result.module.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.02)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deploy.json"))
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    reports = {}
    for name, rules in (("LoRA (folds)", LORA_RULES), ("dual U-Tuner", ROOT / "rules" / "dual_utuner.yaml")):
        print(f"{name}: building and timing timm:{args.model}", file=sys.stderr)
        report = benchmark(_tuned(f"timm:{args.model}", rules), batches, rounds=args.rounds)
        report["ratios"] = ratios(report)
        reports[name] = report
    keys = list(next(iter(reports.values()))["ratios"])
    print(
        f"{args.model}, {args.rounds} interleaved rounds, torch threads "
        f"{next(iter(reports.values()))['torch_threads']}; median latency ratios"
    )
    print(f"{'artifact':<16}" + "".join(f"{key:>24}" for key in keys))
    for name, report in reports.items():
        print(f"{name:<16}" + "".join(f"{report['ratios'][key]:>24.3f}" for key in keys))
    print("\nmedian ms")
    for name, report in reports.items():
        for row in report["rows"]:
            print(
                f"{name:<16}{row['variant']:<14} batch {row['batch']:>3}: {row['median_ms']:9.2f} ms "
                f"{row['images_per_s']:9.1f} img/s"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "reports": reports}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

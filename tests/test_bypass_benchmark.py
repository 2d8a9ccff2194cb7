"""benchmarks/bypass_memory.py's measuring functions on a tiny ViT: the bypass keeps less for backward."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import bypass_memory as bench  # noqa: E402

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 10}
METHODS = ("res_tuning_bypass", "dual_utuner")


def test_the_bypass_saves_fewer_bytes_for_backward_than_the_dual_utuner():
    trainers = [bench.Trainer(method, TINY_VIT, 32, 4, torch.device("cpu")) for method in METHODS]
    rows = {trainer.method: bench.measure_memory(trainer) for trainer in trainers}
    bypass, dual = rows["res_tuning_bypass"], rows["dual_utuner"]
    # no backward through the frozen blocks: only the ladder and what follows the join keep activations
    assert 0 < bypass["saved_mib"] < dual["saved_mib"]
    assert 0 < bypass["step_gflop"] < dual["step_gflop"]  # and no backward pass through them
    assert bypass["trainable"] > 0 and dual["trainable"] > 0
    for row in rows.values():
        assert row["peak_mib"] >= 0 and "hwm_reset" in row  # the CPU's measure: resident memory
    steps = bench.time_steps(trainers, steps=1, warmup=0)
    for method, row in rows.items():
        row["step_ms"] = steps[method]
    bench.add_ratios(rows)
    assert dual["saved_mib_vs_dual"] == 1.0 and bypass["saved_mib_vs_dual"] < 1.0
    table = bench.markdown_table(rows, cuda=False)
    assert "| Res-Tuning-Bypass (rules/res_tuning_bypass.yaml) |" in table and "peak RSS growth MiB" in table

"""benchmarks/gpu_check.py (make gpu-check) in its CPU quick mode: every row in the JSON, the GPU-only ones skipped.

The full mode needs a GPU and is never run by the tests; this runs the same code on a 2-block ViT.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ROWS = ("lora", "peft_lora", "dual_utuner", "res_tuning_bypass", "lora_compiled", "onnx_runtime", "ddp")
GPU_ONLY = ("lora_compiled", "ddp")


def run_quick(out: Path) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    environment.pop("OUT", None)  # --out is explicit; $OUT only changes the default
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT, env=environment)


def test_quick_cpu_run_writes_every_row(tmp_path):
    out = tmp_path / "gpu-check.json"
    done = run_quick(out)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["row"]: row for row in report["rows"]}
    assert tuple(rows) == ROWS
    for key in GPU_ONLY:
        assert rows[key]["status"] == "skipped" and rows[key]["reason"], rows[key]
    for key in ("lora", "peft_lora", "dual_utuner", "res_tuning_bypass"):
        row = rows[key]
        assert row["status"] == "ok", row
        assert row["step_ms"] > 0 and row["peak_memory_mib"] is None  # GPU memory only on CUDA
    # the same layers, rank and classifier: utune_fx's LoRA and PEFT's train exactly as many parameters
    assert rows["lora"]["trainable"] == rows["peft_lora"]["trainable"]
    assert rows["lora"]["step_vs_peft"] > 0 and rows["peft_lora"]["step_vs_peft"] == 1.0
    bypass = rows["res_tuning_bypass"]  # its ratios against the dual U-Tuner; memory only on CUDA
    assert bypass["step_vs_dual"] > 0 and "memory_vs_dual" not in bypass
    assert "against the dual U-Tuner: step" in report["table"]
    onnx_row = rows["onnx_runtime"]
    assert onnx_row["status"] == "ok", onnx_row
    assert onnx_row["provider"] == "CPUExecutionProvider"
    assert onnx_row["max_abs_error"] <= onnx_row["allowed_error"]
    assert report["quick"] and report["device"] == "cpu"
    for row in rows.values():
        assert row["label"] in report["table"] and row["label"] in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the full mode would run")
def test_full_mode_refuses_at_once_without_cuda(tmp_path):
    command = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "never.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert "no usable CUDA device" in done.stderr and "--device cpu --quick" in done.stderr
    assert not (tmp_path / "never.json").exists()

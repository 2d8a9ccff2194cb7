"""GPU proof: utune_fx LoRA against PEFT LoRA, the dual U-Tuner, Res-Tuning-Bypass, torch.compile, ONNX Runtime
and DDP; one table.

    make gpu-check                                          # full mode on CUDA (exits 2 at once without it)
    python benchmarks/gpu_check.py [--device cuda:0] [--out runs/gpu-check.json]
    python benchmarks/gpu_check.py --device cpu --quick     # the script's own test (tests/test_gpu_check.py)

Full mode (one GPU, under 8 minutes, random weights, nothing downloaded): timm vit_base_patch16_224 at
batch 64, bf16 autocast, AdamW, channels-last on CUDA as utune_fx/train/loop.py sets it. Training rows:
median step time after warm-up and peak GPU memory of utune_fx LoRA (``utune_fx.tune(model, "lora")``),
PEFT LoRA on the same layers (qkv, proj; r 8, alpha 16; classifier trained by both), the dual U-Tuner and
Res-Tuning-Bypass (rules/res_tuning_bypass.yaml), with ratios against PEFT from this run, and the bypass's
against the dual U-Tuner (the issue's goal: peak memory <= 0.5x, step time <= 0.7x); torch.compile as
``cli.py train --compile`` applies it; ONNX Runtime (``export_onnx``; CUDAExecutionProvider, the CPU's with --device cpu) against eager: max abs
error in strict float32 and latency; DDP under torchrun when more than one GPU is visible. README "GPU
check" says more. A row that cannot run here is "skipped" with the reason; one that raises is "failed"
(exit code 1) and the rest still run. JSON: --out, default $OUT/gpu-check.json when $OUT is a directory
(the device machine's results folder), else runs/gpu-check.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import utune_fx  # noqa: E402  (before timm and peft: torchvision ops on CPU-only torch)
from utune_fx.errors import UtuneError  # noqa: E402
from utune_fx.train.devices import resolve_device  # noqa: E402

MODEL_NAME = "vit_base_patch16_224"
PEFT_TARGETS = r"blocks\.\d+\.attn\.(qkv|proj)"  # the layers rules/lora.yaml tunes in a ViT
BYPASS_GOAL = {"peak": 0.5, "step": 0.7}  # Res-Tuning-Bypass against the dual U-Tuner, at most (the issue's)


@dataclasses.dataclass(frozen=True)
class Setting:
    model_kwargs: dict
    image_size: int
    batch: int
    warmup_steps: int
    timed_steps: int
    latency_runs: int
    ddp_steps_per_epoch: int


FULL = Setting({}, 224, 64, warmup_steps=5, timed_steps=20, latency_runs=20, ddp_steps_per_epoch=8)
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
QUICK = Setting(TINY_VIT, 32, 4, warmup_steps=1, timed_steps=3, latency_runs=3, ddp_steps_per_epoch=2)
ROWS = {
    "lora": "utune_fx LoRA (rules/lora.yaml)",
    "peft_lora": "PEFT LoRA (same layers, r 8, alpha 16)",
    "dual_utuner": "utune_fx dual U-Tuner",
    "res_tuning_bypass": "utune_fx Res-Tuning-Bypass",
    "lora_compiled": "utune_fx LoRA, torch.compile (--compile)",
    "onnx_runtime": "ONNX Runtime vs eager (LoRA, float32)",
    "ddp": "DDP: torchrun cli.py train, all GPUs",
}


class Skipped(Exception):
    """A row that cannot be measured here; its message is the reason."""


def build_vit(setting: Setting) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(MODEL_NAME, pretrained=False, **setting.model_kwargs)


def example_images(setting: Setting, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, setting.image_size, setting.image_size, generator=generator).to(device)


def tuned_model(variant: str, setting: Setting) -> tuple[torch.nn.Module, float]:
    """The model with its tuners, on the CPU, and the seconds its set-up took (utune_fx: tracing included)."""
    model = build_vit(setting)
    start = time.perf_counter()
    if variant == "peft_lora":
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS, modules_to_save=["head"])
        model = peft.get_peft_model(model, config)
    else:
        model = utune_fx.tune(model, variant, (example_images(setting, 2),))
    return model, time.perf_counter() - start


def on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.to(device)
    if device.type == "cuda":  # what the training loop does for a model with convolutions (the patch embedding)
        model.to(memory_format=torch.channels_last)
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(model: torch.nn.Module, setting: Setting, device: torch.device, compile_model: bool) -> dict:
    """Median step time of the timed steps after the warm-up ones, and their peak GPU memory."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    runner = torch.compile(model) if compile_model else model
    images = example_images(setting, setting.batch, device)
    labels = torch.randint(0, 1000, (setting.batch,), generator=torch.Generator().manual_seed(2)).to(device)

    def step() -> float:
        synchronize(device)
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(runner(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - began

    first_step_s = [step() for _ in range(setting.warmup_steps)][0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = statistics.median(step() for _ in range(setting.timed_steps))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "trainable": sum(p.numel() for p in trainable),
        "first_step_s": round(first_step_s, 3),
        "step_ms": round(1000 * step_s, 2),
        "images_per_s": round(setting.batch / step_s, 1),
        "peak_memory_mib": None if peak is None else round(peak, 1),
    }


def measure_training(variant: str, setting: Setting, device: torch.device, compile_model: bool = False) -> dict:
    model, setup_s = tuned_model(variant, setting)
    return {"setup_s": round(setup_s, 2), **time_training(on_device(model, device), setting, device, compile_model)}


def measure_compile(setting: Setting, device: torch.device, compile_on_cpu: bool) -> dict:
    if device.type != "cuda" and not compile_on_cpu:
        raise Skipped("torch.compile is timed on CUDA only (--compile targets CUDA; on CPU it needs minutes)")
    figures = measure_training("lora", setting, device, compile_model=True)
    figures["compile_s"] = figures.pop("first_step_s")  # the first call traces and compiles
    return figures


def ort_session(path: Path, device: torch.device):
    import onnxruntime as ort

    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    available = ort.get_available_providers()
    if provider not in available:
        raise Skipped(
            f"onnxruntime {ort.__version__} has no {provider} (it has {', '.join(available)}); "
            "install onnxruntime-gpu, as pyproject.toml asks on Linux x86-64"
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    cuda = [(provider, {"device_id": device.index or 0, "use_tf32": "0"}), "CPUExecutionProvider"]  # strict fp32
    session = ort.InferenceSession(str(path), options, providers=cuda if device.type == "cuda" else [provider])
    if session.get_providers()[0] != provider:
        raise Skipped(f"ONNX Runtime could not start {provider} (its CUDA libraries did not load); it fell back")
    return session


def lora_off_identity(setting: Setting) -> torch.nn.Module:
    """The LoRA model in eval mode with its tuners drawn away from identity, as after training."""
    model, _ = tuned_model("lora", setting)
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.02)
    return model.eval()


@contextlib.contextmanager
def strict_float32():
    """No TF32 in eager PyTorch (ONNX Runtime's session is told the same): parity, not TF32's rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def measure_onnx(setting: Setting, device: torch.device, workdir: Path) -> dict:
    import numpy as np

    from utune_fx.export import TOLERANCES, export_onnx

    model, path = lora_off_identity(setting), workdir / "lora.onnx"
    start = time.perf_counter()
    export_onnx(model, (example_images(setting, 2),), path, verify=False)
    export_s = time.perf_counter() - start
    session = ort_session(path, device)
    model, images = on_device(model, device), example_images(setting, setting.batch, device).contiguous()
    binding = session.io_binding()  # inputs and outputs stay on the device: no host copies in the timings
    place = ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)
    binding.bind_input(session.get_inputs()[0].name, *place, np.float32, list(images.shape), images.data_ptr())
    binding.bind_output(session.get_outputs()[0].name, *place)
    with strict_float32(), torch.no_grad():
        expected = model(images).float().cpu()
        synchronize(device)
        session.run_with_iobinding(binding)
        error = float((torch.from_numpy(binding.copy_outputs_to_cpu()[0]).float() - expected).abs().max())
        calls = {"eager": lambda: model(images), "onnx_runtime": lambda: session.run_with_iobinding(binding)}
        latencies = interleaved_latencies(calls, setting, device)
    tolerance = TOLERANCES[torch.float32]  # the project's float32 tolerance, against the largest output
    allowed = tolerance.atol + tolerance.rtol * float(expected.abs().max())
    verdict = {} if error <= allowed else {"status": "failed", "reason": "outside float32 tolerance"}
    return verdict | {
        "provider": session.get_providers()[0],
        "export_s": round(export_s, 2),
        "max_abs_error": error,
        "allowed_error": allowed,
        "eager_ms": round(latencies["eager"], 3),
        "onnx_runtime_ms": round(latencies["onnx_runtime"], 3),
        "onnx_runtime_vs_eager": round(latencies["onnx_runtime"] / latencies["eager"], 3),
    }


def interleaved_latencies(calls: dict, setting: Setting, device: torch.device) -> dict[str, float]:
    """Median milliseconds of each call, the calls alternating round by round after three warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(3 + setting.latency_runs):
        for name, call in calls.items():
            synchronize(device)
            began = time.perf_counter()
            call()
            synchronize(device)
            if round_index >= 3:
                times[name].append(1000 * (time.perf_counter() - began))
    return {name: statistics.median(values) for name, values in times.items()}


def torchrun_support_missing() -> str | None:
    """Why cli.py train cannot run under torchrun yet, or None once utune_fx/train sets up a process group."""
    sources = [*sorted((ROOT / "utune_fx" / "train").glob("*.py")), ROOT / "utune_fx" / "cli_train.py"]
    if any("init_process_group" in source.read_text() for source in sources if source.exists()):
        return None
    return "cli.py train has no torchrun support yet (no init_process_group in utune_fx/train/ or cli_train.py)"


def measure_ddp(setting: Setting, device: torch.device, workdir: Path) -> dict:
    if device.type != "cuda":
        raise Skipped("DDP is measured on CUDA devices (nccl); this run is on the CPU")
    if (count := torch.cuda.device_count()) < 2:
        raise Skipped(f"{count} GPU visible; DDP needs 2 or more")
    if missing := torchrun_support_missing():
        raise Skipped(missing)
    import numpy as np

    images, size, rng = setting.batch * setting.ddp_steps_per_epoch * count, setting.image_size, np.random.default_rng()
    npz = workdir / "random_images.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (images, size, size, 3), np.uint8), y_train=rng.integers(0, 10, images))
    options = "&".join(f"{k}={v}" for k, v in {**setting.model_kwargs, "num_classes": 10}.items())
    spec = f"timm:{MODEL_NAME}?{options}"
    single = ddp_images_per_s(spec, npz, 1, setting, workdir)
    multi = ddp_images_per_s(spec, npz, count, setting, workdir)
    return {
        "world_size": count,
        "images_per_s_one_gpu": round(single, 1),
        "images_per_s_all_gpus": round(multi, 1),
        "scaling_efficiency": round(multi / (single * count), 3),
    }


def ddp_images_per_s(spec: str, npz: Path, processes: int, setting: Setting, workdir: Path) -> float:
    """Training images per second of the second epoch of ``cli.py train`` under torchrun (the first warms up)."""
    images, out = setting.batch * setting.ddp_steps_per_epoch * processes, workdir / f"ddp{processes}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += [str(ROOT / "cli.py"), "train", spec, "--rules", "lora", "--data", f"npz:{npz}", "-o", str(out)]
    command += ["--train-size", str(images), "--val-size", "0", "--epochs", "2", "--no-augment", "--device", "cuda"]
    command += ["--batch-size", str(setting.batch * processes)]  # the global batch: the same per GPU
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun with {processes} process(es) exited {done.returncode}: {done.stderr[-500:]}")
    last_epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return images / last_epoch["seconds"]


def run_row(key: str, measure, device: torch.device) -> dict:
    print(f"gpu_check: {ROWS[key]} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    row = {"row": key, "label": ROWS[key]}
    try:  # a measure may return its own status and reason (a parity outside tolerance: failed, with figures)
        row |= {"status": "ok", "reason": None, **measure()}
    except Skipped as skipped:
        row |= {"status": "skipped", "reason": str(skipped)}
    except Exception as error:  # one broken row must not hide the others
        traceback.print_exc()
        row |= {"status": "failed", "reason": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"}
    row["elapsed_s"] = round(time.perf_counter() - start, 1)
    gc.collect()  # the row's models are unreachable now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_ratios(rows: dict[str, dict]) -> None:
    """Step time and memory against PEFT LoRA, the bypass's against the dual U-Tuner, and compile's speed-up
    over eager LoRA, from this run alone."""
    peft_row, lora_row = rows["peft_lora"], rows["lora"]
    bypass, dual = rows["res_tuning_bypass"], rows["dual_utuner"]
    if bypass["status"] == "ok" and dual["status"] == "ok":
        bypass["step_vs_dual"] = round(bypass["step_ms"] / dual["step_ms"], 3)
        if bypass["peak_memory_mib"] is not None:
            bypass["memory_vs_dual"] = round(bypass["peak_memory_mib"] / dual["peak_memory_mib"], 3)
    for key in ("lora", "peft_lora", "dual_utuner", "res_tuning_bypass", "lora_compiled"):
        row = rows[key]
        if row["status"] != "ok" or peft_row["status"] != "ok":
            continue
        row["step_vs_peft"] = round(row["step_ms"] / peft_row["step_ms"], 3)
        if row["peak_memory_mib"] is not None:
            row["memory_vs_peft"] = round(row["peak_memory_mib"] / peft_row["peak_memory_mib"], 3)
    compiled = rows["lora_compiled"]
    if compiled["status"] == "ok" and lora_row["status"] == "ok":
        compiled["speedup_over_eager"] = round(lora_row["step_ms"] / compiled["step_ms"], 3)


def describe(row: dict) -> str:
    """The table's last column: what a row found beyond step time and memory, or why it has no figures."""
    verdict = "" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
    if "provider" in row:  # the ONNX Runtime row, also when its parity failed
        return (verdict and verdict + "; ") + (
            f"{row['provider']}: max abs error {row['max_abs_error']:.1e} (allowed {row['allowed_error']:.1e}); "
            f"{row['onnx_runtime_ms']:.2f} ms vs eager {row['eager_ms']:.2f} ms "
            f"({row['onnx_runtime_vs_eager']:.2f}x)"
        )
    if verdict:
        return verdict
    if row["row"] == "ddp":
        return (
            f"{row['world_size']} GPUs: {row['images_per_s_all_gpus']:.0f} img/s vs "
            f"{row['images_per_s_one_gpu']:.0f} on one, scaling {row['scaling_efficiency']:.2f}"
        )
    text = f"trainable {row['trainable']:,}; set-up {row['setup_s']:.1f} s"
    if "step_vs_dual" in row:
        peak, step = BYPASS_GOAL["peak"], BYPASS_GOAL["step"]
        memory = f", peak {row['memory_vs_dual']:.2f}x (goal <= {peak}x)" if "memory_vs_dual" in row else ""
        text += f"; against the dual U-Tuner: step {row['step_vs_dual']:.2f}x (goal <= {step}x){memory}"
    if row["row"] == "lora_compiled":
        text += f"; compile {row['compile_s']:.1f} s; speed-up {row.get('speedup_over_eager', float('nan')):.2f}x"
    return text


def markdown_table(rows: dict[str, dict]) -> str:
    def figure(row: dict, key: str, form: str) -> str:
        return format(row[key], form) if row.get(key) is not None else ""

    lines = [
        "| measurement | step ms | step / PEFT | peak GPU MiB | peak / PEFT | result |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows.values():
        cells = [row["label"], figure(row, "step_ms", ".1f"), figure(row, "step_vs_peft", ".2f")]
        cells += [figure(row, "peak_memory_mib", ".0f"), figure(row, "memory_vs_peft", ".2f"), describe(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(device: torch.device, setting: Setting) -> dict:
    import onnxruntime
    import peft
    import timm

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    versions = {module.__name__: module.__version__ for module in (torch, timm, peft, onnxruntime)}
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() or None,  # none on a copy without .git (the device machine's)
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": MODEL_NAME,
        "precision": "bf16 autocast",
        **dataclasses.asdict(setting),
        "versions": versions | {"python": sys.version.split()[0], "cuda": torch.version.cuda},
    }


def default_out() -> Path:
    out_dir = os.environ.get("OUT")  # the device machine's results folder
    return Path(out_dir) / "gpu-check.json" if out_dir and Path(out_dir).is_dir() else ROOT / "runs" / "gpu-check.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu or auto (default cuda)")
    parser.add_argument("--quick", action="store_true", help="a 2-block ViT at 32 px, batch 4, few steps")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: $OUT/ or runs/gpu-check.json)")
    parser.add_argument("--compile-on-cpu", action="store_true", help="time torch.compile on the CPU too (slow)")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)  # cli.py train's check: one line, before any work
    except UtuneError as error:
        print(f"gpu_check: {error} (to test this script on a CPU: --device cpu --quick)", file=sys.stderr)
        return 2
    setting = QUICK if args.quick else FULL
    out = args.out or default_out()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as temporary:
        workdir = Path(temporary)
        measures = {
            "lora": lambda: measure_training("lora", setting, device),
            "peft_lora": lambda: measure_training("peft_lora", setting, device),
            "dual_utuner": lambda: measure_training("dual_utuner", setting, device),
            "res_tuning_bypass": lambda: measure_training("res_tuning_bypass", setting, device),
            "lora_compiled": lambda: measure_compile(setting, device, args.compile_on_cpu),
            "onnx_runtime": lambda: measure_onnx(setting, device, workdir),
            "ddp": lambda: measure_ddp(setting, device, workdir),
        }
        rows = {key: run_row(key, measure, device) for key, measure in measures.items()}
    add_ratios(rows)
    meta = environment(device, setting) | {"quick": args.quick, "total_s": round(time.perf_counter() - started, 1)}
    table = markdown_table(rows)
    print(
        f"\n{meta['model']}{f' (quick: {TINY_VIT})' if args.quick else ''}, batch "
        f"{setting.batch}, bf16 autocast, {meta['device']}; medians of {setting.timed_steps} steps after "
        f"{setting.warmup_steps} warm-up; ratios from this run; {meta['total_s']:.0f} s in all\n"
    )
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": list(rows.values()), "table": table}, indent=1))
    print(f"\nwrote {out}")
    return 1 if any(row["status"] == "failed" for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Res-Tuning-Bypass against the dual U-Tuner and LoRA: training memory and step time on ViT-B/16.

    python benchmarks/bypass_memory.py                          # CPU, batch 8 (about 3 minutes on 2 cores)
    python benchmarks/bypass_memory.py --device cuda            # batch 64, CUDA peak memory
    python benchmarks/bypass_memory.py --batch 16 --steps 10 --out runs/bypass-memory.json

timm ``vit_base_patch16_224`` with random weights (nothing downloaded), tuned by ``utune_fx.tune`` with
rules/res_tuning_bypass.yaml, rules/dual_utuner.yaml and rules/lora.yaml (each trains the classifier
too). Every method trains on the same fixed random batch (seeded images and labels, cross-entropy on
the 1,000-class classifier, float32, AdamW). The default batch is 8 on the CPU (the whole run then
takes about 3 minutes on 2 idle cores: a step is a few seconds) and 64 on CUDA. Per method:

- **saved for backward** (any device): the bytes autograd keeps for the backward pass during one
  step's forward, counted by ``torch.autograd.graph.saved_tensors_hooks`` as the sum of the unique
  storages' nbytes, leaving out the model's own parameters and buffers (a frozen weight saved for a
  matrix product costs nothing the model does not hold anyway): the activations a step keeps.
- **peak** over two steps (the first under the hooks above; the second starts with AdamW's state in
  place), each method in a fresh subprocess so that none inherits another's allocator state.
  On CUDA: ``torch.cuda.max_memory_allocated``, reset once the model is on the device; it counts the
  weights too (``peak_above_model_mib`` in the JSON leaves them out). On the CPU torch's allocator is
  invisible to tracemalloc, so it is the growth of resident memory: the kernel's high-water mark
  (VmHWM) during the steps minus the RSS once the model was built, the mark reset to the current RSS
  through /proc/self/clear_refs before the first step. It counts activations, gradients, optimizer
  state, the frozen forward's transient buffers and what glibc's malloc keeps of freed blocks; not
  the weights. Where the reset is not allowed it falls back to ru_maxrss, which also holds the
  build's peak (``hwm_reset``: false in the JSON).
- **step GFLOP** (any device, independent of the machine's load): the floating-point operations of
  one step (forward, backward, AdamW) as ``torch.utils.flop_counter`` counts them: matrix products,
  convolutions and the attention kernels it knows (CUDA's; the CPU's fused attention is not counted:
  about 4% of a ViT-B/16's products at 224 px).
- **step**: the median wall time of --steps forward + backward + AdamW steps, after --warmup
  untimed rounds, all three models in one process taking turns step by step, so that a shared
  machine's changing load falls on every method alike.

Ratios are against the dual U-Tuner of the same run. The issue's goal for the bypass: peak memory
<= 0.5x the dual U-Tuner's, step time <= 0.7x. The table is printed as markdown; --out writes it
and every figure as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import utune_fx  # noqa: E402  (before timm: torchvision ops on CPU-only torch)
from benchmarks.gpu_check import BYPASS_GOAL, MODEL_NAME, synchronize  # noqa: E402
from utune_fx.errors import UtuneError  # noqa: E402
from utune_fx.train.devices import resolve_device  # noqa: E402

METHODS = {
    "res_tuning_bypass": "Res-Tuning-Bypass (rules/res_tuning_bypass.yaml)",
    "dual_utuner": "dual U-Tuner (rules/dual_utuner.yaml)",
    "lora": "LoRA (rules/lora.yaml: qkv, proj; r 8)",
}
REFERENCE = "dual_utuner"
DEFAULT_BATCH = {"cpu": 8, "cuda": 64}
MIB = 2**20


def build(method: str, model_kwargs: dict, image_size: int, seed: int = 0) -> torch.nn.Module:
    """timm's ViT with random weights, tuned by the shipped rule file ``method``."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(MODEL_NAME, pretrained=False, **model_kwargs)
    example = torch.randn(2, 3, image_size, image_size)
    with warnings.catch_warnings():  # the bypass may come back as the rewritten GraphModule: it says so
        warnings.simplefilter("ignore", UserWarning)
        return utune_fx.tune(model, method, (example,)).train()


def fixed_batch(batch: int, image_size: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    return images, torch.randint(0, classes, (batch,), generator=generator)


def saved_for_backward(model: torch.nn.Module):
    """A context that counts the bytes autograd saves (unique storages, the model's own left out)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    return hooks, storages


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Set the kernel's high-water mark of this process to its current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_kb(reset: bool) -> int:
    return _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Trainer:
    """One method's model on ``device`` with its AdamW and the fixed batch; ``step()`` returns seconds."""

    def __init__(self, method: str, model_kwargs: dict, image_size: int, batch: int, device: torch.device):
        self.method, self.device = method, device
        self.model = build(method, model_kwargs, image_size).to(device)
        classes = model_kwargs.get("num_classes", 1000)
        self.images, self.labels = (t.to(device) for t in fixed_batch(batch, image_size, classes))
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4)

    def step(self) -> float:
        synchronize(self.device)
        began = time.perf_counter()
        F.cross_entropy(self.model(self.images), self.labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - began


def measure_memory(trainer: Trainer) -> dict:
    """A freshly built trainer's parameters, bytes saved for backward, floating-point operations of a
    step and peak memory over two steps (the first counted by the hooks and the flop counter; the
    second starts with AdamW's state in place). For the CPU's peak the trainer must be the first work
    of a fresh process: the allocator keeps what earlier work freed."""
    from torch.utils.flop_counter import FlopCounterMode

    where = trainer.device
    gc.collect()
    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats(where)
        before = torch.cuda.memory_allocated(where)
    else:
        reset = reset_peak_rss()
        before = _status_kb("VmRSS") * 1024
    hooks, storages = saved_for_backward(trainer.model)
    with hooks, FlopCounterMode(display=False) as flops:
        trainer.step()
    trainer.step()
    figures = {
        "method": trainer.method,
        "trainable": sum(p.numel() for p in trainer.trainable),
        "saved_mib": sum(storages.values()) / MIB,
        "step_gflop": flops.get_total_flops() / 1e9,
    }
    if where.type == "cuda":
        peak = torch.cuda.max_memory_allocated(where)
        return figures | {"peak_mib": peak / MIB, "peak_above_model_mib": (peak - before) / MIB}
    growth = peak_rss_kb(reset) * 1024 - before
    return figures | {"peak_mib": max(growth, 0) / MIB, "hwm_reset": reset}


def time_steps(trainers: list[Trainer], steps: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds of a training step per method, the trainers taking turns step by step (a
    shared machine's load falls on all alike) after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {trainer.method: [] for trainer in trainers}
    for round_index in range(warmup + steps):
        for trainer in trainers:
            seconds = trainer.step()
            if round_index >= warmup:
                times[trainer.method].append(1000 * seconds)
    return {method: statistics.median(values) for method, values in times.items()}


def run_worker(method: str, args: argparse.Namespace) -> dict:
    """``measure_memory`` in a fresh interpreter: its peak memory is its own."""
    command = [sys.executable, __file__, "--worker", method, "--device", args.device, "--batch", str(args.batch)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{method}: the worker exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_ratios(rows: dict[str, dict]) -> None:
    reference = rows[REFERENCE]
    for row in rows.values():
        for key in ("saved_mib", "peak_mib", "step_gflop", "step_ms"):
            row[f"{key}_vs_dual"] = row[key] / reference[key] if reference[key] else float("nan")


def markdown_table(rows: dict[str, dict], cuda: bool) -> str:
    peak = "peak GPU MiB" if cuda else "peak RSS growth MiB"
    lines = [
        f"| method | trainable | saved for backward MiB | / dual | {peak} | / dual | step GFLOP | / dual "
        "| step ms | / dual |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in rows.items():
        lines.append(
            f"| {METHODS[key]} | {row['trainable']:,} | {row['saved_mib']:.1f} | {row['saved_mib_vs_dual']:.2f} "
            f"| {row['peak_mib']:.0f} | {row['peak_mib_vs_dual']:.2f} | {row['step_gflop']:.0f} "
            f"| {row['step_gflop_vs_dual']:.2f} | {row['step_ms']:.0f} "
            f"| {row['step_ms_vs_dual']:.2f} |"
        )
    return "\n".join(lines)


def goal_line(rows: dict[str, dict]) -> str:
    bypass = rows["res_tuning_bypass"]
    verdicts = []
    for name, key in (("peak", "peak_mib_vs_dual"), ("step", "step_ms_vs_dual")):
        met = bypass[key] <= BYPASS_GOAL[name]
        verdicts.append(f"{name} {bypass[key]:.2f}x (goal <= {BYPASS_GOAL[name]}x: {'met' if met else 'missed'})")
    return "Res-Tuning-Bypass against the dual U-Tuner: " + "; ".join(verdicts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 8 on CPU, 64 on CUDA)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of steps first (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures and the table as JSON")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        where = resolve_device(args.device)
    except UtuneError as error:
        print(f"bypass_memory: {error}", file=sys.stderr)
        return 2
    args.batch = args.batch or DEFAULT_BATCH[where.type]
    if args.worker:
        print(json.dumps(measure_memory(Trainer(args.worker, {}, 224, args.batch, where))))
        return 0
    started = time.perf_counter()
    rows = {}
    for method in METHODS:
        print(f"bypass_memory: memory of {METHODS[method]} ...", file=sys.stderr, flush=True)
        rows[method] = run_worker(method, args)
    print("bypass_memory: step times, the methods taking turns ...", file=sys.stderr, flush=True)
    step_ms = time_steps([Trainer(method, {}, 224, args.batch, where) for method in METHODS], args.steps, args.warmup)
    for method, row in rows.items():
        row["step_ms"] = step_ms[method]
    add_ratios(rows)
    cuda = where.type == "cuda"
    table, goal = markdown_table(rows, cuda), goal_line(rows)
    device = torch.cuda.get_device_name(where) if cuda else f"CPU, {torch.get_num_threads()} threads"
    heading = (
        f"{MODEL_NAME} (random weights), batch {args.batch}, float32, AdamW, {device}; step: median of "
        f"{args.steps} after {args.warmup} warm-up; ratios against the dual U-Tuner of this run; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    print(f"\n{heading}\n\n{table}\n\n{goal}")
    if args.out:
        meta = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "model": MODEL_NAME,
            "device": device,
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**meta, "rows": list(rows.values()), "table": table, "goal": goal}, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

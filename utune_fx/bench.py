"""Inference latency and throughput of one tuned artifact, four ways, compared in one run.

    cli.py bench DIR  ->  base eager     the frozen model the artifact was tuned from
                          tuned eager    the rewritten graph, tuners as branches
                          folded eager   the graph after folding (fold/__init__.py)
                          onnxruntime    the folded graph exported to ONNX, on ORT's best provider
                      at each batch size (1 and 32 by default): median latency, images/s, and the
                      ratio to base eager

Calls are interleaved (one call of every variant per round, in a seeded random
order) so that drifts of a shared, noisy machine hit every variant alike, and
ONNX Runtime's threads do not spin after a run (by default they do, slowing
whichever variant comes next); ratios within one run are what to compare, not
absolute figures across runs.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from utune_fx.export import export_onnx
from utune_fx.export.verify import providers, random_inputs
from utune_fx.fold import fold
from utune_fx.trace.annotate import set_training
from utune_fx.train.progress import count_progress


@dataclass
class BenchRow:
    variant: str
    batch: int
    median_ms: float
    images_per_s: float
    vs_base: float  # median latency / base eager's at this batch size
    calls: int


def _eager(module: torch.nn.Module, inputs: list[torch.Tensor]) -> Callable[[], object]:
    set_training(module, False)

    def call() -> object:
        with torch.inference_mode():
            return module(*inputs)

    return call


def _onnxruntime(path: Path, inputs: list[torch.Tensor]) -> tuple[Callable[[], object], str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT's threads spin after each run by default, which would slow whichever variant runs next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=providers())
    names = [i.name for i in session.get_inputs()]
    feeds = {name: tensor.numpy() for name, tensor in zip(names, inputs)}
    return (lambda: session.run(None, feeds)), session.get_providers()[0]


def benchmark(
    result,
    batch_sizes: tuple[int, ...] = (1, 32),
    rounds: int = 30,
    warmup: int = 3,
    opset: int = 18,
    progress: bool = True,
) -> dict:
    """Time base, tuned, folded and ONNX Runtime; returns {rows, device, provider, threads, ...}."""
    folded = fold(result.module, result.summaries)
    generator = torch.Generator().manual_seed(0)
    rows: list[BenchRow] = []
    provider = ""
    with tempfile.TemporaryDirectory() as scratch, count_progress("rate", progress, transient=True) as bar:
        exported = export_onnx(folded.module, result.example_inputs, Path(scratch) / "model.onnx", opset=opset)
        task = bar.add_task("benchmark", total=len(batch_sizes) * 4 * (rounds + warmup), rate="")
        for batch in batch_sizes:
            inputs = random_inputs(result.example_inputs, batch, generator)
            ort_call, provider = _onnxruntime(exported.path, inputs)
            variants = {
                "base eager": _eager(result.base_model, inputs),
                "tuned eager": _eager(result.module, inputs),
                "folded eager": _eager(folded.module, inputs),
                "onnxruntime": ort_call,
            }
            times: dict[str, list[float]] = {name: [] for name in variants}
            order = random.Random(batch)
            for round_index in range(warmup + rounds):
                for name in order.sample(list(variants), len(variants)):  # no variant always follows another
                    start = time.perf_counter()
                    variants[name]()
                    if round_index >= warmup:
                        times[name].append(time.perf_counter() - start)
                    bar.update(
                        task,
                        advance=1,
                        description=f"batch {batch}: {name}",
                        rate=f"{batch / (time.perf_counter() - start):,.0f} img/s",
                    )
            base = statistics.median(times["base eager"])
            for name, samples in times.items():
                median = statistics.median(samples)
                rows.append(BenchRow(name, batch, 1000 * median, batch / median, median / base, len(samples)))
    return {
        "rows": [asdict(row) for row in rows],
        "provider": provider,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": _ort_version(),
        "rounds": rounds,
        "input_shapes": [list(t.shape[1:]) for t in result.example_inputs],
        "folded": folded.count("folded"),
        "kept": folded.count("kept"),
        "exporter": exported.exporter,
    }


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def ratios(report: dict) -> dict[str, float]:
    """The README's figures: folded / base, tuned / base, ORT / folded eager, per batch size."""
    by = {(row["variant"], row["batch"]): row["median_ms"] for row in report["rows"]}
    out = {}
    for batch in sorted({row["batch"] for row in report["rows"]}):
        out[f"folded/base@{batch}"] = by["folded eager", batch] / by["base eager", batch]
        out[f"tuned/base@{batch}"] = by["tuned eager", batch] / by["base eager", batch]
        out[f"ort/folded eager@{batch}"] = by["onnxruntime", batch] / by["folded eager", batch]
    return {key: round(value, 3) for key, value in out.items()}

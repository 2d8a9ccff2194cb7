"""cli.py export's ONNX Runtime adapters (export/adapters.py): parse, call, print.

python cli.py export DIR -o shared.onnx --tuners-as-inputs
    shared.onnx (tuner inputs defaulting to the base model's values) + shared.onnx_adapter (DIR's task)
python cli.py export DIR2 --adapter-for shared.onnx -o task2.onnx_adapter
    DIR2's tuners as an adapter for shared.onnx, refused in one line when DIR2 has other tuners
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from utune_fx.cli_support import print_json
from utune_fx.errors import UtuneError


def tuned_with_initial(path: str | Path, model: str | None):
    """(result, module, None) as load_for_inference gives them for a tuned artifact, with
    ``result.initial_tensors``: the trainable tensors before training, the base model's values."""
    from utune_fx.rewrite.artifact import artifact_directory, load_tuned
    from utune_fx.trace.annotate import set_training

    directory = artifact_directory(path)
    if directory is None:
        raise UtuneError(f"{path}: no tuned artifact here; write one with cli.py rewrite or train")
    result = load_tuned(directory, model=model, keep_initial=True)
    set_training(result.module, False)
    return result, result.module, None


def parity_lines(parity, label: str = "") -> list[str]:
    """One line per check: ``ONNX Runtime (CPUExecutionProvider) vs PyTorch, batch 1: max abs error ...``."""
    return [
        f"  {label}ONNX Runtime ({parity.provider}) vs PyTorch, {check.where}: max abs error "
        f"{check.max_abs_error:.1e}, relative {check.rel_error:.1e} ({check.dtype}: rtol {check.rtol:g}, "
        f"atol {check.atol:g}) {'ok' if check.passed else 'FAILED'}"
        + (" (uninformative: all-zero outputs)" if check.uninformative else "")
        for check in parity.checks
    ] + [f"  warning: {warning}" for warning in parity.warnings]


def _adapter_report(adapter) -> dict:
    return {
        "path": str(adapter.path),
        "model": str(adapter.model),
        "tensors": adapter.tensors,
        "size_bytes": adapter.size_bytes,
        "provider": adapter.parity.provider,
        "parity": [vars(check) for check in adapter.parity.checks],
        "warnings": adapter.parity.warnings,
    }


def task_adapter(result, exported) -> tuple[dict, list[str]]:
    """After export --tuners-as-inputs: the exported task's adapter beside the model, verified; the
    report entries and the lines to print."""
    from utune_fx.export import adapter_path_for, export_adapter

    path = adapter_path_for(exported.path)
    with Console(stderr=True).status(f"writing {path} and checking it in ONNX Runtime"):
        adapter = export_adapter(result.module, result.example_inputs, path, exported.path)
    report = {
        "adapter": _adapter_report(adapter),
        "defaults_parity": [vars(check) for check in exported.defaults_parity.checks],
    }
    lines = parity_lines(exported.defaults_parity, "tuner inputs unfed (the base model): ")
    lines.append(f"  wrote {path} ({adapter.tensors} tuner tensors, {adapter.size_bytes / 2**20:.2f} MiB)")
    lines += parity_lines(adapter.parity, "with it active: ")
    lines.append(
        f"  {len(exported.tuner_inputs)} tuner tensors are graph inputs (unfed: the base model); serve another "
        f"task with cli.py export ITS_DIR --adapter-for {exported.path} -o TASK.onnx_adapter"
    )
    return report, lines


def export_adapter_for(args: argparse.Namespace) -> int:
    """export DIR --adapter-for MODEL.onnx -o TASK.onnx_adapter: DIR's tuners for a shared model."""
    from utune_fx.export import ADAPTER_SUFFIX, export_adapter
    from utune_fx.fold.artifact import is_folded, load_for_inference
    from utune_fx.train.session import checked_artifact_directory

    if Path(args.output).suffix != ADAPTER_SUFFIX:  # before loading anything: export_adapter says it too
        raise UtuneError(f"{args.output}: an adapter file's name ends in {ADAPTER_SUFFIX}; name it so")
    directory = checked_artifact_directory(args.directory)
    if args.fold or directory is not None and is_folded(directory):
        raise UtuneError(
            "--adapter-for writes the tuner tensors apart from the weights, folding merges them in; "
            "give the tuned artifact without --fold (not a folded one)"
        )
    status = Console(stderr=True)
    with status.status(f"loading {args.directory}"):
        result, module, _ = load_for_inference(args.directory, model=args.base_model)
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    with status.status(f"writing {args.output} and checking it in ONNX Runtime with {args.adapter_for}"):
        adapter = export_adapter(module, result.example_inputs, args.output, args.adapter_for, tuner_names=names)
    if args.json:
        print_json(_adapter_report(adapter))
        return 0
    print(
        f"wrote {adapter.path} ({adapter.tensors} tuner tensors, {adapter.size_bytes / 2**20:.2f} MiB) for {args.adapter_for}"
    )
    for line in parity_lines(adapter.parity, "with it active: "):
        print(line)
    return 0

"""The deployment commands of cli.py: parse, call the library, print.

python cli.py fold DIR -o OUT                  folded artifact + report (fold/)
python cli.py export DIR -o model.onnx [--fold] [--opset N] [--tuners-as-inputs]
                                               ONNX file, verified in ONNX Runtime (export/); with tuner
                                               inputs also model.onnx_adapter (cli_adapters.py)
python cli.py export DIR --adapter-for model.onnx -o task.onnx_adapter   DIR's tuners for a shared model
python cli.py bench DIR [--batch-sizes 1,32]   latency and throughput of four variants (bench.py)
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from utune_fx.cli_support import add_output_flags, print_json
from utune_fx.errors import UtuneError


def _fold(args: argparse.Namespace) -> int:
    from utune_fx.fold.artifact import fold_artifact, save_folded
    from utune_fx.fold.report import render_fold
    from utune_fx.train.session import checked_artifact_directory

    directory = checked_artifact_directory(args.directory)
    if directory is None:
        raise UtuneError(f"{args.directory}: no tuned artifact here; write one with cli.py rewrite or train")
    with Console(stderr=True).status(f"folding {directory}"):
        result, folded, difference = fold_artifact(directory, model=args.base_model)
    run = _run_record(args.directory, directory)  # before anything is written: a damaged run stops here
    out = save_folded(directory, folded, difference, args.output)
    _fold_report(out, result, folded, difference, run)
    if args.json:
        print_json({"entries": folded.to_json(), "relative_difference": difference, "warnings": folded.warnings})
    else:
        tuned_elements = sum(t.numel() for t in result.module.state_dict().values())
        render_fold(folded, difference, tuned_elements, Console(width=max(Console().width, 120)))
        for warning in folded.warnings:  # a check that passed but says nothing
            print(f"warning: {warning}")
        print(f"wrote {out}/ (folded.safetensors, fold.json, report.html, and the tuned artifact it came from)")
    return 0


def _run_record(source, directory) -> dict:
    """What the fold page shows of the run: its curves and summary (a run directory, or an artifact, someone
    may have sent: checked data) and the manifest's recorded rule files (not the scratch copies load_tuned
    read)."""
    from pathlib import Path

    from utune_fx.report_data import read_history
    from utune_fx.rewrite.manifest import read_manifest
    from utune_fx.schemas import read_json
    from utune_fx.train.rundir import METRICS, SUMMARY

    summary = Path(source) / SUMMARY
    return {
        "history": read_history(Path(source) / METRICS),
        "summary": read_json(summary, "summary") if summary.is_file() else None,
        "manifest": read_manifest(Path(directory)),
    }


def _fold_report(out, result, folded, difference: float, run: dict) -> None:
    """OUT/report.html: the tuned model's page with each tuner's fold status (and the curves of a training run)."""
    from pathlib import Path

    from utune_fx.report_data import collect
    from utune_fx.report_html import write_report

    data = collect(
        result.module,
        result.base_model,
        name=result.source.model,
        kind="fold",
        result=result,
        fold_entries=folded.to_json(),
        fold_difference=difference,
        **run,
    )
    write_report(Path(out) / "report.html", data)


def _export(args: argparse.Namespace) -> int:
    if getattr(args, "format", "onnx") == "peft":  # a PEFT adapter directory instead of an ONNX file (cli_peft.py)
        from utune_fx.cli_peft import export_peft_command

        return export_peft_command(args)
    from utune_fx.cli_adapters import parity_lines, task_adapter, tuned_with_initial
    from utune_fx.export import export_onnx
    from utune_fx.fold.artifact import is_folded, load_for_inference
    from utune_fx.train.session import checked_artifact_directory

    if args.adapter_for:
        from utune_fx.cli_adapters import export_adapter_for

        return export_adapter_for(args)
    directory = checked_artifact_directory(args.directory)
    if args.tuners_as_inputs and (args.fold or directory is not None and is_folded(directory)):
        raise UtuneError(
            "--tuners-as-inputs keeps the tuner tensors apart from the weights, folding merges them "
            "in; export the tuned artifact without --fold (not a folded one)"
        )
    status = Console(stderr=True)
    with status.status(f"loading {args.directory}"):
        if args.tuners_as_inputs:  # the tuner inputs default to their initial values: the base model
            result, module, folded = tuned_with_initial(args.directory, args.base_model)
        else:
            result, module, folded = load_for_inference(args.directory, args.fold, model=args.base_model)
    names = [name for name, p in result.module.named_parameters() if p.requires_grad] if args.tuners_as_inputs else []
    with status.status(f"exporting to {args.output} (opset {args.opset}) and checking it in ONNX Runtime"):
        exported = export_onnx(
            module,
            result.example_inputs,
            args.output,
            opset=args.opset,
            exporter=args.exporter,
            tuner_names=names,
            tuner_defaults=getattr(result, "initial_tensors", None),
        )
    adapter, adapter_lines = task_adapter(result, exported) if names else ({}, [])
    report = {
        "path": str(exported.path),
        "exporter": exported.exporter,
        "opset": exported.opset,
        "folded": folded is not None,
        "inputs": exported.input_names,
        "outputs": exported.output_names,
        "tuner_inputs": len(exported.tuner_inputs),
        "external_data": exported.external_data,
        "size_bytes": exported.size_bytes,
        "fallback": exported.fallback_reason,
        "provider": exported.parity.provider,
        "dynamic_axes": exported.dynamic_axes,
        "sequence_fixed": exported.sequence_fixed,
        "parity": [vars(check) for check in exported.parity.checks],
        "warnings": exported.parity.warnings,
    } | adapter
    if args.json:
        print_json(report)
        return 0
    kind = f"folded ({folded.count('folded')} tuners merged, {folded.count('kept')} kept)" if folded else "tuned"
    axes = sorted({name for axis in exported.dynamic_axes.values() for name in axis.values()})
    axes = [", ".join(axes[:-1]), axes[-1]] if len(axes) > 1 else axes
    print(
        f"exported the {kind} model with the {exported.exporter} exporter, opset {exported.opset}, "
        f"dynamic {' and '.join(axes) or 'nothing'}: "
        f"{exported.path} ({exported.size_bytes / 2**20:.1f} MiB"
        + (", external data" if exported.external_data else "")
        + ")"
    )
    if exported.fallback_reason:
        print(f"  fell back: {exported.fallback_reason}")
    if exported.sequence_fixed:
        print(f"  sequence length fixed at the example's: {exported.sequence_fixed}")
    for line in parity_lines(exported.parity, "fed the tuners: " if names else "") + adapter_lines:
        print(line)  # warnings: checks that passed but say nothing
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.table import Table

    from utune_fx.atomic import write_text
    from utune_fx.bench import benchmark, ratios
    from utune_fx.train.session import tuned_model

    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    if not batches or min(batches) < 1:
        raise UtuneError(f"--batch-sizes {args.batch_sizes!r}: give positive integers separated by commas, e.g. 1,32")
    with Console(stderr=True).status(f"loading {args.directory}"):
        result = tuned_model(args.directory, None, None, "auto", base_model=args.base_model)
    report = benchmark(result, batches, rounds=args.rounds, opset=args.opset) | {"artifact": str(args.directory)}
    report["ratios"] = ratios(report)
    out = Path(args.output)
    write_text(out, json.dumps(report, indent=1))
    if args.json:
        print_json(report)
        return 0
    table = Table(
        box=None,
        pad_edge=False,
        title=f"Inference, {report['torch_threads']} threads, "
        f"{report['provider']} for ONNX Runtime ({report['rounds']} interleaved rounds)",
        title_justify="left",
    )
    for column in ("variant", "batch", "median ms", "images/s", "x base eager"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in report["rows"]:
        table.add_row(
            row["variant"],
            str(row["batch"]),
            f"{row['median_ms']:.2f}",
            f"{row['images_per_s']:,.0f}",
            f"{row['vs_base']:.2f}",
        )
    Console(width=max(Console().width, 100)).print(table)
    print(f"wrote {out}")
    return 0


def add_base_model_flag(parser: argparse.ArgumentParser) -> None:
    """--model SPEC: the artifact's base model, required when its manifest records code (import or file spec)."""
    parser.add_argument(
        "--model",
        dest="base_model",
        metavar="SPEC",
        help="build the artifact's base model from SPEC instead of its manifest; required when the manifest "
        "names code (package.module:callable, file.py:callable), which an artifact alone never runs",
    )


def add_deploy_commands(commands: argparse._SubParsersAction) -> None:
    fold = commands.add_parser("fold", help="merge the tuners into the frozen weights where they are linear")
    fold.add_argument("directory", metavar="DIR", help="a tuned artifact (or a training run's OUT)")
    fold.add_argument("-o", "--output", required=True, metavar="OUT", help="directory for the folded artifact")
    add_base_model_flag(fold)
    add_output_flags(fold, "print the fold report as JSON")
    fold.set_defaults(run=_fold)

    export = commands.add_parser("export", help="export to ONNX and check it against PyTorch in ONNX Runtime")
    export.add_argument("directory", metavar="DIR", help="a tuned or folded artifact (or a training run's OUT)")
    export.add_argument("-o", "--output", required=True, metavar="MODEL.onnx", help="the ONNX file to write")
    export.add_argument("--fold", action="store_true", help="fold the tuners into the weights first")
    export.add_argument(
        "--format",
        choices=("onnx", "peft"),
        default="onnx",
        help="onnx (default), or peft: -o names a PEFT adapter directory (adapter_config.json, "
        "adapter_model.safetensors) for PeftModel.from_pretrained",
    )
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    export.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "torchscript"),
        default="auto",
        help="auto: torch's dynamo exporter, falling back to TorchScript (default)",
    )
    export.add_argument(
        "--tuners-as-inputs",
        action="store_true",
        help="tuner tensors become graph inputs: one file serves every task tuned with the same rules; "
        "also writes MODEL.onnx_adapter (this task's tuners, an ONNX Runtime adapter)",
    )
    export.add_argument(
        "--adapter-for",
        metavar="MODEL.onnx",
        help="write only DIR's tuners, as an ONNX Runtime adapter (-o TASK.onnx_adapter) for MODEL.onnx, "
        "exported with --tuners-as-inputs from the same base model and rules",
    )
    add_base_model_flag(export)
    add_output_flags(export, "print the export and parity report as JSON")
    export.set_defaults(run=_export)

    bench = commands.add_parser("bench", help="latency and throughput: base, tuned, folded, ONNX Runtime")
    bench.add_argument("directory", metavar="DIR", help="a tuned artifact (or a training run's OUT)")
    bench.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes (default 1,32)")
    bench.add_argument("--rounds", type=int, default=30, help="timed calls per variant and batch size (default 30)")
    bench.add_argument("--opset", type=int, default=18, help="ONNX opset of the exported model (default 18)")
    bench.add_argument("-o", "--output", default="bench.json", metavar="FILE", help="JSON report (default bench.json)")
    add_base_model_flag(bench)
    add_output_flags(bench, "print the report as JSON")
    bench.set_defaults(run=_bench)

"""PEFT adapters on the command line (utune_fx/peft_export.py and peft_import.py do the work).

python cli.py export DIR --format peft -o ADAPTER_DIR         adapter_config.json + adapter_model.safetensors,
                                                              checked with PeftModel.from_pretrained when
                                                              peft is installed
python cli.py import-peft ADAPTER_DIR [--model SPEC] -o OUT   a PEFT LoRA adapter as a tuned artifact
"""

from __future__ import annotations

import argparse

from rich.console import Console

from utune_fx.cli_support import add_output_flags, print_json
from utune_fx.errors import UtuneError


def export_peft_command(args: argparse.Namespace) -> int:
    """``export --format peft``: the tuned artifact's tuners as a PEFT adapter directory."""
    from utune_fx.peft_export import export_peft
    from utune_fx.train.session import checked_artifact_directory

    if args.fold or args.tuners_as_inputs:
        raise UtuneError(
            "--format peft writes the tuners apart from the base weights; drop --fold and --tuners-as-inputs"
        )
    directory = checked_artifact_directory(args.directory)
    if directory is None:
        raise UtuneError(f"{args.directory}: no tuned artifact here; write one with cli.py rewrite or train")
    with Console(stderr=True).status(f"writing {args.output} and loading it with PEFT"):
        report = export_peft(directory, args.output, model=args.base_model)
    if args.json:
        print_json(report)
        return 0
    saved = f", modules_to_save {', '.join(report['modules_to_save'])}" if report["modules_to_save"] else ""
    print(
        f"wrote {report['path']}/ (adapter_config.json, adapter_model.safetensors): {report['peft_type']} on "
        f"{len(report['modules'])} modules{saved}"
    )
    difference = report["peft_relative_difference"]
    if difference is None:
        print("  not checked: peft is not installed (pip install peft), so PeftModel.from_pretrained was not run")
    else:
        print(
            f"  PeftModel.from_pretrained(base model, {report['path']}) vs the tuned model: max relative "
            f"difference {difference:.1e} ok"
        )
    return 0


def _import_peft(args: argparse.Namespace) -> int:
    from utune_fx.peft_import import import_peft

    with Console(stderr=True).status(f"importing {args.adapter}"):
        report = import_peft(args.adapter, args.output, args.model, args.input_shape, args.frontend)
    if args.json:
        print_json(report)
        return 0
    rules = "; ".join(f"r = {r['rank']}, alpha = {r['alpha']:g} on {r['modules']}" for r in report["rules"])
    print(f"base model {report['model']}: LoRA on {len(report['modules'])} modules ({rules})")
    print(
        f"wrote {report['path']}/ (manifest.json, tuners.safetensors; rules: peft_lora.yaml): fold, export "
        "or train it like any tuned artifact"
    )
    return 0


def add_peft_commands(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser("import-peft", help="a PEFT LoRA adapter directory as a tuned artifact")
    command.add_argument(
        "adapter", metavar="ADAPTER_DIR", help="holds adapter_config.json and adapter_model.safetensors"
    )
    command.add_argument("-o", "--output", required=True, metavar="OUT", help="directory for the tuned artifact")
    command.add_argument(
        "--model",
        metavar="SPEC",
        help="the base model (timm:NAME, hf:MODEL_TYPE, card.json, package.module:callable, file.py:callable); "
        "default: adapter_config.json's base_model_name_or_path when it is a timm:, hf: or card spec",
    )
    command.add_argument(
        "--input-shape",
        action="append",
        metavar="SHAPE[:DTYPE]",
        help="example input shape, e.g. 2,3,224,224 or 2,16:int64; once per input",
    )
    command.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto", help="tracer (default auto)")
    add_output_flags(command, "print the import report as JSON")
    command.set_defaults(run=_import_peft)

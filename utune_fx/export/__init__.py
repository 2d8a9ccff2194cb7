"""ONNX export of tuned models, verified with ONNX Runtime.

    result = build_tuned(TunedSource(spec, [], "auto"), rule_sets)       # or load_tuned(DIR)
    export_onnx(result.module, result.example_inputs, "model.onnx")
        -> model.onnx (dynamic batch), checked, matched against PyTorch at batch 1 and 4 -> ExportResult

    export_onnx(..., tuner_names=[n for n, p in module.named_parameters() if p.requires_grad])
        -> one model.onnx whose tuner tensors are inputs; per task:
           session.run(None, {"x": images, **tuner_feeds("runs/task_a", "model.onnx")})

    export_onnx(..., tuner_names=names, tuner_defaults=initial)     the inputs default to ``initial`` when unfed
    export_adapter(task_b.module, inputs, "task_b.onnx_adapter", "model.onnx")   one task as an ONNX Runtime
        adapter: options = ort.RunOptions(); options.add_active_adapter(load_adapter("task_b.onnx_adapter"))

    verify_onnx("model.onnx", module, example_inputs, tuner_feeds=...) -> Parity, or a one-line UtuneError

Modules: exporters.py (dynamo and TorchScript exporters, which works where), onnx_export.py (writing,
external data, fallback, errors), verify.py (ONNX Runtime parity, tolerances), feeds.py (tuner tensors
from safetensors), adapters.py (tuner tensors as ONNX Runtime adapter files).
"""

from utune_fx.export.adapters import ADAPTER_SUFFIX, AdapterResult, adapter_path_for, export_adapter, load_adapter
from utune_fx.export.feeds import onnx_tuner_inputs, tuner_feeds
from utune_fx.export.onnx_export import ExportResult, export_onnx
from utune_fx.export.verify import (
    TOLERANCES,
    BatchParity,
    Parity,
    Tolerance,
    verify_onnx,
)

__all__ = [
    "ADAPTER_SUFFIX",
    "TOLERANCES",
    "AdapterResult",
    "BatchParity",
    "ExportResult",
    "Parity",
    "Tolerance",
    "adapter_path_for",
    "export_adapter",
    "export_onnx",
    "load_adapter",
    "onnx_tuner_inputs",
    "tuner_feeds",
    "verify_onnx",
]

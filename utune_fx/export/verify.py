"""ONNX Runtime against PyTorch, on fresh random inputs at several batch sizes.

    verify_onnx("model.onnx", module, example_inputs, batch_sizes=(1, 4))
        -> Parity(provider='CPUExecutionProvider', checks=[BatchParity(batch_size=1, max_abs_error=1.9e-06,
                  rel_error=7.1e-07, dtype='float32', rtol=1e-04, atol=1e-05, passed=True), ...])
        or UtuneError('model.onnx: ONNX Runtime (CPUExecutionProvider) differs from PyTorch at batch 4: ...')

Inputs have the shapes of ``example_inputs`` but for dim 0 of the batched ones (exporters.batched_inputs);
floats are standard normal, integer and bool inputs are drawn uniformly from the example's own range
[min, max], unbatched inputs are used as given; all from ``seed``. When the file declares axis 1 of the
token inputs (trace/sequence_axes.py) symbolic, every batch size is checked at the example's lengths and
again with ``extra_tokens`` more tokens on each token input (8 -> 13; a decoder's 5 -> 10); each
BatchParity records the lengths (``where``: "batch 4, length 13").

An output passes when every element does: |ort - torch| <= atol + rtol * max(|torch|, 0.1 * max |torch|)
(numpy.allclose's rule, with a floor at a tenth of the output's largest magnitude for elements near zero),
with (rtol, atol) from TOLERANCES by the PyTorch output's dtype (integer and bool outputs: exact).
Reported per batch size, worst over the outputs: the max abs error, and the relative error
||ort - torch||_2 / ||torch||_2 (norm-based: elementwise ratios explode at elements near zero).
A NaN or infinity in either side's floating outputs fails the check in one line (NaN against NaN is
no match); PyTorch outputs that are all zero pass but are flagged ``uninformative`` (Parity.warnings):
zeros against zeros say nothing about the model.

Tolerances, measured on CPU (ONNX Runtime 1.31, torch 2.13, both exporters, batch 1 and 4) with the
tuners set away from identity (normal(0, 0.05)):
  float32   ViT-Ti/16 and ViT-S/16, Swin-T, ResNet-50, ConvNeXt-T at 224 px (dual_utuner, vpt_shallow, lora,
            utuner_block) and the small test models: max abs error 1e-7 to 4.3e-6 on logits up to 4.9,
            relative error at most 1.3e-6, at most 0.33 of the allowed error: rtol 1e-4, atol 1e-5.
  float16   ViT-S/16 dual_utuner, Swin-T vpt_shallow, ResNet-50 lora, ConvNeXt-T utuner_block at 224 px
            and the small test models in half precision: max abs error up to 4.4e-3 (ViT-S/16), relative
            error at most 1.5e-3, at most 0.44 of the allowed error (PyTorch rounds every op's result to
            half; ONNX Runtime's CPU provider computes many ops in float32): rtol 1e-2, atol 1e-2.
  bfloat16  not measured: ONNX Runtime's CPU provider has no bfloat16 Conv, the first op of every image
            model here, so these graphs do not load. The float16 values scaled by the ratio of the two formats' epsilons (2^-7 / 2^-10 = 8):
            rtol 8e-2, atol 8e-2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from utune_fx.errors import UtuneError, first_line
from utune_fx.export.exporters import batched_inputs, eval_mode
from utune_fx.fold import all_zero, non_finite
from utune_fx.trace.sequence_axes import SEQUENCE_DIM, token_inputs

EXTRA_TOKENS = 5  # the second length verified: the example's plus these (8 tokens -> 13)


class ModuleFailure(UtuneError):
    """The PyTorch module itself rejects a batch size: no exporter can help."""


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


TOLERANCES = {
    torch.float32: Tolerance(rtol=1e-4, atol=1e-5),
    torch.float16: Tolerance(rtol=1e-2, atol=1e-2),
    torch.bfloat16: Tolerance(rtol=8e-2, atol=8e-2),  # scaled from float16, see above
}
EXACT = Tolerance(rtol=0.0, atol=0.0)  # integer and bool outputs


@dataclass
class BatchParity:
    batch_size: int
    max_abs_error: float
    rel_error: float  # ||ort - torch||_2 / ||torch||_2, worst output
    dtype: str  # of the output that came closest to failing; its tolerance follows
    rtol: float
    atol: float
    passed: bool
    uninformative: bool = False  # PyTorch's floating outputs are all zero: a pass that says nothing
    sequence_lengths: list[int] = field(default_factory=list)  # token inputs' distinct lengths; [] without any

    @property
    def where(self) -> str:
        """``batch 4`` or ``batch 4, length 13`` (``lengths 13/10`` for an encoder's and a decoder's)."""
        lengths = "/".join(map(str, self.sequence_lengths))
        label = "lengths" if len(self.sequence_lengths) > 1 else "length"
        return f"batch {self.batch_size}" + (f", {label} {lengths}" if lengths else "")


@dataclass
class Parity:
    path: Path
    provider: str
    checks: list[BatchParity]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def summary(self) -> str:
        parts = ", ".join(f"{c.where}: max abs {c.max_abs_error:.1e}, rel {c.rel_error:.1e}" for c in self.checks)
        return f"ONNX Runtime ({self.provider}) matches PyTorch ({parts})" + "".join(
            f"; warning: {w}" for w in self.warnings
        )

    @property
    def warnings(self) -> list[str]:
        zero = [check for check in self.checks if check.uninformative]
        if not zero:
            return []
        where = (
            "; ".join(check.where for check in zero)
            if any(check.sequence_lengths for check in zero)
            else "batch " + ", ".join(str(check.batch_size) for check in zero)
        )
        return [
            f"PyTorch's outputs are all zero at {where}, so the parity check compares zeros "
            "with zeros and says nothing about the model; check its weights (a zeroed classifier?)"
        ]


def providers() -> list[str]:
    """CUDA when both torch and ONNX Runtime can use it, else the CPU."""
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def random_inputs(
    examples: Sequence[torch.Tensor], batch: int, generator: torch.Generator, extra_tokens: int = 0
) -> list[torch.Tensor]:
    """Random inputs like ``examples`` at ``batch``, with ``extra_tokens`` more on each token input's axis 1."""
    inputs = []
    for example, is_batched, is_token in zip(examples, batched_inputs(examples), token_inputs(examples)):
        shape = [batch, *example.shape[1:]] if is_batched else list(example.shape)
        if is_token:
            shape[SEQUENCE_DIM] += extra_tokens
        if example.dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(example.dtype))
        else:  # token ids, masks: stay inside the values the model was shown
            low, high = (int(example.min()), int(example.max())) if example.numel() else (0, 0)
            inputs.append(torch.randint(low, high + 1, shape, generator=generator).to(example.dtype))
    return inputs


def _compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, float, Tolerance]:
    """(max abs error, norm-relative error, worst |error| / allowed error, tolerance); ratio <= 1 passes."""
    tolerance = TOLERANCES.get(want.dtype, EXACT) if want.dtype.is_floating_point else EXACT
    reference = want.detach().cpu().double().numpy()
    got = got.cpu().double().numpy()
    error = np.abs(got - reference)  # both finite: _check refused NaN and infinities before
    if not error.size:
        return 0.0, 0.0, 0.0, tolerance
    # rtol of each element's size, but never below rtol of the output's largest magnitude: an element
    # near zero carries the rounding of the large terms it was summed from (random-weight nets
    # reach magnitudes in the thousands, and every kernel rounds differently)
    allowed = tolerance.atol + tolerance.rtol * np.maximum(np.abs(reference), 0.1 * np.abs(reference).max())
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(error == 0, 0.0, error / allowed)
    relative = float(np.linalg.norm(error) / max(float(np.linalg.norm(reference)), np.finfo(np.float64).tiny))
    return float(error.max()), relative, float(np.nan_to_num(ratio, nan=np.inf).max()), tolerance


def ort_value(tensor: torch.Tensor | np.ndarray) -> ort.OrtValue:
    """numpy has no bfloat16: such tensors travel as their bits, typed for ONNX Runtime."""
    if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.bfloat16:
        bits = tensor.detach().cpu().contiguous().view(torch.int16).numpy()
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx.TensorProto.BFLOAT16)
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _check(path: Path, at: BatchParity, got: list[torch.Tensor], expected: list[torch.Tensor]) -> BatchParity:
    """``at``, with the figures of this comparison: it holds the batch size and lengths."""
    where = at.where
    if len(got) != len(expected):
        raise UtuneError(
            f"{path}: the ONNX model has {len(got)} output(s), the module {len(expected)}; "
            "verify against the module that was exported"
        )
    worst, worst_ratio = None, -1.0
    max_abs = rel = 0.0
    for index, (ours, theirs) in enumerate(zip(got, expected)):
        if tuple(ours.shape) != tuple(theirs.shape):
            raise UtuneError(
                f"{path}: output {index} at {where} has shape {list(ours.shape)} in ONNX Runtime, "
                f"{list(theirs.shape)} in PyTorch; the export fixed a size that should follow the batch or sequence"
            )
        for tensor, side in ((theirs, "PyTorch"), (ours, "ONNX Runtime")):
            problem = non_finite([tensor])
            if problem is not None:
                raise UtuneError(
                    f"{path}: {side}'s output {index} at {where} holds {problem}; parity cannot pass "
                    "on values that are not finite: a tuner setting or trained weight of the model (or the "
                    "export) is broken"
                )
        abs_error, rel_error, ratio, tolerance = _compare(ours, theirs)
        max_abs, rel = max(max_abs, abs_error), max(rel, rel_error)
        if ratio > worst_ratio:
            worst, worst_ratio = (str(theirs.dtype).removeprefix("torch."), tolerance), ratio
    dtype, tolerance = worst if worst else ("float32", TOLERANCES[torch.float32])
    return replace(
        at,
        max_abs_error=max_abs,
        rel_error=rel,
        dtype=dtype,
        rtol=tolerance.rtol,
        atol=tolerance.atol,
        passed=worst_ratio <= 1.0,
        uninformative=all_zero(expected),
    )


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; the CPU provider warns about unused initializers
    try:
        return ort.InferenceSession(str(path), options, providers=providers())
    except Exception as error:
        raise UtuneError(
            f"{path}: ONNX Runtime cannot load the model ({first_line(error)}); export it again, or with another opset"
        ) from error


def _outputs(module: nn.Module, inputs: list[torch.Tensor], where: str) -> list[torch.Tensor]:
    device = next(module.parameters(), torch.empty(0)).device
    try:
        with torch.no_grad():
            output = module(*(x.to(device) for x in inputs))
    except Exception as error:
        raise ModuleFailure(
            f"the PyTorch module fails at {where} ({first_line(error)}); it does not take "
            "every batch size or length: verify with sizes it accepts"
        ) from error
    return [leaf for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def verify_onnx(
    path: str | Path,
    module: nn.Module,
    example_inputs: Any,
    *,
    batch_sizes: Sequence[int] = (1, 4),
    tuner_feeds: dict[str, np.ndarray | torch.Tensor] | None = None,
    seed: int = 0,
    extra_tokens: int = EXTRA_TOKENS,
    adapter: str | Path | None = None,
) -> Parity:
    """Run ``path`` in ONNX Runtime and ``module`` in PyTorch on the same random inputs at each batch
    size, and where the file's token inputs have a dynamic sequence axis, at the example's lengths and
    at ``extra_tokens`` more; the Parity when every output matches, else a one-line UtuneError with
    the numbers. ``adapter``: an .onnx_adapter file made active in every run (RunOptions), so its
    tensors replace the tuner inputs' defaults (and any feeds of the same names)."""
    path = Path(path)
    examples = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    feeds = dict(tuner_feeds or {})
    session = _session(path)
    run_options = None
    if adapter is not None:
        from utune_fx.export.adapters import load_adapter

        loaded = load_adapter(adapter, path)  # RunOptions does not keep it alive: this name does
        run_options = ort.RunOptions()
        run_options.add_active_adapter(loaded)
    # tuner inputs with defaults (export_onnx's tuner_defaults) are overridable initializers, not inputs
    required = [i.name for i in session.get_inputs()]
    declared = required + [i.name for i in session.get_overridable_initializers()]
    unknown = [name for name in feeds if name not in declared]
    if unknown:
        raise UtuneError(
            f"{path}: tuner feed {unknown[0]} is not an input of the model; "
            "feed the tensors of the tuner names it was exported with"
        )
    data_names = [name for name in required if name not in feeds]
    if len(data_names) != len(examples):
        raise UtuneError(
            f"{path}: the model takes {len(data_names)} input(s) besides the tuner feeds "
            f"({', '.join(data_names[:3])}{', ...' if len(data_names) > 3 else ''}), example_inputs "
            f"has {len(examples)}; pass tuner_feeds (utune_fx.export.tuner_feeds) for a model "
            "exported with tuner inputs"
        )
    generator = torch.Generator().manual_seed(seed)
    tokens = token_inputs(examples)
    extras = (0, extra_tokens) if extra_tokens and _sequence_is_dynamic(session, data_names, tokens) else (0,)
    checks = []
    with eval_mode(module):
        for extra in extras:
            for batch in batch_sizes:
                inputs = random_inputs(examples, batch, generator, extra)
                lengths = list(dict.fromkeys(int(x.shape[SEQUENCE_DIM]) for x, t in zip(inputs, tokens) if t))
                at = BatchParity(batch, 0.0, 0.0, "", 0.0, 0.0, False, sequence_lengths=lengths)
                expected = _outputs(module, inputs, at.where)
                values = {name: ort_value(v) for name, v in {**dict(zip(data_names, inputs)), **feeds}.items()}
                try:
                    got = session.run_with_ort_values(None, values, run_options)
                except Exception as error:
                    raise UtuneError(
                        f"{path}: ONNX Runtime cannot run {at.where} ({first_line(error)}); the "
                        "exported graph may have fixed the example's batch size or length"
                    ) from error
                got = [torch.from_dlpack(v) for v in got]  # dlpack: bfloat16 too
                checks.append(_check(path, at, got, expected))
    parity = Parity(path, session.get_providers()[0], checks)
    for check in checks:
        if not check.passed:
            raise UtuneError(
                f"{path}: ONNX Runtime ({parity.provider}) differs from PyTorch at "
                f"{check.where}: max abs error {check.max_abs_error:.2e}, relative error "
                f"{check.rel_error:.2e} ({check.dtype} tolerance: rtol {check.rtol:.0e}, atol "
                f"{check.atol:.0e}); verify against the module that was exported, or export with "
                "the other exporter or another opset"
            )
    return parity


def _sequence_is_dynamic(session: ort.InferenceSession, data_names: list[str], tokens: list[bool]) -> bool:
    """Whether the file declares axis 1 of every token input symbolic (not a number)."""
    shapes = {i.name: i.shape for i in session.get_inputs()}
    token_shapes = [shapes[name] for name, is_token in zip(data_names, tokens) if is_token]
    return bool(token_shapes) and all(not isinstance(shape[SEQUENCE_DIM], int) for shape in token_shapes)

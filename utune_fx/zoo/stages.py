"""One model through the whole chain, stage by stage; the first failure ends the run.

    run_chain("convnext_atto") -> {"model": ..., "parameters": 3.7e6, "meta": False,
                                   "stages": {"build": 0.4, "trace": 1.1, ..., "parity": 2.0},  (seconds)
                                   "last_stage": "parity", "error": None, "found": {"attention": 0, ...}}

Stages: build (timm, pretrained=False, its smallest input size) -> trace -> match (the dual U-Tuner
and the LoRA rule files) -> rewrite (both) -> identity (the rewritten model computes the frozen
one's outputs) -> train (one forward/backward/SGD step; every tuner gets a gradient) -> fold (tuners
moved away from identity first; folded vs unfolded within FOLD_RTOL) -> export (ONNX) -> parity
(ONNX Runtime against PyTorch at two batch sizes). Models above META_PARAMETERS are built on the
meta device and stop after rewrite (``meta: true``), so the sweep stays within its time.
The worker (``python -m utune_fx.zoo.stages NAME``) prints the result as one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import utune_fx  # noqa: F401  (before timm)
from utune_fx.errors import UtuneError
from utune_fx.fold import floating_outputs, relative_difference

STAGES = ("build", "trace", "match", "rewrite", "identity", "train", "fold", "export", "parity")
META_STAGES = STAGES[:4]
META_PARAMETERS = 300_000_000
IDENTITY_RTOL = 1e-5  # tuners add exact zeros; CrossViT still lands at 1e-6 (not yet explained)
FOLD_RTOL = 1e-4  # float32, relative to the largest output; deep nets sum more rounding than the tests' 1e-5
RULES = Path(__file__).resolve().parents[2] / "rules"
RULE_FILES = ("dual_utuner", "lora")


class StageFailed(Exception):
    """A check of the chain did not hold (not an exception of the code under test)."""


def input_sizes(name: str) -> list[tuple[int, ...]]:
    """Input sizes to try, smallest first: the config's minimum, then its default."""
    import timm

    config = timm.models.get_pretrained_cfg(name)
    sizes = [getattr(config, "min_input_size", None), getattr(config, "input_size", None), (3, 224, 224)]
    return list(dict.fromkeys(tuple(size) for size in sizes if size))


def _accepted_size(model: torch.nn.Module, name: str, device: str) -> tuple[int, ...]:
    """The smallest size the model runs on (some refuse their config's minimum, e.g. fixed-size
    attention); the last candidate when none runs, so trace reports the model's own error."""
    candidates = input_sizes(name)
    for size in candidates[:-1]:
        try:
            with torch.no_grad():
                model(torch.randn(1, *size, device=device))
            return size
        except Exception:  # the next, larger size
            continue
    return candidates[-1]


def _build(name: str, record: dict):
    import timm

    with torch.device("meta"):
        parameters = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    record["parameters"] = parameters
    record["meta"] = parameters > META_PARAMETERS
    device = "meta" if record["meta"] else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = timm.create_model(name, pretrained=False).eval()
    size = _accepted_size(model, name, device)  # on the meta device too: shapes only
    record["input_size"] = list(size)
    return model, torch.randn(2, *size, device=device)


def _float64_outputs(module: torch.nn.Module, x: torch.Tensor):
    """The module's outputs computed in float64: what float32 rounding is measured against."""
    import copy

    from utune_fx.trace.annotate import set_training

    reference = copy.deepcopy(module).double()
    set_training(reference, False)
    with torch.no_grad():
        return reference(x.double())


def _float32_errors(tuned: torch.nn.Module, folded: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(unfolded float32 vs float64, folded float32 vs float64), relative: rounding or a real error."""
    exact = _float64_outputs(tuned, x)
    with torch.no_grad():
        return relative_difference(tuned(x), exact), relative_difference(folded(x), exact)


def _onnx_errors(path: Path, module: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(PyTorch float32 vs float64, ONNX Runtime vs float64), relative to the largest output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = [torch.from_numpy(a) for a in session.run(None, {session.get_inputs()[0].name: x.numpy()})]
    exact = _float64_outputs(module, x)
    with torch.no_grad():
        return relative_difference(module(x), exact), relative_difference(got, exact)


def _train_step(module: torch.nn.Module, x: torch.Tensor) -> None:
    from utune_fx.trace.annotate import set_training

    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    tuners = {name: p for name, p in trainable.items() if name.startswith("utune.")}
    set_training(module, True)
    try:
        # scale-free: random-weight networks give outputs in the thousands
        loss = sum(out.float().square().mean() / out.detach().float().square().mean().clamp_min(1e-12)
                   for out in floating_outputs(module(x)))
        loss.backward()
    finally:
        set_training(module, False)
    if not tuners:
        raise StageFailed("no tuner was inserted")
    stuck = [name for name, p in tuners.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    if stuck:
        raise StageFailed(f"{len(stuck)} tuner tensor(s) got no finite gradient, e.g. {stuck[0]}")
    with torch.no_grad():
        for p in trainable.values():
            if p.grad is not None:  # a small step of fixed length, whatever the gradient's scale
                p.sub_(1e-3 * p.grad / p.grad.norm().clamp_min(1e-12))
            p.grad = None


def run_chain(name: str) -> dict:
    from utune_fx.export import export_onnx, verify_onnx
    from utune_fx.fold import fold, folded_difference
    from utune_fx.match import load_rules, match_rules
    from utune_fx.rewrite import rewrite
    from utune_fx.trace import trace, trace_report

    record: dict = {"model": name, "stages": {}, "last_stage": None, "error": None, "found": {}}
    state: dict = {}

    def stage(label: str, work) -> bool:
        start = time.perf_counter()
        try:
            work()
        except Exception as error:  # recorded, the sweep goes on
            record["error"] = {"stage": label, "class": type(error).__name__,
                               "message": (str(error).strip().splitlines() or [""])[0][:300], "where": traceback.format_exc(limit=-2)[-600:]}
            return False
        record["stages"][label] = round(time.perf_counter() - start, 3)
        record["last_stage"] = label
        return True

    def build():
        state["model"], state["x"] = _build(name, record)

    def traced():
        state["gm"] = trace(state["model"], state["x"], name=f"timm:{name}")
        record["frontend"] = trace_report(state["gm"]).frontend
        with torch.no_grad():
            state["expected"] = state["gm"](state["x"]) if not record["meta"] else None

    def matched():
        state["rules"] = [load_rules(RULES / f"{rules}.yaml") for rules in RULE_FILES]
        for rules in state["rules"]:
            for found in match_rules(state["gm"], rules):
                record["found"][f"{found.rule.name}"] = len(found.regions)
        if not record["found"].get("mha") and not record["found"].get("ffn") and not record["found"].get("lora"):
            raise StageFailed("neither rule file found anything to tune (no attention, ffn, or lora layer)")

    def rewritten():
        state["result"] = rewrite(state["gm"], state["rules"])

    def identity():
        with torch.no_grad():
            difference = relative_difference(state["result"].module(state["x"]), state["expected"])
        record["identity_difference"] = difference
        if difference > IDENTITY_RTOL:
            raise StageFailed(f"the rewritten model differs from the frozen one at init by {difference:.1e}")

    def trained():
        _train_step(state["result"].module, state["x"])
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # away from identity, so fold and export are really exercised
            for n, p in state["result"].module.named_parameters():
                if n.startswith("utune."):
                    p.add_(torch.randn(p.shape, generator=generator) * 0.02)

    def folded():
        result = state["result"]
        state["folded"] = fold(result.module, result.summaries)
        record["folded"] = {status: state["folded"].count(status) for status in ("folded", "kept", "constant")}
        difference = folded_difference(result.module, state["folded"].module, (state["x"],))
        record["fold_difference"] = difference
        if difference <= FOLD_RTOL:
            return
        # deep random-weight nets amplify float32 rounding: compare both against float64
        noise, error = _float32_errors(result.module, state["folded"].module, state["x"])
        record["fold_float32_noise"] = noise
        if not error <= 4 * noise:
            raise StageFailed(f"folded and unfolded outputs differ by {difference:.1e} (relative), "
                              f"{error:.1e} from float64 against float32's own {noise:.1e}")

    def exported():
        state["scratch"] = tempfile.mkdtemp(prefix="utune_zoo_")
        exported = export_onnx(state["folded"].module, (state["x"],), Path(state["scratch"]) / "model.onnx",
                               verify=False)
        record["exporter"] = exported.exporter
        state["onnx"] = exported.path

    def parity():
        try:
            report = verify_onnx(state["onnx"], state["folded"].module, (state["x"],), batch_sizes=(1, 2))
            record["parity"] = max(check.max_abs_error for check in report.checks)
        except UtuneError:  # beyond the fixed tolerance: rounding of a deep net, or a real error?
            noise, error = _onnx_errors(state["onnx"], state["folded"].module, state["x"])
            record["parity_float32_noise"], record["parity_relative"] = noise, error
            if not error <= 4 * noise:
                raise
            record["parity"] = error

    steps = dict(zip(STAGES, (build, traced, matched, rewritten, identity, trained, folded, exported, parity)))
    for label, work in steps.items():
        if record.get("meta") and label not in META_STAGES:
            break
        if not stage(label, work):
            break
    if "scratch" in state:
        import shutil
        shutil.rmtree(state["scratch"], ignore_errors=True)
    return record


if __name__ == "__main__":
    torch.set_num_threads(1)  # two workers share the two cores
    print(json.dumps(run_chain(sys.argv[1])), flush=True)

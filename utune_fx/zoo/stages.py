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

Any module, not only timm's (the build stage then only records the given inputs' shapes):

    run_module_chain(nn.TransformerDecoder(...), (tgt, memory), "decoder", state=state)
        -> the same record; ``state`` receives the traced, rewritten and folded modules, the tuners'
           gradient norms after the train step and the tuned model's outputs away from identity
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
    x = torch.randn(2, *size, device=device)
    if not record["meta"]:
        redraw_zero_weights(model, record)
    return model, x


def redraw_zero_weights(model: torch.nn.Module, record: dict) -> None:
    """Some models zero-initialise a weight matrix: a classifier (timm's MLP-Mixer and Hiera,
    torchvision's ViT), whose all-zero output lets no check fail, or a mixture-of-experts router
    (transformers' AFMoE), whose equal scores leave top-k to break ties, which PyTorch and ONNX
    Runtime do differently. Every all-zero weight matrix gets random values, as after any training;
    the record names them."""
    with torch.no_grad():
        redrawn = [n for n, p in model.named_parameters() if p.dim() >= 2 and not p.count_nonzero()]
        for name in redrawn:
            torch.nn.init.normal_(model.get_parameter(name), std=0.02)
    if redrawn:
        record["zero_weights_redrawn"] = redrawn


def _float64_outputs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):
    """The module's outputs computed in float64 (floating inputs too; token ids stay integers): what
    float32 rounding is measured against."""
    import copy

    from utune_fx.trace.annotate import set_training

    reference = copy.deepcopy(module).double()
    set_training(reference, False)
    for graph_module in reference.modules():  # torch.export graphs cast and assert float32 by name
        if isinstance(graph_module, torch.fx.GraphModule):
            for node in graph_module.graph.nodes:
                node.args, node.kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), _float64_dtype)
            graph_module.recompile()
    with torch.no_grad():
        return reference(*(x.double() if x.is_floating_point() else x for x in inputs))


def _float64_dtype(argument):
    return torch.float64 if isinstance(argument, torch.dtype) and argument == torch.float32 else argument


def _float32_errors(
    tuned: torch.nn.Module, folded: torch.nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[float, float]:
    """(unfolded float32 vs float64, folded float32 vs float64), relative: rounding or a real error."""
    exact = _float64_outputs(tuned, inputs)
    with torch.no_grad():
        return relative_difference(tuned(*inputs), exact), relative_difference(folded(*inputs), exact)


def _onnx_errors(path: Path, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """(float32 noise, ONNX Runtime vs float64), relative to the largest output. The noise is the
    largest error of equally valid float32 evaluations: PyTorch's default kernels and, on images, its
    channels-last ones (ONNX Runtime's blocked-layout convs sum in yet another order; a random-init
    EfficientNetV2 amplifies that order 1e4 times, and channels-last shows it as much)."""
    import copy

    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    got = [torch.from_numpy(a) for a in session.run(None, feeds)]
    exact = _float64_outputs(module, inputs)
    with torch.no_grad():
        noise = relative_difference(module(*inputs), exact)
        if all(x.dim() == 4 for x in inputs if x.is_floating_point()):
            channels_last = copy.deepcopy(module).to(memory_format=torch.channels_last)
            moved = (x.to(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs)
            noise = max(noise, relative_difference(channels_last(*moved), exact))
        return noise, relative_difference(got, exact)


def _train_step(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """One forward/backward/SGD step; every tuner tensor must get a finite gradient. Returns the
    gradient norm of each tuner tensor (a zero-initialised up-projection leaves its down-projection's
    gradient at exactly zero in the first step: that is expected)."""
    from utune_fx.trace.annotate import set_training

    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    tuners = {name: p for name, p in trainable.items() if name.startswith("utune.")}
    set_training(module, True)
    try:
        # scale-free: random-weight networks give outputs in the thousands
        loss = sum(
            out.float().square().mean() / out.detach().float().square().mean().clamp_min(1e-12)
            for out in floating_outputs(module(*inputs))
        )
        loss.backward()
    finally:
        set_training(module, False)
    if not tuners:
        raise StageFailed("no tuner was inserted")
    stuck = [name for name, p in tuners.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    if stuck:
        raise StageFailed(f"{len(stuck)} tuner tensor(s) got no finite gradient, e.g. {stuck[0]}")
    norms = {name: float(p.grad.norm()) for name, p in tuners.items()}
    with torch.no_grad():
        for p in trainable.values():
            if p.grad is not None:  # a small step of fixed length, whatever the gradient's scale
                p.sub_(1e-3 * p.grad / p.grad.norm().clamp_min(1e-12))
            p.grad = None
    return norms


def run_chain(name: str, catalog: str = "timm", rule_files: tuple[str, ...] = RULE_FILES) -> dict:
    """A catalogue's model through the chain; the record as the module docstring shows. timm models
    are built with ``pretrained=False``; transformers and torchvision entries (zoo/catalogs.py) also
    bring their ground truth, which the match stage checks (zoo/truth.py) for the default rule files
    (its counts are the dual U-Tuner's and LoRA's regions)."""
    record: dict = {"model": name, "stages": {}, "last_stage": None, "error": None, "found": {}}
    if catalog != "timm":
        record["catalog"] = catalog

    def build(state: dict) -> None:
        if catalog == "timm":
            state["model"], x = _build(name, record)
            state["inputs"] = (x,)
            return
        from utune_fx.zoo.catalogs import build_entry
        from utune_fx.zoo.truth import structure

        state["model"], state["inputs"], expected = build_entry(catalog, name, record)
        if not record["meta"]:
            redraw_zero_weights(state["model"], record)
        if rule_files == RULE_FILES:
            state["expected_counts"] = expected
            record["truth"] = {"expected": expected}
            state["structure"] = structure(state["model"], state["inputs"])

    from utune_fx.zoo.catalogs import entry_spec

    return _run_stages(record, build, entry_spec(catalog, name), "auto", rule_files, {})


def run_module_chain(
    model: torch.nn.Module,
    example_inputs,
    name: str,
    *,
    frontend: str = "auto",
    rule_files: tuple[str, ...] = RULE_FILES,
    state: dict | None = None,
) -> dict:
    """``model`` on ``example_inputs`` (a tensor or a tuple: token ids, a decoder's memory, ...) through
    the chain; the same record as ``run_chain``, its build stage only records the input shapes.
    ``rule_files``: names in rules/, applied in order. ``state``, when given, receives the chain's
    objects: ``gm`` (traced), ``expected`` (its outputs), ``rules``, ``matches`` (rule name -> its
    match in the traced graph, before the rewrite), ``result`` (the rewrite),
    ``gradient_norms`` (per tuner tensor, from the train step), ``tuned_outputs`` (after the tuners were
    moved away from identity), ``folded``."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    record: dict = {"model": name, "stages": {}, "last_stage": None, "error": None, "found": {}}

    def build(state: dict) -> None:
        record["parameters"] = sum(p.numel() for p in model.parameters())
        record["meta"] = False
        record["input_shapes"] = [list(x.shape) for x in inputs]
        state["model"], state["inputs"] = model.eval(), inputs

    return _run_stages(record, build, name, frontend, rule_files, {} if state is None else state)


def _run_stages(record: dict, build_model, spec: str, frontend: str, rule_files: tuple[str, ...], state: dict) -> dict:
    from utune_fx.export import export_onnx, verify_onnx
    from utune_fx.fold import fold, folded_difference
    from utune_fx.match import load_rules, match_rules
    from utune_fx.rewrite import rewrite
    from utune_fx.trace import trace, trace_report
    from utune_fx.trace.annotate import node_info
    from utune_fx.zoo.truth import check

    def stage(label: str, work) -> bool:
        start = time.perf_counter()
        try:
            work()
        except Exception as error:  # recorded, the sweep goes on
            record["error"] = {
                "stage": label,
                "class": type(error).__name__,
                "message": (str(error).strip().splitlines() or [""])[0][:300],
                "where": traceback.format_exc(limit=-2)[-600:],
            }
            return False
        record["stages"][label] = round(time.perf_counter() - start, 3)
        record["last_stage"] = label
        return True

    def build():
        build_model(state)

    def traced():
        state["gm"] = trace(state["model"], state["inputs"], frontend=frontend, name=spec)
        record["frontend"] = trace_report(state["gm"]).frontend
        if trace_report(state["gm"]).sequence:  # token inputs: a dynamic sequence axis, or why it is fixed
            record["sequence"] = trace_report(state["gm"]).sequence.describe()
        with torch.no_grad():
            state["expected"] = state["gm"](*state["inputs"]) if not record["meta"] else None

    def matched():
        state["rules"] = [load_rules(rules) for rules in rule_files]  # shipped rule files by name, also in a wheel
        state["matches"] = {}
        for rules in state["rules"]:
            for found in match_rules(state["gm"], rules):
                record["found"][f"{found.rule.name}"] = len(found.regions)
                state["matches"][found.rule.name] = found
        if not any(count for rule, count in record["found"].items() if rule != "classifier"):
            raise StageFailed("neither rule file found anything to tune but the classifier")
        record["placed"] = {  # which rule placed each tuner: the module scope of every region
            rule: [node_info(region.anchor).scope for region in found.regions]
            for rule, found in state["matches"].items()
        }
        if "expected_counts" in state:
            truth = check(state["expected_counts"], state["structure"], state["matches"])
            record["truth"]["found"] = truth["found"]
            if truth["problems"]:
                raise StageFailed("; ".join(truth["problems"]))

    def rewritten():
        state["result"] = rewrite(state["gm"], state["rules"])

    def identity():
        with torch.no_grad():
            difference = relative_difference(state["result"].module(*state["inputs"]), state["expected"])
        record["identity_difference"] = difference
        if difference > IDENTITY_RTOL:
            raise StageFailed(f"the rewritten model differs from the frozen one at init by {difference:.1e}")

    def trained():
        state["gradient_norms"] = _train_step(state["result"].module, state["inputs"])
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # away from identity, so fold and export are really exercised
            for n, p in state["result"].module.named_parameters():
                if n.startswith("utune."):
                    p.add_(torch.randn(p.shape, generator=generator) * 0.02)
            state["tuned_outputs"] = state["result"].module(*state["inputs"])

    def folded():
        result = state["result"]
        state["folded"] = fold(result.module, result.summaries)
        record["folded"] = {status: state["folded"].count(status) for status in ("folded", "kept", "constant")}
        difference = folded_difference(result.module, state["folded"].module, state["inputs"])
        record["fold_difference"] = difference
        if difference <= FOLD_RTOL:
            return
        # deep random-weight nets amplify float32 rounding: compare both against float64
        noise, error = _float32_errors(result.module, state["folded"].module, state["inputs"])
        record["fold_float32_noise"] = noise
        if not error <= 4 * noise:
            raise StageFailed(
                f"folded and unfolded outputs differ by {difference:.1e} (relative), "
                f"{error:.1e} from float64 against float32's own {noise:.1e}"
            )

    def exported():
        state["scratch"] = tempfile.mkdtemp(prefix="utune_zoo_")
        exported = export_onnx(
            state["folded"].module, state["inputs"], Path(state["scratch"]) / "model.onnx", verify=False
        )
        record["exporter"] = exported.exporter
        state["onnx"] = exported.path

    def parity():
        try:
            report = verify_onnx(state["onnx"], state["folded"].module, state["inputs"], batch_sizes=(1, 2))
            record["parity"] = max(check.max_abs_error for check in report.checks)
        except UtuneError as failure:  # beyond the fixed tolerance: rounding of a deep net, or a real error?
            if "differs from PyTorch" not in str(failure):  # a batch size or length it cannot run: no rounding
                raise
            noise, error = _onnx_errors(state["onnx"], state["folded"].module, state["inputs"])
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
    rule_files = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else RULE_FILES
    print(json.dumps(run_chain(sys.argv[1], sys.argv[2], rule_files)), flush=True)

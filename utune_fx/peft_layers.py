"""The layers PEFT wraps, and a rewritten model's tuners as PEFT would hold them (what export and
import share).

What maps (PEFT's names, saved without the adapter name, under ``base_model.model.<module path>``):

    utune_fx                                   PEFT
    lora on nn.Linear, transformers' Conv1D    LoRA lora_A.weight [r, in], lora_B.weight [out, r]
      nn.Conv1d/2d/3d (groups 1, dilation 1)        (conv: A with the conv's kernel, B 1x1), alpha / r
      nn.Embedding                             LoRA lora_embedding_A = A.T [r, V], lora_embedding_B [D, r]
    scale_shift, shift off (or zero):          IA3 ia3_l = 1 + g
      right after a Linear/Conv1D/Conv2d/3d         on that module ([out, 1]; a conv's [1, out, 1, 1])
      on the one input of a Linear                  on that Linear, feedforward_modules ([1, in])
    head / full training whole modules         modules_to_save (their state dicts)

A tuner must sit on a named module whose forward is the layer itself (its class's own forward,
or a subclass that keeps it): a functional op, a region of several ops, adapters, prompts,
prefixes, bypass ladders, BitFit (biases of some layers: PEFT trains all or none) and LoRA
on a grouped or dilated conv (PEFT's A has neither) are refused in one line naming the tuner.
Export (peft_export.py) writes these sites; import (peft_import.py) rewrites a model with LoRA on
the adapter's modules and finds its branches here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from utune_fx.errors import UtuneError
from utune_fx.fold import _wiring
from utune_fx.fold.layers import channel_axis, fold_target, layer_behind, layer_uses
from utune_fx.match.sizes import layer_input
from utune_fx.rewrite.attention_sites import TUNER_META
from utune_fx.trace import node_info
from utune_fx.tuners.lora import LoraBranch
from utune_fx.tuners.scale_shift import ScaleShift

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or broken: no Conv1D to find
        return None
    return Conv1D


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d_hf' (transformers' Conv1D, W [in, out]), 'conv' or 'embedding' for a module
    whose forward is that layer's own, as PEFT wraps it; None for anything else."""
    conv1d = _conv1d_class()
    forward = type(module).forward
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:
        return "linear"
    if conv1d is not None and isinstance(module, conv1d) and forward is conv1d.forward:
        return "conv1d_hf"
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(module, conv) and forward is conv.forward:
            return "conv"
    if isinstance(module, nn.Embedding) and forward is nn.Embedding.forward:
        return "embedding"
    return None


def layer_features(module: nn.Module, kind: str) -> tuple[int, int]:
    """(in, out) features: a linear's, a conv's channels, an embedding's (rows, dim)."""
    if kind == "linear":
        return module.in_features, module.out_features
    if kind == "conv1d_hf":
        return module.weight.shape[0], module.weight.shape[1]
    if kind == "conv":
        return module.in_channels, module.out_channels
    return module.num_embeddings, module.embedding_dim


@dataclass
class PeftSite:
    """One tuner as PEFT holds it: on ``module`` (its path in the base model)."""

    tuner: str  # utune.<rule>.<index>
    rule: str
    peft_type: str  # LORA | IA3
    module: str
    layer: nn.Module
    kind: str  # layer_kind
    branch: nn.Module  # the LoraBranch or ScaleShift
    feedforward: bool = False  # IA3 on the layer's input


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.numel() == b.numel()


def _named_layer(result, node: fx.Node, uses: Counter) -> tuple[str, nn.Module, str] | str:
    """(module path, module, layer_kind) of the base model's module that computes ``node``, or why not."""
    target = fold_target(node, result.module, uses)
    if target.layer is None:
        return target.reason
    path = str(node.target) if node.op == "call_module" else node_info(node).scope
    base = result.base_model if result.base_model is not None else result.module
    try:
        module = base.get_submodule(path) if path else None
    except AttributeError:
        module = None
    if module is None:
        return f"{node.name} is no named module of the model (PEFT wraps modules)"
    kind = layer_kind(module)
    if kind is None:
        return (
            f"{path} is a {type(module).__name__}; PEFT wraps nn.Linear, transformers' Conv1D, "
            "nn.Conv1d/2d/3d and nn.Embedding whose forward is the layer's own"
        )
    if not _same_storage(target.layer.weight, module.weight):
        return f"{node.name} computes with another weight than {path}.weight, so no module of the model is the layer"
    return path, module, kind


def _lora_site(result, call: fx.Node, branch: LoraBranch, uses: Counter) -> PeftSite | str:
    wiring = _wiring(call)
    if wiring is None or wiring.update is not wiring.call:
        return "its output is not added to one layer's output"
    layer_node = layer_behind(wiring.writes)
    if layer_node is not wiring.writes or not call.args or call.args[0] is not layer_input(layer_node):
        return "it does not read the input of the layer it adds to"
    found = _named_layer(result, layer_node, uses)
    if isinstance(found, str):
        return found
    path, module, kind = found
    if kind == "conv":
        if module.groups != 1 or branch.lora_A.groups != 1:
            return f"{path} is a grouped conv ({module.groups} groups); PEFT's LoRA A on a conv is not grouped"
        if any(d != 1 for d in module.dilation):
            return f"{path} is dilated ({module.dilation}); PEFT's LoRA A on a conv is not"
        if module.transposed:
            return f"{path} is a transposed conv, which PEFT's LoRA does not wrap"
    tag = call.meta[TUNER_META]
    return PeftSite(str(call.target), tag["rule"], "LORA", path, module, kind, branch)


def _readers(node: fx.Node) -> list[fx.Node]:
    """The nodes reading ``node``, looking through inference no-ops (dropout, identity)."""
    readers = []
    for user in node.users:
        info = node_info(user)
        if info.op_kind in ("identity", "dropout") and len(user.all_input_nodes) == 1:
            readers.extend(_readers(user))
        else:
            readers.append(user)
    return readers


def _ia3_site(result, call: fx.Node, tuner: ScaleShift, uses: Counter) -> PeftSite | str:
    if tuner.shift is not None and bool(tuner.shift.detach().any()):
        return "its shift is not zero, and IA3 only scales (rewrite it with settings: {shift: false})"
    wiring = _wiring(call)
    if wiring is None or wiring.update is not wiring.call or call.meta[TUNER_META]["position"] != "sequential":
        return "it does not scale one tensor in place"
    tag = call.meta[TUNER_META]
    layer_node = layer_behind(wiring.writes)
    found = _named_layer(result, layer_node, uses)
    if not isinstance(found, str):  # right after the layer: IA3 scales its output
        path, module, kind = found
        if kind == "embedding" or kind == "conv" and isinstance(module, nn.Conv1d):
            return f"{path} is a {type(module).__name__}, which PEFT's IA3 does not wrap"
        if channel_axis(fold_target(layer_node, result.module, uses).layer, layer_node) != tuner.axis:
            return f"it scales another axis than the channels of {path}"
        return PeftSite(str(call.target), tag["rule"], "IA3", path, module, kind, tuner)
    readers = _readers(wiring.total)
    if len(readers) == 1 and node_info(readers[0]).op_kind == "linear":  # IA3 on the input of one linear
        reader = readers[0]
        found_reader = _named_layer(result, reader, uses)
        if isinstance(found_reader, str):
            return found_reader
        path, module, kind = found_reader
        if kind not in ("linear", "conv1d_hf") or tuner.axis != -1:
            return f"it scales the input of {path}, which PEFT's feedforward IA3 does only for linear layers"
        return PeftSite(str(call.target), tag["rule"], "IA3", path, module, kind, tuner, feedforward=True)
    return f"{found}; nor is its output read by one linear module alone (IA3's feedforward form)"


def peft_sites(result) -> tuple[list[PeftSite], list[str]]:
    """Every tuner of a rewritten model as PEFT would hold it, and the tensors of whole modules that
    rules train (head, full): (sites, module paths for modules_to_save). A tuner PEFT cannot express
    is a UtuneError naming it and why."""
    gm = result.module
    uses = layer_uses(gm.graph)
    sites: list[PeftSite] = []
    for call in gm.graph.nodes:
        if call.op != "call_module" or TUNER_META not in call.meta or not str(call.target).startswith("utune."):
            continue
        tag, tuner = call.meta[TUNER_META], gm.get_submodule(str(call.target))
        if isinstance(tuner, LoraBranch):
            site = _lora_site(result, call, tuner, uses)
        elif isinstance(tuner, ScaleShift):
            site = _ia3_site(result, call, tuner, uses)
        else:
            site = (
                f"a {tag['tuner']} tuner at the {tag['position']} position has no PEFT counterpart here "
                "(PEFT adapters hold LoRA and IA3 on named layers)"
            )
        if isinstance(site, str):
            raise _refusal(tag["rule"], tag["tuner"], str(call.target), site)
        sites.append(site)
    if sites and any(s.peft_type == "LORA" for s in sites) and any(s.peft_type == "IA3" for s in sites):
        raise UtuneError(
            "the artifact holds LoRA and scale_shift (IA3) tuners; a PEFT adapter is of one type: "
            "tune with one of them, or export two artifacts"
        )
    return sites, _whole_modules(result)


def _refusal(rule: str, tuner: str, where: str, why: str) -> UtuneError:
    return UtuneError(f"rule '{rule}': the {tuner} tuner {where} cannot be a PEFT adapter: {why}")


def _whole_modules(result) -> list[str]:
    """Module paths whose parameters the rules train, all of them (PEFT's modules_to_save)."""
    base = result.base_model if result.base_model is not None else result.module
    trained = [p for name, p in result.module.named_parameters() if p.requires_grad and not name.startswith("utune.")]
    if not trained:
        return []
    by_storage = {p.untyped_storage().data_ptr(): name for name, p in base.named_parameters()}
    names = []
    for parameter in trained:
        name = by_storage.get(parameter.untyped_storage().data_ptr())
        if name is None:
            summary = next((s for s in result.summaries if s.position == "none"), None)
            raise _refusal(
                summary.rule if summary else "?",
                summary.tuner if summary else "?",
                "",
                "it trains a parameter the base model does not have (a re-sized classifier: give the model "
                "spec the number of classes, e.g. ?num_classes=10, instead of the rule's num_classes)",
            )
        names.append(name)
    trained_names, modules = set(names), []
    for name in sorted(trained_names):
        path = name.rpartition(".")[0]
        if not _all_trained(base, path, trained_names):
            rule = next((s for s in result.summaries if s.position == "none"), None)
            raise _refusal(
                rule.rule if rule else "?",
                rule.tuner if rule else "?",
                "",
                f"it trains {name} but not every parameter of {path or 'the model'}; PEFT trains whole "
                "modules (modules_to_save) or every bias",
            )
        while "." in path and _all_trained(base, path.rpartition(".")[0], trained_names):
            path = path.rpartition(".")[0]  # the largest enclosing module whose parameters all train
        if path not in modules:
            modules.append(path)
    return modules


def _all_trained(base: nn.Module, path: str, trained: set[str]) -> bool:
    module = base.get_submodule(path)
    prefix = f"{path}." if path else ""
    return all(f"{prefix}{name}" in trained for name, _ in module.named_parameters())


def plain_number(value: float) -> float | int:
    """An integral float as an int (alpha 16.0 is written 16), any other as a float."""
    return int(value) if float(value).is_integer() else float(value)

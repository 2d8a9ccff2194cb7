"""Ground truth for the zoo: how many attentions (self, cross) and FFNs a model has, and which linear
layers are its attention projections, from its config and its eager modules, never from the matcher.

    structure(model, inputs) -> Structure(attentions={"encoder.layer.0.attention": "self", ...},
                                          executions={"self": 2, "cross": 0},
                                          projections={"encoder.layer.0.attention.self.query", ...})
    check(expected, structure, matches) -> {"found": {"self_attention": 2, ...}, "problems": [...]}

The structural rule, general for any model (no per-model lists):

- an attention is the outermost module whose class name ends in ``Attention`` (optionally followed by
  a version: ``ShiftedWindowAttentionV2``): BertAttention (holding BertSelfAttention and its output
  projection), T5LayerSelfAttention, GPT2Attention, nn.MultiheadAttention, torchvision's
  ShiftedWindowAttention; SigLIP's pooling head (``...AttentionPoolingHead``) is not one, the
  nn.MultiheadAttention inside it is;
- its projections are the modules inside it that own a weight matrix (nn.Linear, transformers'
  Conv1D, I-BERT's QuantLinear, a relative-bias module's own bank; never an embedding) or convs that mix channels (not depthwise), and the attention
  module itself for weights it owns directly (nn.MultiheadAttention's packed in_proj_weight,
  torchvision Swin's functional call of its qkv weight);
- one run of the eager model, with hooks, counts each attention's executions (ALBERT runs one
  layer's modules 12 times) and tells self from cross: a cross-attention's projection reads a tensor
  argument of the attention other than its first (``key_value_states``, ``encoder_hidden_states``),
  or, where it calls no projection module (nn.MultiheadAttention), its key is not its query; a
  tensor counts as another sequence when its shape but the feature axis differs from the first
  argument's (the catalogues give a decoder 5 tokens and its encoder 8, so cross-attention is seen;
  MobileBERT's bottlenecked query and key stay self-attention).

The matcher's regions are then placed by the module scope of their anchor: a "mha" region inside a
self- or cross-attention module, an "ffn" region anywhere, a LoRA region on a projection or not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

ATTENTION_CLASS = re.compile(r"Attention(V?\d+)?$")
COUNTS = ("self_attention", "cross_attention", "ffn")


@dataclass
class Structure:
    attentions: dict[str, str] = field(default_factory=dict)  # path -> "self" | "cross"
    executions: dict[str, int] = field(default_factory=dict)  # "self" / "cross" -> runs in one forward
    projections: set[str] = field(default_factory=set)

    def counts(self) -> dict[str, int]:
        return {"self_attention": self.executions.get("self", 0), "cross_attention": self.executions.get("cross", 0)}


def _is_projection(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D (addmm), any other module that owns a weight matrix (I-BERT's
    QuantLinear; Inkling's relative-logits bank `proj`, a matmul inside the attention's relative-bias module),
    or a conv that mixes channels (a 1x1 qkv conv; Zaya's per-head grouped conv); never an embedding table,
    nor a depthwise conv (Inkling's short convolutions mix positions only)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.groups < module.in_channels
    owns_matrix = any(p.dim() == 2 for p in module.parameters(recurse=False))
    return isinstance(module, nn.Linear) or (owns_matrix and not isinstance(module, nn.Embedding))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if ATTENTION_CLASS.search(type(module).__name__) and not any(path.startswith(f"{p}.") for p in found):
            found.setdefault(path, module)
    return found


def structure(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Structure:
    """The attentions, their kinds and executions, and the projections (see the module docstring)."""
    attentions = attention_modules(model)
    result = Structure()
    runs: list[dict] = []  # the attention executions in progress, innermost last
    handles = []

    def key(tensor) -> tuple | None:
        return (tensor.data_ptr(), tuple(tensor.shape)) if isinstance(tensor, torch.Tensor) else None

    def enter(path: str):
        def hook(module, args, kwargs):
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            others = {key(t) for t in tensors[1:] if _positions(t) != _positions(tensors[0])}
            # projections not called as modules (nn.MultiheadAttention): cross when its key is not its query
            packed = len(tensors) >= 2 and _positions(tensors[1]) != _positions(tensors[0])
            runs.append({"path": path, "others": others, "packed": packed, "called": False, "cross": False})

        return hook

    def leave(module, args, output):
        run = runs.pop()
        kind = "cross" if (run["cross"] if run["called"] else run["packed"]) else "self"
        result.attentions.setdefault(run["path"], kind)
        result.executions[kind] = result.executions.get(kind, 0) + 1

    def read(module, args):
        if runs:
            runs[-1]["called"] = True
            runs[-1]["cross"] |= bool(args) and key(args[0]) in runs[-1]["others"]

    for path, module in attentions.items():
        handles.append(module.register_forward_pre_hook(enter(path), with_kwargs=True))
        handles.append(module.register_forward_hook(leave))
        result.projections.add(path)
        for inner, child in module.named_modules(prefix=path):
            if child is not module and _is_projection(child):  # its own weights: `packed` tells cross
                result.projections.add(inner)
                handles.append(child.register_forward_pre_hook(read))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return result


def _positions(tensor: torch.Tensor) -> tuple[int, ...]:
    """All but the feature axis: (batch, tokens) for a token sequence."""
    return tuple(tensor.shape[:-1])


def _attention_of(scope: str, attentions: dict[str, str]) -> str | None:
    for path in attentions:
        if scope == path or scope.startswith(f"{path}.") or not path:
            return path
    return None


def check(expected: dict[str, int], found_structure: Structure, matches: dict) -> dict:
    """What the matcher found, placed by the structure, and every way it differs from ``expected``.
    ``matches``: rule name -> RuleMatch (rules/dual_utuner.yaml's mha and ffn, rules/lora.yaml's LoRA)."""
    from utune_fx.trace.annotate import node_info

    attentions = found_structure.attentions
    found = {name: 0 for name in (*COUNTS, "attention_elsewhere", "lora_on_projections", "lora_elsewhere")}
    elsewhere: list[str] = []
    for name, match in matches.items():
        for region in match.regions:
            scope = node_info(region.anchor).scope
            if name == "mha":
                path = _attention_of(scope, attentions)
                found[f"{attentions[path]}_attention" if path is not None else "attention_elsewhere"] += 1
            elif name == "ffn":
                found["ffn"] += 1
            elif match.rule.tuner == "lora" and name != "classifier":
                on_projection = scope in found_structure.projections
                found["lora_on_projections" if on_projection else "lora_elsewhere"] += 1
                if not on_projection:
                    elsewhere.append(scope or "(model)")
    problems = []
    structural = found_structure.counts()
    for count, number in structural.items():
        if number != expected[count]:
            problems.append(f"the config says {expected[count]} {count}, the model's modules run {number}")
    differing = [c for c in COUNTS if found[c] != expected[c]]
    if differing or found["attention_elsewhere"]:
        problems.append(
            "expected "
            + ", ".join(f"{expected[c]} {c}" for c in COUNTS)
            + "; found "
            + ", ".join(f"{found[c]} {c}" for c in COUNTS)
            + (
                f" and {found['attention_elsewhere']} attention outside any attention module"
                * bool(found["attention_elsewhere"])
            )
        )
    if elsewhere and expected["self_attention"] + expected["cross_attention"]:
        problems.append(f"LoRA on {len(elsewhere)} layer(s) outside the attention projections, e.g. {elsewhere[0]}")
    return {"found": found, "problems": problems}

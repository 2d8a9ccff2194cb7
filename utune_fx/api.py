"""The Python API: tune a model in place, save and load its tuners, fold them, count what trains.

    model = utune_fx.tune(model, "lora")             # the same object, tuners inside, the rest frozen
    utune_fx.print_trainable_parameters(model)       # trainable params: 6,144 || all params: ... || 0.19%
    ... train it: a plain loop, Hugging Face Trainer, model.generate(...) ...
    utune_fx.save_tuners(model, "tuned/")            # manifest.json + tuners.safetensors (the CLI's format)
    utune_fx.load_tuners(fresh_model, "tuned/")      # tunes a fresh model as recorded, loads the tensors
    model = utune_fx.fold(model)                     # tuners merged into the weights, the plain class
    model.save_pretrained("merged/")                 # Hugging Face models: from_pretrained loads it

How (docs/api.md): the whole model is traced and rewritten as on the command line (same rules,
same matches, same tuners from the same seed); then the tuners are spliced back into the user's
model at module boundaries (rewrite/splice.py), checked against the graph at non-identity values,
so the model keeps its class, methods, keyword inputs, caches and any input length. Rules whose
tuners sit inside a module (prompts, prefix keys) need the graph: ``tune`` then returns the
rewritten GraphModule and warns.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utune_fx.errors import UtuneError, first_line
from utune_fx.rewrite.splice import Splice, install, splice_plan, uninstall
from utune_fx.trace.modes import eval_mode

__all__ = ["fold", "load_tuners", "print_trainable_parameters", "save_tuners", "trainable_parameters", "tune"]

_STATE = "_utune_state"
_CHECK = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@dataclass
class TunedState:
    """What a tuned model carries (a plain attribute: not a module, not in the state dict)."""

    result: Any  # the RewriteResult of the whole-model graph (shares the model's weights and tuners)
    splices: list[Splice]
    requires_grad: dict[str, bool] = field(default_factory=dict)  # the model's flags before tuning
    base_sha256: str = ""  # of the frozen weights, as save_tuned records it
    rules: list[dict] = field(default_factory=list)  # each rule set's path and sources (the artifact's entries)

    def __getstate__(self) -> dict:
        """Pickling (torch.save of the model) leaves out the graph, which a torch.export graph cannot
        pickle; ``graph_of`` traces and rewrites it again when fold needs it."""
        result = copy.copy(self.result)
        result.module, result.base_model, result.rule_sets = None, None, None  # rule sets hold compiled checks
        return {**self.__dict__, "result": result}

    def rule_sets(self) -> list:
        from utune_fx.rewrite.artifact import rules_from_entries

        if self.result.rule_sets is None:
            self.result.rule_sets = rules_from_entries(self.rules)
        return self.result.rule_sets


def _rule_sets(rules: Any) -> list:
    from utune_fx.match import RuleSet, load_rules

    items = rules if isinstance(rules, (list, tuple)) else [rules]
    if not items:
        raise UtuneError("tune needs at least one rule file: a shipped name ('lora'), a path or a RuleSet")
    return [item if isinstance(item, RuleSet) else load_rules(item) for item in items]


def default_inputs(model: nn.Module) -> tuple:
    """Example inputs utune_fx can make itself: from a transformers config, or timm's pretrained_cfg."""
    if hasattr(model, "config") and hasattr(model.config, "model_type"):
        from utune_fx.specs_hf import hf_inputs

        return hf_inputs(model, type(model).__name__)
    size = getattr(model, "pretrained_cfg", {}).get("input_size")
    if size:
        return (torch.randn(2, *size, generator=torch.Generator().manual_seed(0)),)
    raise UtuneError(
        f"{type(model).__name__}: cannot make example inputs for it; pass example_inputs= "
        "(a tensor, a tuple of the forward's positional inputs, or a dict of its first keyword inputs)"
    )


def _positional(model: nn.Module, inputs: Any) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    if isinstance(inputs, dict):
        names = list(inspect.signature(model.forward).parameters)
        if list(inputs) != names[: len(inputs)]:
            raise UtuneError(
                f"example_inputs names {list(inputs)}, but {type(model).__name__}.forward takes "
                f"{names[: len(inputs) + 2]} first; pass the leading inputs in the forward's order"
            )
        return tuple(inputs.values())
    raise UtuneError(f"example_inputs must be a tensor, a tuple or a dict, not {type(inputs).__name__}")


def _tuned_state(model: nn.Module) -> TunedState:
    state = getattr(model, _STATE, None)
    if state is None:
        raise UtuneError(f"{type(model).__name__} has no tuners; call utune_fx.tune(model, rules) first")
    return state


def tune(model: nn.Module, rules: Any, example_inputs: Any = None, seed: int = 0, frontend: str = "auto") -> nn.Module:
    """Insert the rules' tuners into ``model`` and freeze everything else; returns ``model`` itself.

    ``rules``: a shipped rule file by name ('lora', 'dual_utuner'), a path, a loaded RuleSet, or a
    list of them. ``example_inputs`` (made from the config for transformers and timm models) are
    only traced, never trained on: the tuned model takes any batch size and length its class does.
    Tuners start as identity, from ``seed``."""
    from utune_fx.rewrite import rewrite
    from utune_fx.rewrite.artifact import base_sha256
    from utune_fx.trace import trace

    if hasattr(model, _STATE):
        raise UtuneError(f"{type(model).__name__} is tuned already; fold it, or tune a fresh copy")
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):  # it would call its new child
        raise UtuneError(
            f"{type(model).__name__} at the top: its forward runs every child, tuners too; "
            "tune a module that holds it (class Net(nn.Module) with self.body = the Sequential)"
        )
    if hasattr(model, "utune"):
        raise UtuneError(f"{type(model).__name__} has an attribute 'utune', where the tuners would go")
    rule_sets = _rule_sets(rules)
    inputs = _positional(model, default_inputs(model) if example_inputs is None else example_inputs)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    gm = trace(model, inputs, frontend=frontend)
    model.requires_grad_(False)  # parameters the forward never reads stay frozen too
    result = rewrite(gm, rule_sets, seed)
    result.example_inputs, result.base_model = inputs, model
    _adopt_replaced_modules(model, gm)
    splices, refused = splice_plan(gm, model, inputs) if hasattr(gm, "utune") else ([], [])
    if refused:
        warnings.warn(
            f"{type(model).__name__}: {refused[0]}; these rules need the whole-model graph, so tune returns "
            "the rewritten torch.fx GraphModule (a new class; fixed input layout) instead of the model",
            stacklevel=2,
        )
        return gm
    state = TunedState(
        result, splices, requires_grad=flags, base_sha256=base_sha256(gm), rules=_rule_entries(rule_sets)
    )
    _install_checked(model, state, gm, inputs)
    object.__setattr__(model, _STATE, state)
    return model


def _adopt_replaced_modules(model: nn.Module, gm: nn.Module) -> None:
    """Modules a rule replaced in the graph (a classifier re-sized by a head rule) replace the model's
    (or the other way round)."""
    mine = dict(model.named_modules())
    for path, module in gm.named_modules():
        if path and not path.startswith("utune") and path in mine and mine[path] is not module:
            if isinstance(module, nn.Linear) and isinstance(mine[path], nn.Linear):
                parent, _, name = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, name, module)


def _install_checked(model: nn.Module, state: TunedState, gm: nn.Module, inputs: tuple) -> None:
    """Hook the splices into the model, checking that with every tuner moved off identity the model
    computes what the rewritten graph computes (the tuners are put back as they were). The graph runs
    first: a torch.fx graph calls the model's own modules, which then carry the hooks. NaN, a missing
    output or outputs of other shapes fail it too."""
    from utune_fx.fold import floating_outputs, relative_difference

    if not state.splices:  # nothing inserted (bitfit, a linear probe): the model's own weights train
        return
    tuners = [p for name, p in gm.named_parameters() if name.startswith("utune.")]
    saved = [p.detach().clone() for p in tuners]
    generator = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad(), eval_mode(model, gm):
            for p in tuners:
                p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p))
            graph = floating_outputs(gm(*inputs))
            install(model, gm.utune, state.splices)
            eager = floating_outputs(model(*inputs))
        shapes_differ = [a.shape for a in eager] != [b.shape for b in graph] or not graph
        tolerance = max((_CHECK.get(b.dtype, 1e-4) for b in graph), default=1e-4)
        failure = None if not shapes_differ and relative_difference(eager, graph) <= tolerance else "differs"
    except RuntimeError as error:  # a hook that finds no tensor to read
        failure = first_line(error)
    finally:
        with torch.no_grad():
            for p, value in zip(tuners, saved):
                p.copy_(value)
    if failure is not None:  # NaN compares as neither <= nor >: it fails too
        uninstall(model)
        model._modules.pop("utune", None)
        raise UtuneError(
            f"{type(model).__name__}: the tuners spliced into the model do not compute what the rewritten "
            f"graph computes ({failure}); please report this model (use the command line's graph: cli.py rewrite)"
        )


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), shared tensors counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's line: trainable params: N || all params: M || trainable%: P."""
    trainable, total = trainable_parameters(model)
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}"
    )


def _rule_entries(rule_sets: list) -> list[dict]:
    return [{"path": str(rules.path), "sources": dict(rules.sources)} for rules in rule_sets]


def save_tuners(model: nn.Module, directory: str | Path) -> Path:
    """The trainable tensors and the rules, as the command line's tuned artifact (manifest.json,
    tuners.safetensors); written under a temporary name and renamed into place."""
    from utune_fx.rewrite.artifact import TunedSource, save_tuned

    state = _tuned_state(model)
    shapes = [
        ",".join(map(str, x.shape)) + ":" + str(x.dtype).removeprefix("torch.")
        for x in state.result.example_inputs
        if isinstance(x, torch.Tensor)
    ]
    source = TunedSource(f"python:{type(model).__module__}:{type(model).__qualname__}", shapes, "auto")
    # the model's trainable tensors have the graph's names: what cli.py rewrite saves
    return save_tuned(_Saved(model, state), state.rule_sets(), source, directory)


class _Saved:
    """What save_tuned reads of a rewrite: the trainable tensors, the summaries, the base's hash."""

    def __init__(self, model: nn.Module, state: TunedState):
        self.module, self.summaries, self.base_sha256 = model, state.result.summaries, state.base_sha256


def load_tuners(model: nn.Module, directory: str | Path, example_inputs: Any = None) -> nn.Module:
    """Load tuners saved by ``save_tuners`` (or ``cli.py rewrite``/``train``) into ``model``: a model
    tuned with the same rules, or an untuned one, which is tuned first with the rules the artifact
    records. Refuses other rules, other base weights and tensors that do not fit, in one line."""
    from utune_fx.rewrite.artifact import TENSORS, file_sha256, load_trainable, rules_from_entries
    from utune_fx.rewrite.manifest import MANIFEST, read_manifest

    directory = Path(directory)
    manifest = read_manifest(directory)
    tensors_path = directory / TENSORS
    if not tensors_path.is_file() or file_sha256(tensors_path) != manifest["tensors_sha256"]:
        raise UtuneError(f"{tensors_path} is missing or does not match the sha256 in {MANIFEST}")
    if not hasattr(model, _STATE):
        model = tune(model, rules_from_entries(manifest["rules"]), example_inputs)
    state = _tuned_state(model)
    recorded = [sorted(entry["sources"].items()) for entry in manifest["rules"]]
    if recorded != [sorted(entry["sources"].items()) for entry in state.rules]:
        raise UtuneError(f"{directory}: its tuners were made with other rules than this model's; tune a fresh model")
    if state.base_sha256 != manifest["base_sha256"]:
        raise UtuneError(f"{directory}: the model has other frozen weights than the ones the tuners were trained on")
    load_trainable(model, tensors_path)
    return model


def graph_of(model: nn.Module, state: TunedState) -> nn.Module:
    """The rewritten whole-model graph, sharing the model's weights and tuners; after unpickling,
    traced and rewritten again (the hooks off) and given the model's tuners."""
    if state.result.module is not None:
        return state.result.module
    from utune_fx.rewrite import rewrite
    from utune_fx.trace import trace

    tuners = model._modules.pop("utune", None)
    uninstall(model)
    try:
        gm = trace(model, state.result.example_inputs)
        rewrite(gm, state.rule_sets())
    finally:
        if tuners is not None:
            install(model, tuners, state.splices)
    gm.utune = model.utune  # the trained tuners, under the names the rewrite gave the new ones
    _adopt_replaced_modules(gm, model)  # and the trained classifier a head rule re-sized
    state.result.module = gm
    return gm


def _refuse_unmerged(entries: list) -> None:
    from utune_fx.fold import FOLDED, IN_PLACE

    refused = [e for e in entries if e.status not in (FOLDED, IN_PLACE)]
    if refused:
        first = refused[0]
        raise UtuneError(
            f"cannot fold rule '{first.rule}' ({first.tuner} at {first.module}): {first.reason}; "
            f"{len(refused)} tuner(s) do not merge: keep them (save_tuners) or tune with foldable rules (lora)"
        )


def fold(model: nn.Module) -> nn.Module:
    """Merge every tuner into the weights it sits on and return the plain model (its own class, no
    hooks, no ``utune`` submodule, the parameters' original requires_grad). A tuner that cannot
    merge (a nonlinear adapter) is refused with its reason before anything is written. The rewritten
    GraphModule ``tune`` returns where it cannot splice folds too: into a new GraphModule."""
    from utune_fx.fold import fold as fold_graph

    if getattr(model, _STATE, None) is None and isinstance(model, torch.fx.GraphModule) and hasattr(model, "utune"):
        folded = fold_graph(model)  # the rewritten graph tune returned (prompts, prefixes, a bypass)
        _refuse_unmerged(folded.entries)
        return folded.module
    state = _tuned_state(model)
    graph = graph_of(model, state)
    uninstall(model)  # a torch.fx graph calls the model's own modules: without the hooks
    folded = fold_graph(graph, state.result.summaries)
    try:
        _refuse_unmerged(folded.entries)
    except UtuneError:
        if state.splices:
            del model._modules["utune"]
            install(model, graph.utune, state.splices)
        raise
    merged = dict(folded.module.named_parameters())
    mine = {name: p for name, p in model.named_parameters() if not name.startswith("utune.")}
    new = sorted(set(merged) - set(mine) - {n for n in merged if n.startswith("utune.")})
    if new:
        raise UtuneError(f"folding would add parameters the model's class does not have ({new[:3]}); keep the tuners")
    with torch.no_grad():
        for name, parameter in mine.items():
            if name in merged and merged[name] is not parameter:
                parameter.copy_(merged[name])
    if "utune" in model._modules:
        del model._modules["utune"]
    object.__delattr__(model, _STATE)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(state.requires_grad.get(name, True))
    return model

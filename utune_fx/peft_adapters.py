"""PEFT adapter directories, both ways.

    export_peft(ARTIFACT, DIR)     adapter_config.json + adapter_model.safetensors that
                                   PeftModel.from_pretrained(base_model, DIR) loads with the tuned outputs
    import_peft(ADAPTER_DIR, OUT)  a PEFT LoRA adapter as a tuned artifact (fold, export, train it)

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
Ranks and alphas that differ per module go to ``rank_pattern`` / ``alpha_pattern``.

The import reads adapter_config.json as hostile data (peft_adapter_config.schema.json; at most
MAX_CONFIG_BYTES): plain LoRA only, every other feature (DoRA, biases, modules_to_save, layer
replication, ...) refused naming the field. Tensors come from adapter_model.safetensors only;
every key must name a module of the model that target_modules selects, with the shapes PEFT would
build. Regular expressions from the file (target_modules, exclude_modules, rank_pattern,
alpha_pattern) are matched under a deadline (REGEX_SECONDS), so a pathological one cannot hang.
The import writes a rule file selecting exactly those modules (``peft_lora.yaml``, one rule per
rank and alpha), rewrites the model with it and loads the tensors, so the artifact is an ordinary
one: fold, export, train and load_tuned work on it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import yaml
from torch import fx, nn

from utune_fx.atomic import replace_directory
from utune_fx.errors import UtuneError, first_line
from utune_fx.fold import _wiring, floating_outputs, relative_difference
from utune_fx.fold.layers import channel_axis, fold_target, layer_behind, layer_uses
from utune_fx.match.sizes import layer_input
from utune_fx.rewrite.attention_sites import TUNER_META
from utune_fx.trace import node_info
from utune_fx.trace.annotate import set_training
from utune_fx.tuners.lora import LoraBranch
from utune_fx.tuners.scale_shift import ScaleShift

CONFIG, WEIGHTS, PICKLED = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 2**20  # an adapter_config.json is about 1.5 KB; its patterns list modules: a few KB more
REGEX_SECONDS = 2.0  # all the file's patterns against all the modules they are tried on, together
EXACT = 1e-5  # largest relative difference between PEFT's outputs and utune_fx's the export accepts
RULE_FILE = "peft_lora.yaml"
_FIX = "only plain LoRA adapters import (docs/deploy.md, PEFT adapters)"


# --- the layers PEFT wraps ------------------------------------------------------------------------


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


def _features(module: nn.Module, kind: str) -> tuple[int, int]:
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


# --- export ---------------------------------------------------------------------------------------


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _suffix_clash(paths: list[str], base: nn.Module, dotted: bool) -> str | None:
    """A module of the model other than ``path`` whose name PEFT's suffix matching would also take."""
    chosen = set(paths)
    for key, _ in base.named_modules():
        for path in chosen:
            if key != path and key.endswith(f".{path}" if dotted else path):
                return f"{key} (besides {path})"
    return None


def adapter_files(result, sites: list[PeftSite], whole: list[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, the tensors of adapter_model.safetensors)."""
    base = result.base_model if result.base_model is not None else result.module
    tensors: dict[str, torch.Tensor] = {}
    paths = [site.module for site in sites]
    if len(set(paths)) != len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise UtuneError(f"two tuners sit on {twice}; a PEFT adapter holds one per module: merge their rules")
    clash = _suffix_clash(whole, base, dotted=False)
    if clash is not None:
        raise UtuneError(
            f"PEFT's modules_to_save takes every module whose name ends with the one given, and {clash} "
            "does; rename the module or leave it frozen"
        )
    ambiguous = _suffix_clash(paths, base, dotted=True) is not None
    targets: str | list[str] = "(?:" + "|".join(re.escape(p) for p in paths) + ")" if ambiguous else sorted(paths)
    peft_type = sites[0].peft_type if sites else "LORA"
    config: dict = {
        "peft_type": peft_type,
        "base_model_name_or_path": getattr(result.source, "model", None),
        "task_type": None,
        "inference_mode": True,
        "target_modules": targets,
        "modules_to_save": sorted(whole) or None,
        "fan_in_fan_out": any(site.kind == "conv1d_hf" for site in sites),
        "revision": None,
    }
    for site in sites:
        key = f"{PREFIX}{site.module}"
        if site.peft_type == "IA3":
            scale = (1 + site.branch.scale.detach().float()).to(site.branch.scale.dtype)
            if site.kind == "conv":
                shape = (1, -1) + (1,) * (site.layer.weight.dim() - 2)
            else:
                shape = (1, -1) if site.feedforward else (-1, 1)
            tensors[f"{key}.ia3_l"] = scale.reshape(shape).contiguous()
            continue
        a, b = site.branch.lora_A.weight.detach(), site.branch.lora_B.weight.detach()
        if site.kind == "embedding":
            tensors[f"{key}.lora_embedding_A"] = a.T.contiguous()
            tensors[f"{key}.lora_embedding_B"] = b.contiguous()
        else:
            tensors[f"{key}.lora_A.weight"] = a.contiguous()
            tensors[f"{key}.lora_B.weight"] = b.contiguous()
    for path in whole:
        module = base.get_submodule(path)
        for name, value in module.state_dict().items():  # the tuned graph shares these tensors
            tensors[f"{PREFIX}{path}.{name}"] = value.detach().contiguous().clone()
    if peft_type == "IA3":
        config["feedforward_modules"] = sorted(s.module for s in sites if s.feedforward)
        if isinstance(targets, str):
            ff = [s.module for s in sites if s.feedforward]
            config["feedforward_modules"] = "(?:" + "|".join(re.escape(p) for p in ff) + ")" if ff else []
        return config, tensors
    ranks = {s.module: _lora_rank(s) for s in sites}
    alphas = {s.module: _number(s.branch.scaling * ranks[s.module]) for s in sites}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else 8

    def key(path: str) -> str:
        return ("^" if ambiguous else "") + re.escape(path)

    dropouts = [s.branch.dropout.p for s in sites if isinstance(s.branch.dropout, nn.Dropout)]
    config |= {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts, default=0.0),
        "rank_pattern": {key(p): v for p, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {key(p): v for p, v in sorted(alphas.items()) if v != alpha},
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return config, tensors


def _lora_rank(site: PeftSite) -> int:
    weight = site.branch.lora_A.weight
    return int(weight.shape[1] if site.kind == "embedding" else weight.shape[0])


def peft_check(result, directory: Path) -> float | None:
    """Largest difference of PeftModel.from_pretrained(copy of the base model, directory) from the tuned
    model on the example inputs, relative to the largest output; None when peft is not installed."""
    try:
        import peft
    except Exception:
        return None
    base = result.base_model if result.base_model is not None else None
    if base is None:
        return None
    with torch.no_grad():
        tuned_mode = {m: m.training for m in result.module.modules()}
        set_training(result.module, False)
        expected = result.module(*result.example_inputs)
        for m, mode in tuned_mode.items():
            m.training = mode
        model = copy.deepcopy(base)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        peft_model = peft.PeftModel.from_pretrained(model, str(directory)).eval()
        actual = peft_model(*result.example_inputs)
    return relative_difference(floating_outputs(actual)[:1], floating_outputs(expected)[:1])  # logits, features


def export_peft(directory: str | Path, out: str | Path, model=None) -> dict:
    """Write the tuned artifact at ``directory`` as a PEFT adapter directory at ``out``; checked by
    loading it with PEFT (when installed) before it is put in place. Returns the report."""
    from utune_fx.rewrite.artifact import load_tuned

    return write_peft(load_tuned(directory, model=model), out, where=str(directory))


def write_peft(result, out: str | Path, where: str = "the model") -> dict:
    """A rewritten model's tuners (a RewriteResult) as a PEFT adapter directory at ``out`` (see export_peft)."""
    sites, whole = peft_sites(result)
    if not sites and not whole:
        raise UtuneError(f"{where}: the artifact has no tuner PEFT could hold (no LoRA, IA3 or trained module)")
    config, tensors = adapter_files(result, sites, whole)
    out = Path(out)
    with replace_directory(out) as staging:
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n")
        safetensors.torch.save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        difference = peft_check(result, staging)
        if difference is not None and not difference <= EXACT:
            raise UtuneError(
                f"PEFT's outputs with the written adapter differ from the tuned model's by {difference:.1e} "
                f"(relative; the limit is {EXACT:g}); nothing was written. Please report it with the artifact"
            )
    return {
        "path": str(out),
        "peft_type": config["peft_type"],
        "modules": [s.module for s in sites],
        "modules_to_save": whole,
        "tensors": len(tensors),
        "rank_pattern": config.get("rank_pattern", {}),
        "peft_relative_difference": difference,
    }


# --- import ---------------------------------------------------------------------------------------


class _Deadline:
    """Regular expressions from a file, matched under one shared deadline (on the main thread; Python's
    re engine checks for signals as it backtracks). Elsewhere only the pattern length bounds them."""

    def __init__(self, where: str, seconds: float | None = None):
        self.where, self.seconds, self.cache = where, seconds or REGEX_SECONDS, {}

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        main = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        if not main:
            yield
            return

        def expire(*_):
            raise TimeoutError

        previous = signal.signal(signal.SIGALRM, expire)
        started = time.monotonic()
        outer, _ = signal.setitimer(signal.ITIMER_REAL, self.seconds)  # a caller's own alarm, if any
        try:
            yield
        except TimeoutError:
            raise UtuneError(
                f"{self.where}: its regular expressions took more than {self.seconds:g} s to match the model's "
                f"module names; simplify them or list the modules; {_FIX}"
            ) from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if outer:  # the caller's alarm goes on with what was left of it
                signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-3))

    def compile(self, pattern: str, field: str) -> re.Pattern:
        if pattern not in self.cache:
            try:
                self.cache[pattern] = re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as error:
                raise UtuneError(f"{self.where}: {field}: not a regular expression ({first_line(error)})") from None
        return self.cache[pattern]


def _targeted(config: dict, path: str, regex: _Deadline) -> bool:
    """Whether PEFT's target_modules / exclude_modules select the module ``path`` (peft's rules)."""
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str) and regex.compile(excluded, "exclude_modules").fullmatch(path):
        return False
    if isinstance(excluded, list) and (path in excluded or any(path.endswith(f".{e}") for e in excluded)):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return regex.compile(targets, "target_modules").fullmatch(path) is not None
    if isinstance(targets, list):
        return path in targets or any(path.endswith(f".{t}") for t in targets)
    return False


def _pattern_value(patterns: dict, path: str, default, field: str, regex: _Deadline):
    """PEFT's get_pattern_key: the first key that matches the end of ``path`` (at a dot), else default."""
    for key, value in patterns.items():
        if regex.compile(rf"(.*\.)?({key})$", f"{field}.{key}").match(path):
            return value
    return default


def read_adapter_config(directory: Path) -> dict:
    """adapter_config.json, bounded and schema-checked: the type first (another kind of adapter gets its
    own line), then every field (peft_adapter_config.schema.json)."""
    from utune_fx.schemas import check_json, parse_json

    path = directory / CONFIG
    if not directory.is_dir():
        raise UtuneError(f"{directory}: no PEFT adapter directory here (it holds {CONFIG} and {WEIGHTS})")
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)  # /dev/zero and friends report size 0
    except FileNotFoundError:
        raise UtuneError(f"{path} is missing; a PEFT adapter directory holds {CONFIG} and {WEIGHTS}") from None
    except OSError as error:
        raise UtuneError(f"{path}: cannot read ({first_line(error)})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UtuneError(f"{path}: over the limit of {MAX_CONFIG_BYTES:,} bytes for {CONFIG}; {_FIX}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UtuneError(f"{path}: not UTF-8 text ({first_line(error)}); {_FIX}") from None
    config = parse_json(text, "peft_type", str(path), _FIX)
    check_json(config, "peft_adapter_config", str(path), _FIX)
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise UtuneError(f"{path}: use_rslora with rank_pattern or alpha_pattern, which PEFT itself refuses; {_FIX}")
    return config


_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")


def _adapter_tensors(directory: Path, base: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> {"A": tensor, "B": tensor} from adapter_model.safetensors, PEFT's layout."""
    path = directory / WEIGHTS
    if not path.is_file():
        pickled = " (adapter_model.bin is a pickle, which utune_fx never loads: save it again with "
        pickled += "save_pretrained(..., safe_serialization=True))" if (directory / PICKLED).exists() else ""
        raise UtuneError(f"{path} is missing{pickled}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            found: dict[str, dict[str, torch.Tensor]] = {}
            for key in keys:
                match = _KEY.fullmatch(key) if key.startswith(PREFIX) else None
                if match is None:
                    raise UtuneError(
                        f"{path}: tensor {key[:200]!r} is no LoRA weight of a module (expected "
                        f"{PREFIX}<module>.lora_A.weight / .lora_B.weight); {_FIX}"
                    )
                module, which = match.group(1)[len(PREFIX) :], match.group(2)
                embedding = which.startswith("lora_embedding")
                slot = found.setdefault(module, {})
                slot["A" if "_A" in which else "B"] = handle.get_tensor(key)
                slot["embedding"] = embedding
    except UtuneError:
        raise
    except Exception as error:
        raise UtuneError(f"{path}: cannot read ({first_line(error)}); the file is damaged or not safetensors") from None
    names = dict(base.named_modules())
    for module, slot in found.items():
        if module not in names or module == "":
            raise UtuneError(f"{path}: tensor {PREFIX}{module}... names no module of the model; wrong base model?")
        if "A" not in slot or "B" not in slot:
            raise UtuneError(f"{path}: {module} has only lora_{'A' if 'A' in slot else 'B'}; the file is incomplete")
    return found


def _check_shapes(path: Path, module_path: str, module: nn.Module, kind: str, slot: dict, rank: int) -> None:
    a, b = slot["A"], slot["B"]
    fan_in, fan_out = _features(module, kind)
    if kind == "embedding":
        expected_a, expected_b = (rank, fan_in), (fan_out, rank)
        names = ("lora_embedding_A", "lora_embedding_B")
    elif kind == "conv":
        expected_a = (rank, module.in_channels // module.groups, *module.kernel_size)
        expected_b = (fan_out, rank, *([1] * len(module.kernel_size)))
        names = ("lora_A.weight", "lora_B.weight")
    else:
        expected_a, expected_b = (rank, fan_in), (fan_out, rank)
        names = ("lora_A.weight", "lora_B.weight")
    for tensor, expected, name in ((a, expected_a, names[0]), (b, expected_b, names[1])):
        if not tensor.is_floating_point():
            raise UtuneError(f"{path}: {PREFIX}{module_path}.{name} holds {tensor.dtype}, not floating point")
        if tuple(tensor.shape) != tuple(expected):
            raise UtuneError(
                f"{path}: {PREFIX}{module_path}.{name} has shape {list(tensor.shape)}, {module_path} "
                f"({type(module).__name__}) with r = {rank} needs {list(expected)}; wrong base model or rank_pattern?"
            )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise UtuneError(f"{path}: {module_path}'s LoRA weights hold NaN or infinities")


def import_peft(
    adapter: str | Path,
    out: str | Path,
    model: str | None = None,
    input_shapes: list[str] | None = None,
    frontend: str = "auto",
) -> dict:
    """A PEFT LoRA adapter directory as a tuned artifact at ``out``. ``model``: the base model's spec;
    without it, adapter_config.json's base_model_name_or_path when that is a utune_fx spec that is data
    (timm:, hf:, a card), never one that runs code. Returns the report."""
    from utune_fx.rewrite.artifact import save_tuned

    result, report = imported(adapter, model, input_shapes, frontend)
    return report | {"path": str(save_tuned(result, result.rule_sets, result.source, out))}


def imported(
    adapter: str | Path, model: str | None = None, input_shapes: list[str] | None = None, frontend: str = "auto"
):
    """(the rewritten model with the adapter's LoRA weights, the report): what import_peft saves."""
    from utune_fx.match import load_rules
    from utune_fx.rewrite.artifact import TunedSource, build_tuned
    from utune_fx.specs import CODE_SOURCES, check_data_options, parse_model_spec

    adapter = Path(adapter)
    config = read_adapter_config(adapter)
    where = str(adapter / CONFIG)
    spec = model
    if spec is None:
        recorded = config.get("base_model_name_or_path")
        try:
            parsed = parse_model_spec(recorded) if recorded else None
        except UtuneError:
            parsed = None
        if parsed is None or parsed.source in CODE_SOURCES:
            raise UtuneError(
                f"{where}: base_model_name_or_path {recorded!r} is not a utune_fx model spec that is data "
                "(timm:NAME, hf:MODEL_TYPE, card.json); name the base model: --model SPEC"
            )
        check_data_options(parsed)
        spec = recorded
    from utune_fx.specs import load_model

    loaded = load_model(spec, input_shapes or None)
    tensors = _adapter_tensors(adapter, loaded.model)
    modules = dict(loaded.model.named_modules())
    regex = _Deadline(where)
    plan: dict[str, tuple[int, float]] = {}  # module path -> (rank, alpha as utune_fx's LoRA takes it)
    with regex.running():
        for path, slot in sorted(tensors.items()):
            module = modules[path]
            kind = layer_kind(module)
            if kind is None:
                raise UtuneError(
                    f"{adapter / WEIGHTS}: {PREFIX}{path}: {path} is a {type(module).__name__}; utune_fx imports "
                    "LoRA on nn.Linear, transformers' Conv1D, nn.Conv1d/2d/3d and nn.Embedding"
                )
            if slot["embedding"] != (kind == "embedding"):
                raise UtuneError(f"{adapter / WEIGHTS}: {PREFIX}{path}: embedding tensors for a {kind} or the reverse")
            if kind == "conv" and (module.groups != 1 or any(d != 1 for d in module.dilation)):
                raise UtuneError(f"{adapter / WEIGHTS}: {path} is a grouped or dilated conv; utune_fx's LoRA differs")
            if not _targeted(config, path, regex):
                raise UtuneError(
                    f"{adapter / WEIGHTS}: {PREFIX}{path}: target_modules (less exclude_modules) does not select "
                    f"{path}, so PEFT would not load these tensors; the adapter is inconsistent"
                )
            rank = _pattern_value(config.get("rank_pattern") or {}, path, config["r"], "rank_pattern", regex)
            alpha = _pattern_value(
                config.get("alpha_pattern") or {}, path, config["lora_alpha"], "alpha_pattern", regex
            )
            _check_shapes(adapter / WEIGHTS, path, module, kind, slot, rank)
            if config.get("use_rslora"):
                alpha = alpha * math.sqrt(rank)  # scaling alpha / sqrt(r) as utune_fx's alpha' / r
            plan[path] = (rank, alpha)
    if not plan:
        raise UtuneError(f"{adapter / WEIGHTS}: holds no LoRA tensor; nothing to import")
    for path in plan:
        if "*" in path or len(path) > 200:
            raise UtuneError(f"module {path[:200]!r}: a name with '*' or over 200 characters cannot be a rule scope")
    groups: dict[tuple[int, float], list[str]] = {}
    for path, key in sorted(plan.items(), key=lambda item: (item[1], item[0])):
        groups.setdefault(key, []).append(path)  # in the order _rule_file writes its rules
    rules_text = _rule_file(groups, config.get("lora_dropout") or 0.0, adapter)
    with tempfile.TemporaryDirectory() as scratch:
        rules_path = Path(scratch) / RULE_FILE
        rules_path.write_text(rules_text)
        rule_set = load_rules(rules_path)
    rule_set.path = RULE_FILE
    source = TunedSource(spec, list(input_shapes or []), frontend)
    result = build_tuned(source, [rule_set], module=loaded.model)
    sites, _ = peft_sites(result)
    by_module = {site.module: site for site in sites}
    if sorted(by_module) != sorted(plan) or len(sites) != len(plan):
        missing = sorted(set(plan) - set(by_module))
        raise UtuneError(
            f"{adapter}: the rewrite put LoRA on other layers than the adapter's (missing {missing[:3]}); "
            "the model traces those modules in another form; please report it"
        )
    with torch.no_grad():
        for path, site in by_module.items():
            slot, branch = tensors[path], site.branch
            a = slot["A"].T if site.kind == "embedding" else slot["A"]
            branch.lora_A.weight.copy_(a.to(branch.lora_A.weight.dtype))
            branch.lora_B.weight.copy_(slot["B"].to(branch.lora_B.weight.dtype))
    return result, {
        "model": spec,
        "modules": sorted(plan),
        "rules": [{"rank": r, "alpha": a, "modules": len(paths)} for (r, a), paths in groups.items()],
        "trainable_parameters": result.trainable_parameters,
    }


def _rule_file(groups: dict[tuple[int, float], list[str]], dropout: float, adapter: Path) -> str:
    patterns, rules = {}, []
    for index, ((rank, alpha), paths) in enumerate(groups.items()):
        name = "peft_lora" if index == 0 else f"peft_lora_{index + 1}"
        patterns[name] = {"node": {"kind": ["linear", "conv", "embedding"], "scope": sorted(paths)}}
        settings = {"rank": rank, "alpha": _number(alpha), "dropout": float(dropout)}
        rules.append({"name": name, "match": name, "tuner": "lora", "settings": settings})
    header = f"# LoRA imported from the PEFT adapter {adapter.name}: its modules, one rule per rank and alpha\n"
    return header + yaml.safe_dump({"version": 1, "patterns": patterns, "rules": rules}, sort_keys=False, width=120)

"""A tuned artifact as a PEFT adapter directory (``cli.py export --format peft``).

    export_peft(ARTIFACT, DIR)     adapter_config.json + adapter_model.safetensors that
                                   PeftModel.from_pretrained(base_model, DIR) loads with the tuned outputs

The tuners go out as peft_layers.py maps them (LoRA, IA3, modules_to_save); ranks and alphas that
differ per module go to ``rank_pattern`` / ``alpha_pattern``. Before the directory is put in place,
PEFT itself (when installed) loads it onto a copy of the base model and its outputs must equal the
tuned model's within EXACT (peft_check).
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from utune_fx.atomic import replace_directory
from utune_fx.errors import UtuneError
from utune_fx.export.exporters import quiet
from utune_fx.fold import floating_outputs, relative_difference
from utune_fx.peft_layers import CONFIG, PREFIX, WEIGHTS, PeftSite, peft_sites, plain_number
from utune_fx.trace.annotate import set_training

EXACT = 1e-5  # largest relative difference between PEFT's outputs and utune_fx's the export accepts


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
    alphas = {s.module: plain_number(s.branch.scaling * ranks[s.module]) for s in sites}
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
        with quiet():  # PEFT calls transformers APIs that warn about their own deprecations
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

"""Tuned artifacts: a directory that rebuilds a tuned model exactly.

    rewrite(...) --save_tuned--> DIR/manifest.json      base model spec, input shapes, front end,
                                                          rule files (text + sha256), versions,
                                                          trainable tensor names, shapes, sha256,
                                                          sha256 of the frozen base weights
                                 DIR/tuners.safetensors  the trainable tensors only
    DIR --load_tuned--> RewriteResult (base model rebuilt, traced, rewritten, weights loaded)

No pickle anywhere: JSON and safetensors. The directory is written under a
temporary name and renamed into place, so a failure never leaves a half
artifact or damages an existing one. Every mismatch on load (missing file,
edited rule text, unknown or missing tensor, wrong shape) is one line.

An artifact is data. The manifest is read through utune_fx/schemas
(manifest.schema.json bounds every field) and carries ``manifest_sha256``, the
sha256 of its own canonical JSON without that field, so a hand-edited or
damaged manifest is refused (a checksum against accidents and edits, not a
signature: whoever can write the file can recompute it). A base model spec
that runs code (``package.module:callable``, ``file.py:callable``) is rebuilt
only when the caller names the model (``load_tuned(DIR, model=SPEC_OR_MODULE)``,
``--model SPEC`` on the command line); timm and card specs rebuild as they
are, their options checked to be data (utune_fx/specs.py).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from utune_fx.atomic import replace_directory
from utune_fx.errors import UtuneError, first_line
from utune_fx.rewrite.manifest import FORMAT, MANIFEST, base_model_spec, read_manifest, write_manifest

TENSORS = "tuners.safetensors"


@dataclass
class TunedSource:
    """What the artifact needs to rebuild the tuned model."""

    model: str  # model spec as given to the CLI
    input_shapes: list[str]  # --input-shape values ('' entries never)
    frontend: str


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def base_sha256(module: torch.nn.Module) -> str:
    """Hash of the frozen weights (parameters that do not train, and buffers), in name order."""
    digest = hashlib.sha256()
    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad] + list(module.named_buffers())
    for name, tensor in sorted(frozen, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import timm

    import utune_fx

    return {"utune_fx": getattr(utune_fx, "__version__", "0.1.0"), "torch": torch.__version__, "timm": timm.__version__}


def save_tuned(result: Any, rule_sets: list[Any], source: TunedSource, directory: str | Path) -> Path:
    directory = Path(directory)
    tensors = {name: p.detach().contiguous().clone() for name, p in result.module.named_parameters() if p.requires_grad}
    with replace_directory(directory) as staging:
        safetensors.torch.save_file(tensors, str(staging / TENSORS))
        manifest = {
            "format": FORMAT,
            "model": source.model,
            "input_shapes": source.input_shapes,
            "frontend": source.frontend,
            "rules": [
                {
                    "path": rules.path,
                    "sources": rules.sources,
                    "sha256": {name: _sha256(text.encode()) for name, text in rules.sources.items()},
                }
                for rules in rule_sets
            ],
            "versions": _versions(),
            "summary": [vars(s) for s in result.summaries],
            "tensors": {name: list(t.shape) for name, t in tensors.items()},
            "tensors_sha256": file_sha256(staging / TENSORS),
            "base_sha256": getattr(result, "base_sha256", None) or base_sha256(result.module),
        }
        write_manifest(staging, manifest, where=str(directory / MANIFEST))
    return directory


def artifact_directory(path: str | Path) -> Path | None:
    """The tuned artifact at ``path``, or in the ``tuned/`` folder of a training run there."""
    for candidate in (Path(path), Path(path) / "tuned"):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def data_config_of(model: torch.nn.Module) -> dict | None:
    """timm's input settings (size, interpolation, mean, std, crop) for models that have them."""
    if not hasattr(model, "pretrained_cfg"):
        return None
    import timm.data

    return timm.data.resolve_data_config(model=model)


def build_tuned(source: TunedSource, rule_sets: list[Any], seed: int = 0, module: torch.nn.Module | None = None):
    """Build the model a spec names (or take ``module``, the base model already built), trace it and
    rewrite it: a RewriteResult that knows its source and its base model's data config (what
    save_tuned and training need)."""
    from utune_fx.rewrite import rewrite
    from utune_fx.specs import load_model
    from utune_fx.trace import trace

    loaded = load_model(source.model, source.input_shapes or None, module=module)
    gm = trace(loaded.model, loaded.inputs, frontend=source.frontend, name=loaded.name)
    result = rewrite(gm, rule_sets, seed)
    result.source = source
    result.data_config = data_config_of(loaded.model)
    result.example_inputs, result.base_model = loaded.inputs, loaded.model
    return result


def load_trainable(module: torch.nn.Module, tensors_path: Path) -> None:
    """Copy an artifact's tensors into ``module``'s trainable parameters of the same names, after
    checking that the file reads and that names and shapes fit (nothing is written otherwise)."""
    try:
        tensors = safetensors.torch.load_file(str(tensors_path))
    except Exception as error:
        raise UtuneError(f"{tensors_path}: cannot read ({first_line(error)}); the file is damaged") from error
    expected = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise UtuneError(
            f"{tensors_path}: tensors do not fit the rewritten model (missing {missing[:3]}, "
            f"unknown {unknown[:3]}); was it written for other rules or another model?"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UtuneError(
                f"{tensors_path}: {name} has shape {list(tensor.shape)}, the model expects {list(expected[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)


def rules_from_entries(entries: list[dict]) -> list:
    """Rule sets from recorded sources (a manifest's ``rules``), loaded from a scratch folder."""
    from utune_fx.match import load_rules

    rule_sets = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, entry in enumerate(entries):
            folder = Path(scratch) / str(index)
            for name, text in entry["sources"].items():  # names checked by read_manifest: they stay in folder
                target = folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
            rule_sets.append(load_rules(folder / Path(entry["path"]).name))
    return rule_sets


def load_tuned(directory: str | Path, model: str | torch.nn.Module | None = None, keep_initial: bool = False):
    """Rebuild the base model, trace and rewrite it as recorded, load the tuner weights.

    ``model`` names the base model when the manifest's spec runs code (an import or file spec,
    refused otherwise): a spec string, which replaces the recorded one, or the nn.Module itself (used as
    it is, not copied: the tuned model shares its weights). ``keep_initial``: also keep a copy of the
    trainable tensors as the rewrite made them, before the artifact's are loaded
    (``result.initial_tensors``): with those the tuned model computes what the base model computes."""

    directory = Path(directory)
    manifest = read_manifest(directory)
    spec = base_model_spec(manifest, directory / MANIFEST, model)  # before anything is built or read
    tensors_path = directory / TENSORS
    if not tensors_path.is_file():
        raise UtuneError(f"{tensors_path} is missing; the directory is not a complete tuned artifact")
    if file_sha256(tensors_path) != manifest["tensors_sha256"]:
        raise UtuneError(f"{tensors_path} does not match the sha256 in {MANIFEST}; the file was changed or damaged")
    source = TunedSource(spec, manifest["input_shapes"], manifest["frontend"])
    module = model if isinstance(model, torch.nn.Module) else None
    result = build_tuned(source, rules_from_entries(manifest["rules"]), module=module)
    if base_sha256(result.module) != manifest["base_sha256"]:
        raise UtuneError(
            f"{directory}: the base model {spec} now has other weights than the ones it "
            f"was tuned on (tuned with {manifest['versions']}); use the same weights and versions"
        )
    if keep_initial:
        result.initial_tensors = {n: p.detach().clone() for n, p in result.module.named_parameters() if p.requires_grad}
    load_trainable(result.module, tensors_path)
    return result

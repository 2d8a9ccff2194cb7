"""A PEFT LoRA adapter directory as a tuned artifact (``cli.py import-peft``).

    import_peft(ADAPTER_DIR, OUT)  a PEFT LoRA adapter as a tuned artifact (fold, export, train it)

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
import math
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import safetensors
import torch
import yaml
from torch import nn

from utune_fx.errors import UtuneError, first_line
from utune_fx.peft_layers import CONFIG, PREFIX, WEIGHTS, layer_features, layer_kind, peft_sites, plain_number

PICKLED = "adapter_model.bin"
MAX_CONFIG_BYTES = 2**20  # an adapter_config.json is about 1.5 KB; its patterns list modules: a few KB more
REGEX_SECONDS = 2.0  # all the file's patterns against all the modules they are tried on, together
RULE_FILE = "peft_lora.yaml"
_FIX = "only plain LoRA adapters import (docs/deploy.md, PEFT adapters)"


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
    fan_in, fan_out = layer_features(module, kind)
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
        settings = {"rank": rank, "alpha": plain_number(alpha), "dropout": float(dropout)}
        rules.append({"name": name, "match": name, "tuner": "lora", "settings": settings})
    header = f"# LoRA imported from the PEFT adapter {adapter.name}: its modules, one rule per rank and alpha\n"
    return header + yaml.safe_dump({"version": 1, "patterns": patterns, "rules": rules}, sort_keys=False, width=120)

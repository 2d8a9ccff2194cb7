"""Model specs: how the command line names a model, and its example inputs.

    timm:vit_base_patch16_224                      timm.create_model(name, pretrained=False)
    timm:vit_tiny_patch16_224?img_size=32&depth=6  options become keyword arguments
    timm:efficientnet_lite0?weights=FILE_OR_PACKAGE   pretrained weights from disk (utune_fx/weights.py)
    path/to/card.json?num_classes=10               a model card: timm name, kwargs, weights, normalisation
    hf:gpt2/causal-lm?n_layer=2&n_embd=64          a transformers config, random weights (utune_fx/specs_hf.py)
    torchvision.models:resnet18?num_classes=10     package.module:callable(**options)
    path/to/model.py:build?width=64                a function or nn.Module class in a file

Option values are read as YAML scalars (``32`` -> int, ``true`` -> bool,
``[1, 2]`` -> list); nothing is evaluated. A spec may also name an nn.Module
instance. Example inputs come from ``--input-shape`` (``2,3,224,224``, an
optional ``:int64`` dtype, once per input) or, for timm models, from the
pretrained config with the spec's img_size/in_chans applied, for hf models from
their config and ``forward`` signature; batch size 2.

Only the last two forms run code (``CODE_SOURCES``); timm, hf and card specs are
data: their options must be numbers, strings, booleans or lists of them (an hf
option may be dotted, ``text_config.hidden_size=32``, to set a sub-config's
field), and the options that read files or loader settings (timm's
``checkpoint_path``, ``pretrained_cfg``..., transformers' ``trust_remote_code``,
``quantization_config``...) are refused, so a spec recorded in an artifact
cannot import, call or unpickle anything. Options that count layers or blocks
are bounded, and the model's size is checked on the meta device first.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import torch
import yaml
from torch import nn

from utune_fx.errors import UtuneError, first_line

DEFAULT_MODEL = "timm:vit_base_patch16_224"
DEFAULT_BATCH = 2  # not 1: torch.export specialises size-1 dimensions
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


CODE_SOURCES = ("import", "file")  # spec sources that import and run code: built only when the user names them
# timm.create_model arguments that read files or loader settings (torch.load, downloads) the spec cannot vouch for
_LOADER_OPTIONS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "weights_only")
_MAX_OPTION_NESTING = 4  # depths=[1,1] is 1 level; nothing timm takes needs more
# options that count blocks or layers build Python modules one by one, before any size check can run
# (depth=10**8 exhausts memory even on the meta device); the largest timm models use under 100
_COUNT_OPTION = re.compile(r"depth|layer|block|stage", re.IGNORECASE)  # n_layer, num_hidden_layers, depths
MAX_COUNT_OPTION, MAX_MULTIPLIER_OPTION = 256, 16
MAX_INPUT_ELEMENTS = 2**27  # one example input (512 MiB of float32); batch 2 of 3 x 4096 x 4096 images fits
MODEL_MEMORY_SHARE = 0.8  # a timm model's weights may take this share of the memory available


@dataclass
class ModelSpec:
    text: str  # as the user wrote it
    source: str  # 'timm', 'hf', 'card', 'import' or 'file'
    target: str  # timm model name, transformers model type (and /task), card path, module path or file path
    attribute: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]

    @property
    def name(self) -> str:
        return self.spec.text


def _parse_options(query: str, text: str, dotted: bool = False) -> dict[str, Any]:
    options = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        parts = key.split(".") if dotted else [key]
        if not all(part.isidentifier() for part in parts) or len(parts) > _MAX_OPTION_NESTING:
            raise UtuneError(f"bad option {key!r} in model spec {text!r}: options are name=value pairs joined by '&'")
        try:
            options[key] = yaml.safe_load(value) if value else True
        except yaml.YAMLError:
            options[key] = value
    return options


def parse_model_spec(text: str) -> ModelSpec:
    body, _, query = text.partition("?")
    options = _parse_options(query, text, dotted=body.startswith("hf:"))
    if body.startswith("timm:"):
        return ModelSpec(text, "timm", body[len("timm:") :], None, options)
    if body.startswith("hf:"):
        return ModelSpec(text, "hf", body[len("hf:") :], None, options)
    if body.endswith(".json"):
        return ModelSpec(text, "card", body, None, options)
    path, sep, attribute = body.rpartition(":")
    if not sep or not path or not attribute:
        hint = f"; did you mean timm:{body}?" if _is_timm_model(body) else ""
        raise UtuneError(
            f"cannot read model spec {text!r}: use timm:NAME, hf:MODEL_TYPE, package.module:callable or path/to/file.py:callable{hint}"
        )
    source = "file" if path.endswith(".py") or "/" in path or "\\" in path else "import"
    return ModelSpec(text, source, path, attribute, options)


def with_weights(text: str, weights: str) -> str:
    """The spec with ``weights=FILE`` added (what ``--weights FILE`` means), for timm and card specs."""
    spec = parse_model_spec(text)
    if spec.source not in ("timm", "card"):
        raise UtuneError(
            f"--weights applies to timm:NAME and card .json specs, not {text!r}; load the weights "
            "in the function the spec names"
        )
    if "weights" in spec.options:
        raise UtuneError(f"{text!r} already names weights; give them once, in the spec or with --weights")
    return f"{text}{'&' if '?' in text else '?'}{urlencode({'weights': weights}, safe='/:~')}"


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _is_plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return (
        isinstance(value, (list, tuple)) and depth < _MAX_OPTION_NESTING and all(_is_plain(v, depth + 1) for v in value)
    )


def check_data_options(spec: ModelSpec) -> None:
    """A timm, hf or card spec's options are data: no loader settings, no mappings, nothing that can name code."""
    if spec.source == "hf":
        from utune_fx.specs_hf import check_hf_options

        check_hf_options(spec)
    for key, value in spec.options.items():
        if key in _LOADER_OPTIONS:
            raise UtuneError(
                f"option {key!r} in model spec {spec.text!r} makes timm read files or loader settings (pickles "
                "included); give pretrained weights as weights=FILE.safetensors"
            )
        if not _is_plain(value):
            raise UtuneError(
                f"option {key} in model spec {spec.text!r} is a {type(value).__name__}; options are numbers, "
                "strings, booleans or lists of them"
            )
        if _COUNT_OPTION.search(key):
            multiplier = "multiplier" in key.lower()
            bound = MAX_MULTIPLIER_OPTION if multiplier else MAX_COUNT_OPTION
            if any(number > bound for number in _numbers(value)):
                raise UtuneError(
                    f"option {key}={value!r} in model spec {spec.text!r}: block and layer counts are at most {bound} "
                    f"({'MAX_MULTIPLIER_OPTION' if multiplier else 'MAX_COUNT_OPTION'} in utune_fx/specs.py)"
                )


def _numbers(value: Any) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [number for item in value for number in _numbers(item)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _create_timm(spec: ModelSpec) -> nn.Module:
    import timm

    check_data_options(spec)
    if not timm.is_model(spec.target):
        close = difflib.get_close_matches(spec.target, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
        raise UtuneError(f"unknown timm model {spec.target!r} in {spec.text!r}; {hint}")
    options = {"pretrained": False, **spec.options}
    weights = options.pop("weights", None)
    _check_model_size(spec, options)
    try:
        model = timm.create_model(spec.target, **options)
    except TypeError as error:
        raise UtuneError(
            f"timm model {spec.target!r} rejects the options in {spec.text!r} ({first_line(error)})"
        ) from error
    except Exception as error:
        if options.get("pretrained"):
            raise UtuneError(
                f"cannot load pretrained weights for {spec.target!r} ({first_line(error)}); "
                "use pretrained=false, or put the weights in the Hugging Face cache"
            ) from error
        raise UtuneError(f"timm could not build {spec.text!r} ({first_line(error)})") from error
    if weights is not None:
        from utune_fx.weights import load_weights

        load_weights(model, str(weights))
    elif options.get("pretrained") and _classes_changed(model, options):
        from utune_fx.weights import start_fresh_classifier

        start_fresh_classifier(model)  # timm left the dropped classifier at its from-scratch init
    return model


def _classes_changed(model: nn.Module, options: dict) -> bool:
    """Whether timm built the classifier for other classes than its pretrained weights hold."""
    trained = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    return "num_classes" in options and trained is not None and options["num_classes"] != trained


def _check_model_size(spec: ModelSpec, options: dict) -> None:
    import timm

    check_fits(
        spec.text,
        lambda: timm.create_model(spec.target, **{**options, "pretrained": False}),
        "img_size, num_classes, depth, embed_dim...",
    )


def check_fits(text: str, build: Callable[[], nn.Module], size_options: str) -> None:
    """Before allocating: the model ``build`` makes on the meta device (no memory) must fit in what is
    available, so img_size=10**6 or num_classes=10**12 is one line, not a crash."""
    from utune_fx.memory import available_memory

    available = available_memory()
    if available is None:
        return
    try:
        with torch.device("meta"):
            meta = build()
    except Exception:  # the real build says what is wrong with the options
        return
    need = sum(t.numel() * t.element_size() for t in (*meta.parameters(), *meta.buffers()))
    if need > MODEL_MEMORY_SHARE * available:
        raise UtuneError(
            f"model spec {text!r}: the model's weights would take {need / 2**30:,.1f} GiB, over "
            f"{MODEL_MEMORY_SHARE:.0%} of the {available / 2**30:,.1f} GiB of memory available; check its "
            f"size options ({size_options})"
        )


def _import_attribute(spec: ModelSpec) -> Any:
    if spec.source == "file":
        path = Path(spec.target)
        if not path.is_file():
            raise UtuneError(f"model file {str(path)!r} not found (from {spec.text!r}); check the path")
        module_name = f"utune_fx_user_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as error:
            raise UtuneError(
                f"importing {str(path)!r} failed ({first_line(error)}); run it with python to see why"
            ) from error
    else:
        try:
            module = importlib.import_module(spec.target)
        except ImportError as error:
            raise UtuneError(
                f"cannot import module {spec.target!r} for {spec.text!r} ({first_line(error)}); "
                "is the package installed?"
            ) from error
    try:
        return getattr(module, spec.attribute)
    except AttributeError:
        raise UtuneError(f"{spec.target!r} has no attribute {spec.attribute!r} (from {spec.text!r})") from None


def build_model(spec: ModelSpec) -> nn.Module:
    if spec.source == "timm":
        return _create_timm(spec)
    if spec.source == "hf":
        from utune_fx.specs_hf import create_hf

        return create_hf(spec)
    if spec.source == "card":
        from utune_fx.cards import create_from_card

        return create_from_card(spec)
    found = _import_attribute(spec)
    where = f"{spec.target}:{spec.attribute}"
    if isinstance(found, nn.Module):
        if spec.options:
            raise UtuneError(f"{where} is a module instance; options {sorted(spec.options)} cannot apply to it")
        return found
    if not callable(found):
        raise UtuneError(f"{where} is a {type(found).__name__}, not a callable or nn.Module")
    try:
        model = found(**spec.options)
    except Exception as error:
        raise UtuneError(f"calling {where}({', '.join(spec.options)}) failed ({first_line(error)})") from error
    if not isinstance(model, nn.Module):
        kind = "class" if inspect.isclass(found) else "callable"
        raise UtuneError(
            f"{kind} {where} returned {type(model).__name__}, not a torch.nn.Module; it must build and return the model"
        )
    return model


def parse_input_shape(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    dims, _, dtype_name = text.partition(":")
    dtype_name = dtype_name or "float32"
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UtuneError(
            f"bad --input-shape {text!r}: expected positive integers joined by commas, "
            "e.g. 2,3,224,224 (optionally :int64)"
        )
    if dtype_name not in _DTYPES:
        raise UtuneError(f"bad dtype {dtype_name!r} in --input-shape {text!r}; use one of {', '.join(_DTYPES)}")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise UtuneError(
            f"--input-shape {text!r}: {math.prod(shape):,} elements is over the limit of {MAX_INPUT_ELEMENTS:,} "
            "for an example input; a small example will do (the batch axis stays dynamic on export)"
        )
    return shape, _DTYPES[dtype_name]


def timm_input_size(model: nn.Module, options: dict) -> tuple[int, int, int] | None:
    """(channels, height, width) from timm's pretrained config with the options' img_size/in_chans applied
    (timm leaves the config at the pretrained size when img_size changes)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" not in cfg:
        return None
    channels, height, width = cfg["input_size"]
    img_size = options.get("img_size")
    if isinstance(img_size, int):
        height = width = img_size
    elif isinstance(img_size, (list, tuple)) and len(img_size) == 2:
        height, width = img_size
    return options.get("in_chans", channels), height, width


def make_inputs(shapes: list[tuple[tuple[int, ...], torch.dtype]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs; integer inputs (token ids) are 0 or 1, valid for any vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=generator, dtype=dtype)
        if dtype.is_floating_point
        else torch.randint(0, 2, shape, generator=generator).to(dtype)
        for shape, dtype in shapes
    )


def load_model(text: str, input_shapes: list[str] | None = None, module: nn.Module | None = None) -> LoadedModel:
    """Build the model a spec names (seeded: random weights repeat), in eval mode, with example inputs.
    With ``module`` (a model the caller built), nothing is built: ``text`` then only tells its input size."""
    spec = parse_model_spec(text)
    parsed = [parse_input_shape(s) for s in input_shapes or []]  # check before building
    if module is not None:
        model = module.eval()
    else:
        with torch.random.fork_rng():  # randomly initialised models are the same every time; caller's RNG untouched
            torch.manual_seed(0)
            model = build_model(spec).eval()
    if not parsed and spec.source == "hf":
        from utune_fx.specs_hf import hf_inputs

        return LoadedModel(spec, model, hf_inputs(model, text))
    if not parsed:
        size = timm_input_size(model, spec.options) if spec.source in ("timm", "card") else None
        if size is None:
            raise UtuneError(
                f"cannot tell the input shape of {text!r}; pass --input-shape, e.g. --input-shape 2,3,224,224"
            )
        parsed = [((DEFAULT_BATCH, *size), torch.float32)]
    return LoadedModel(spec, model, make_inputs(parsed))

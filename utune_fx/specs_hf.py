"""Hugging Face transformers models as data specs: a config with random weights, no download.

    hf:gpt2?n_layer=2&n_embd=64               AutoModel.from_config(AutoConfig.for_model("gpt2", n_layer=2, ...))
    hf:gpt2/causal-lm?n_layer=2               AutoModelForCausalLM (the task after the slash, see TASKS)
    hf:clip?text_config.hidden_size=32        a dotted option sets a field of a sub-config
    hf_inputs(model) -> (input_ids,) | (input_ids, attention_mask, decoder_input_ids) | (pixel_values,) ...

The spec names a model type transformers registers (``AutoConfig.for_model``), never a repository:
nothing is downloaded, imported by name or unpickled. Options are YAML scalars as for timm specs;
those that load code, weights or files (``trust_remote_code``, ``quantization_config``, names starting
with ``_``...) are refused, layer counts are bounded, and the model's size is checked on the meta
device before any memory is taken.

Example inputs follow the model's ``forward`` signature, in its order: token ids (int64, drawn from
the vocabulary; 8 tokens, 5 for the decoder of an encoder-decoder, so self- and cross-attention read
sequences of different lengths), ``pixel_values`` at the config's image size (64 where it has none),
``input_features`` (log-mel frames, Whisper-style) or ``input_values`` (raw audio long enough for 8
frames of the feature encoder); an ``attention_mask`` between them is all ones; ``noise`` where the
config has a ``mask_ratio`` (ViT-MAE draws it in forward to choose the patches it keeps: given, two runs
mask alike), one number per patch. Batch 2.
"""

from __future__ import annotations

import difflib
import inspect

import torch
from torch import nn

from utune_fx.errors import UtuneError, first_line

TASKS = {
    "": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
    "audio-classification": "AutoModelForAudioClassification",
    "ctc": "AutoModelForCTC",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
}
# config fields that load code, weights or files, or reach into the loader
REFUSED_OPTIONS = (
    "trust_remote_code",
    "auto_map",
    "quantization_config",
    "name_or_path",
    "use_pretrained_backbone",
    "backbone",
    "cache_dir",
    "revision",
    "token",
    "weights",
)
SEQUENCE, DECODER_SEQUENCE, AUDIO_FRAMES, BATCH = 8, 5, 8, 2


def split_target(target: str, text: str) -> tuple[str, str]:
    """'gpt2/causal-lm' -> ('gpt2', 'AutoModelForCausalLM'); unknown types and tasks are one line."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type, _, task = target.partition("/")
    if model_type not in CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "hf: takes a model type transformers registers"
        raise UtuneError(f"unknown transformers model type {model_type!r} in {text!r}; {hint}")
    if task not in TASKS:
        raise UtuneError(f"unknown task {task!r} in {text!r}; use one of {', '.join(t for t in TASKS if t)}")
    return model_type, TASKS[task]


def nest_options(options: dict) -> dict:
    """{'text_config.hidden_size': 32} -> {'text_config': {'hidden_size': 32}}."""
    nested: dict = {}
    for key, value in options.items():
        *parents, leaf = key.split(".")
        place = nested
        for parent in parents:
            place = place.setdefault(parent, {})
            if not isinstance(place, dict):
                raise UtuneError(f"option {key} sets a field of {parent}, which another option sets to a value")
        place[leaf] = value
    return nested


def check_hf_options(spec) -> None:
    for key in spec.options:
        for part in key.split("."):
            if part.startswith("_") or part in REFUSED_OPTIONS:
                raise UtuneError(
                    f"option {key!r} in model spec {spec.text!r} loads code, weights or files; an hf: spec "
                    "builds a config with random weights, so leave it out"
                )


def create_hf(spec) -> nn.Module:
    import transformers

    from utune_fx.specs import check_data_options, check_fits

    check_data_options(spec)
    model_type, auto_class = split_target(spec.target, spec.text)
    try:
        config = transformers.AutoConfig.for_model(model_type, **nest_options(spec.options))
    except Exception as error:
        raise UtuneError(f"transformers rejects the config in {spec.text!r} ({first_line(error)})") from error
    builder = getattr(transformers, auto_class)
    check_fits(spec.text, lambda: builder.from_config(config), "hidden_size, num_hidden_layers, vocab_size...")
    try:
        return builder.from_config(config)
    except Exception as error:
        raise UtuneError(f"transformers could not build {spec.text!r} ({first_line(error)})") from error


def _configs(config) -> list:
    """The config and its sub-configs (text_config, vision_config, encoder, ...), outermost first."""
    found = [config]
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            found += _configs(sub)
    return found


def _field(config, *names):
    for sub in _configs(config):
        for name in names:
            value = getattr(sub, name, None)
            if value is not None:
                return value
    return None


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)[:2]


def _audio_length(config) -> int:
    """Raw-audio samples for AUDIO_FRAMES frames of the conv feature encoder."""
    kernels, strides = _field(config, "conv_kernel"), _field(config, "conv_stride")
    receptive, jump = 1, 1
    for kernel, stride in zip(kernels, strides):
        receptive += (kernel - 1) * jump
        jump *= stride
    return receptive + jump * (AUDIO_FRAMES - 1)


def _input(name: str, config, generator: torch.Generator) -> torch.Tensor | None:
    if name in ("input_ids", "decoder_input_ids"):
        vocab = _field(config, "vocab_size")
        length = DECODER_SEQUENCE if name == "decoder_input_ids" else SEQUENCE
        return torch.randint(0, vocab, (BATCH, length), generator=generator)
    if name == "pixel_values":
        channels = _field(config, "num_channels") or 3
        return torch.randn(BATCH, channels, *_pair(_field(config, "image_size") or 64), generator=generator)
    if name == "input_features":
        mel, positions = _field(config, "num_mel_bins"), _field(config, "max_source_positions")
        return torch.randn(BATCH, mel, 2 * positions, generator=generator)  # two conv frames per position
    if name == "input_values":
        return torch.randn(BATCH, _audio_length(config), generator=generator)
    if name == "noise" and _field(config, "mask_ratio") is not None:  # MAE: which patches its masking keeps
        (height, width), (across, down) = _pair(_field(config, "image_size") or 64), _pair(_field(config, "patch_size"))
        return torch.rand(BATCH, (height // across) * (width // down), generator=generator)
    return None


def hf_inputs(model: nn.Module, text: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Example inputs in ``forward``'s order, from the model's config (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    inputs: list[torch.Tensor] = []
    between: list[str] = []  # parameters after the first input: one before a later input needs a tensor too
    for parameter in inspect.signature(model.forward).parameters.values():
        skip = parameter.name == "decoder_input_ids" and not encoder_decoder
        value = None if skip else _input(parameter.name, config, generator)
        required = parameter.default is inspect.Parameter.empty and parameter.kind is parameter.POSITIONAL_OR_KEYWORD
        if value is None:
            if required and not inputs:
                raise UtuneError(f"cannot tell the example input {parameter.name!r} of {text!r}; pass --input-shape")
            if inputs:
                between.append(parameter.name)
            continue
        for name in between:
            if name != "attention_mask":
                raise UtuneError(f"cannot tell the example input {name!r} of {text!r}; pass --input-shape")
            inputs.append(torch.ones(inputs[0].shape[:2], dtype=torch.int64))
        between = []
        inputs.append(value)
    if not inputs:
        raise UtuneError(f"cannot tell the example inputs of {text!r}; pass --input-shape for each input")
    return tuple(inputs)

"""The transformers catalogue: each family as an ``hf:`` spec from a small config (random weights, no
download), with the attention and FFN counts its config gives.

    HF_MODELS["gpt2"] -> "hf:gpt2/causal-lm?n_layer=2&n_embd=32&n_head=2&vocab_size=1000"
    expected_counts(config) -> {"self_attention": 2, "cross_attention": 0, "ffn": 2}

Counts from the config, not from the model: an encoder-decoder has ``encoder_layers +
decoder_layers`` self-attentions, ``decoder_layers`` cross-attentions and as many FFNs as layers (T5:
``num_layers``, ``num_decoder_layers``); a model whose stages have ``depths`` (Swin) has their sum; a
config without attention heads (ConvNeXt) has no attention and so no transformer FFN; a composite
model (CLIP, SigLIP) adds its sub-configs up; any other has ``num_hidden_layers`` of each (ALBERT's
shared layer counts once per run). A head with its own attention (SigLIP's attention-pooling head:
a learned query attending to the tokens, then an MLP) is one more cross-attention and FFN, read from
the config field that switches it on (``HEADS``).

Beyond the curated entries, the catalogue holds every other model type that builds from a shrunk
config on CPU with its config's attentions, found by ``python -m utune_fx.zoo.hf_discover`` and
shipped as data (hf_discovered.json): ``hf_models()`` is both, curated first; their ground truth is
the same ``expected_counts``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import urlencode

import yaml

# sizes every entry shares where the config spells them so: 2 layers, width 32, 2 heads
_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
_VISION = {**_TEXT, "image_size": 32, "patch_size": 8}
_DECODER = {**_TEXT, "vocab_size": 1000, "num_key_value_heads": 2}
_SEQ2SEQ = {
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
}
_CLIP = {
    **{f"text_config.{k}": v for k, v in _TEXT.items()},
    **{f"vision_config.{k}": v for k, v in _VISION.items()},
    "projection_dim": 16,
}


def _spec(model_type: str, options: dict) -> str:
    return f"hf:{model_type}?{urlencode({k: _yaml(v) for k, v in options.items()}, safe='[],')}"


make_spec = _spec  # hf_discover writes its entries in the same form


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


HF_MODELS = {
    # decoder-only language models
    "gpt2": _spec("gpt2/causal-lm", {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 1000}),
    "gpt_neo": _spec(
        "gpt_neo/causal-lm",
        {"num_layers": 2, "attention_types": [[["global", "local"], 1]], "hidden_size": 32, "num_heads": 2}
        | {"vocab_size": 1000, "window_size": 4},
    ),
    "gpt_neox": _spec("gpt_neox/causal-lm", _DECODER),
    "llama": _spec("llama/causal-lm", _DECODER),
    "mistral": _spec("mistral/causal-lm", {**_DECODER, "num_key_value_heads": 1}),
    "qwen2": _spec("qwen2/causal-lm", _DECODER),
    "qwen3": _spec("qwen3/causal-lm", {**_DECODER, "head_dim": 16}),
    "gemma": _spec("gemma/causal-lm", {**_DECODER, "head_dim": 16, "num_key_value_heads": 1}),
    "gemma2": _spec("gemma2/causal-lm", {**_DECODER, "head_dim": 16, "num_key_value_heads": 1}),
    "phi": _spec("phi/causal-lm", _DECODER),
    "phi3": _spec("phi3/causal-lm", {**_DECODER, "pad_token_id": 0}),
    "stablelm": _spec("stablelm/causal-lm", _DECODER),
    "opt": _spec("opt/causal-lm", {**_DECODER, "ffn_dim": 64, "word_embed_proj_dim": 32}),
    "falcon": _spec("falcon/causal-lm", {**_DECODER, "num_kv_heads": 2}),
    "bloom": _spec("bloom/causal-lm", {"n_layer": 2, "hidden_size": 32, "n_head": 2, "vocab_size": 1000}),
    "gptj": _spec("gptj/causal-lm", {"n_layer": 2, "n_embd": 32, "n_head": 2, "rotary_dim": 8, "vocab_size": 1000}),
    "codegen": _spec(
        "codegen/causal-lm", {"n_layer": 2, "n_embd": 32, "n_head": 2, "rotary_dim": 8, "vocab_size": 1000}
    ),
    # encoders
    "bert": _spec("bert", {**_TEXT, "vocab_size": 1000}),
    "roberta": _spec("roberta/sequence-classification", {**_TEXT, "vocab_size": 1000}),
    "xlm-roberta": _spec("xlm-roberta/masked-lm", {**_TEXT, "vocab_size": 1000}),
    "distilbert": _spec(
        "distilbert/sequence-classification", {"n_layers": 2, "dim": 32, "n_heads": 2, "hidden_dim": 64}
    ),
    "albert": _spec("albert", {**_TEXT, "embedding_size": 16, "vocab_size": 1000}),
    "electra": _spec("electra/token-classification", {**_TEXT, "embedding_size": 16, "vocab_size": 1000}),
    "deberta-v2": _spec("deberta-v2/sequence-classification", {**_TEXT, "vocab_size": 1000}),
    "mpnet": _spec("mpnet", {**_TEXT, "vocab_size": 1000}),
    "mobilebert": _spec(
        "mobilebert",
        {**_TEXT, "embedding_size": 16, "intra_bottleneck_size": 32, "num_feedforward_networks": 1}
        | {"vocab_size": 1000},
    ),
    # encoder-decoders
    "t5": _spec(
        "t5/seq2seq-lm",
        {"num_layers": 2, "num_decoder_layers": 2, "d_model": 32, "d_kv": 16, "num_heads": 2, "d_ff": 64}
        | {"vocab_size": 1000},
    ),
    "bart": _spec("bart", {**_SEQ2SEQ, "vocab_size": 1000}),
    "pegasus": _spec("pegasus/seq2seq-lm", {**_SEQ2SEQ, "vocab_size": 1000}),
    "mbart": _spec("mbart/seq2seq-lm", {**_SEQ2SEQ, "vocab_size": 1000}),
    "whisper": _spec("whisper", {**_SEQ2SEQ, "num_mel_bins": 16, "max_source_positions": 16}),
    # vision
    "vit": _spec("vit/image-classification", _VISION),
    "deit": _spec("deit/image-classification", {**_VISION, "architectures": ["DeiTForImageClassification"]}),
    "beit": _spec("beit/image-classification", _VISION),
    "dinov2": _spec("dinov2", _VISION),
    "swin": _spec(
        "swin/image-classification",
        {"image_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 4},
    ),
    "convnext": _spec(
        "convnext/image-classification", {"image_size": 32, "hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2}
    ),
    # text and image
    "clip": _spec("clip", _CLIP),
    "siglip": _spec("siglip", {k: v for k, v in _CLIP.items() if k != "projection_dim"}),
    # audio
    "wav2vec2": _spec(
        "wav2vec2",
        {**_TEXT, "conv_dim": [16, 16], "conv_kernel": [10, 3], "conv_stride": [5, 2]}
        | {"num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2},
    ),
    # text to speech: VITS samples its durations and its latent with noise scaled by these two; at 0
    # the waveform (and its length) is the same on every run, as the zoo's comparisons need
    "vits": _spec(
        "vits",
        {"hidden_size": 32, "num_hidden_layers": 2, "ffn_dim": 64} | {"noise_scale": 0.0, "noise_scale_duration": 0.0},
    ),
}
# CI: one of each kind (decoder, encoder, encoder-decoder, vision, text-image, audio, mixture of
# experts: afmoe's router is zero-initialised and its experts call transformers::grouped_mm_fallback;
# hiera pools its skip after the attention, which a parallel tuner reads)
CI_SAMPLE = ("gpt2", "llama", "bert", "t5", "bart", "vit", "swin", "clip", "wav2vec2", "afmoe", "hiera")
# config fields that switch on a head with its own attention (one cross-attention and one FFN each)
HEADS = ("vision_use_head",)


DISCOVERED_JSON = Path(__file__).with_name("hf_discovered.json")


def spec_model_type(spec: str) -> str:
    """'hf:gpt2/causal-lm?n_layer=2' -> 'gpt2'."""
    return spec.removeprefix("hf:").partition("?")[0].partition("/")[0]


@functools.cache
def read_discovered(path: Path = DISCOVERED_JSON) -> dict:
    """hf_discover's file, checked: the schema, and each spec builds the model type it is filed under."""
    from utune_fx.errors import UtuneError
    from utune_fx.schemas import read_json

    content = read_json(path, "hf_discovered", "rerun python -m utune_fx.zoo.hf_discover")
    for name, entry in content["models"].items():
        if "spec" in entry and spec_model_type(entry["spec"]) != name:
            raise UtuneError(
                f"{path}: models.{name}.spec: builds {spec_model_type(entry['spec'])!r}, not {name!r}; "
                "rerun python -m utune_fx.zoo.hf_discover"
            )
    return content


def hf_models() -> dict[str, str]:
    """Every entry, name -> spec: the curated ones, then those hf_discover found (by model type)."""
    discovered = read_discovered()["models"]
    return HF_MODELS | {name: e["spec"] for name, e in discovered.items() if "spec" in e and name not in HF_MODELS}


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def expected_counts(config) -> dict[str, int]:
    """Self-attentions, cross-attentions and FFNs from the config (see the module docstring)."""
    subs = [
        getattr(config, name) for name in (getattr(config, "sub_configs", None) or {}) if getattr(config, name, None)
    ]
    if subs and not getattr(config, "is_encoder_decoder", False):
        totals = {"self_attention": 0, "cross_attention": 0, "ffn": 0}
        for sub in subs:
            for count, number in expected_counts(sub).items():
                totals[count] += number
        return totals
    heads = sum(bool(getattr(config, field, False)) for field in HEADS)
    if _first(config, "num_attention_heads", "num_heads", "encoder_attention_heads") is None:
        return {"self_attention": 0, "cross_attention": 0, "ffn": 0}
    if getattr(config, "is_encoder_decoder", False):
        encoder = _first(config, "encoder_layers", "num_layers")
        decoder = _first(config, "decoder_layers", "num_decoder_layers", default=encoder)
        return {"self_attention": encoder + decoder, "cross_attention": decoder, "ffn": encoder + decoder}
    depths = getattr(config, "depths", None)
    layers = sum(depths) if isinstance(depths, (list, tuple)) else config.num_hidden_layers
    return {"self_attention": layers, "cross_attention": heads, "ffn": layers + heads}

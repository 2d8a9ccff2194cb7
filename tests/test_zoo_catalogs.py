"""The transformers and torchvision catalogues: their ground truth (attention and FFN counts from the
configs and builders, attention projections from the modules), the check that fails a model whose
matches differ, and the CI samples through the whole chain to ONNX Runtime parity."""

import json
from types import SimpleNamespace

import pytest
import torch
from toy_models import transformer_decoder, transformer_encoder

import utune_fx  # noqa: F401  (before transformers, torchvision)
from utune_fx.cli import main
from utune_fx.specs import load_model
from utune_fx.trace.annotate import node_info
from utune_fx.zoo import hf_catalog, torchvision_catalog
from utune_fx.zoo.catalogs import select_models
from utune_fx.zoo.runner import done_models
from utune_fx.zoo.truth import check, structure

COUNTS = ("self_attention", "cross_attention", "ffn")


def _layers(model, *paths: str) -> int:
    """How many blocks the named ModuleLists hold (read from the built model, not the config)."""
    return sum(len(model.get_submodule(path)) for path in paths)


@pytest.mark.parametrize(
    "name,decoder,encoder,cross_heads",
    [
        ("gpt2", ("transformer.h",), (), 0),
        ("llama", ("model.layers",), (), 0),
        ("t5", ("decoder.block",), ("encoder.block",), 0),
        ("whisper", ("decoder.layers",), ("encoder.layers",), 0),
        ("clip", ("text_model.encoder.layers", "vision_model.encoder.layers"), (), 0),
        ("siglip", ("text_model.encoder.layers", "vision_model.encoder.layers"), (), 1),
    ],
)
def test_config_counts_equal_the_blocks_transformers_builds(name, decoder, encoder, cross_heads):
    model = load_model(hf_catalog.HF_MODELS[name]).model
    layers = _layers(model, *decoder, *encoder)
    expected = hf_catalog.expected_counts(model.config)
    cross = (_layers(model, *decoder) if encoder else 0) + cross_heads  # each decoder block attends to the encoder
    assert expected == {"self_attention": layers, "cross_attention": cross, "ffn": layers + cross_heads}


def test_every_catalogue_entry_runs_the_attentions_its_config_counts():
    """The structural rule (zoo/truth.py) and the config agree on every entry: one forward with hooks."""
    for name, spec in hf_catalog.HF_MODELS.items():
        loaded = load_model(spec)
        found = structure(loaded.model, loaded.inputs).counts()
        expected = hf_catalog.expected_counts(loaded.model.config)
        assert found == {c: expected[c] for c in found}, name


@pytest.mark.parametrize("name,blocks", [("swin_t", 12), ("vit_b_32", 12), ("resnet18", 0)])
def test_torchvision_counts_follow_the_builders(name, blocks):
    model = torchvision_catalog.tv_build(name)
    x = torch.randn(*torchvision_catalog.input_size(name))
    assert structure(model, (x,)).counts() == {"self_attention": blocks, "cross_attention": 0}
    assert torchvision_catalog.expected_counts(name) == {"self_attention": blocks, "cross_attention": 0, "ffn": blocks}


def test_every_torchvision_classification_model_is_in_the_catalogue():
    import torchvision

    names = torchvision_catalog.tv_models()
    assert len(names) == 80 and set(names) == set(torchvision.models.list_models(module=torchvision.models))
    assert set(torchvision_catalog.ATTENTIONS) <= set(names)


def test_self_and_cross_attention_and_projections_of_torch_transformers():
    decoder = transformer_decoder(layers=2).eval()
    found = structure(decoder, (torch.randn(2, 5, 32), torch.randn(2, 7, 32)))  # tgt, memory
    assert found.attentions == {
        f"layers.{i}.{attention}": kind
        for i in range(2)
        for attention, kind in (("self_attn", "self"), ("multihead_attn", "cross"))
    }
    assert found.projections == set(found.attentions) | {f"{path}.out_proj" for path in found.attentions}
    encoder = structure(transformer_encoder(layers=3).eval(), (torch.randn(2, 5, 32),))
    assert encoder.counts() == {"self_attention": 3, "cross_attention": 0}


def _traced_decoder():
    from utune_fx.match import load_rules, match_rules
    from utune_fx.trace import trace

    model, inputs = transformer_decoder(layers=2).eval(), (torch.randn(2, 5, 32), torch.randn(2, 7, 32))
    gm = trace(model, inputs, frontend="export")
    matches = {m.rule.name: m for rules in ("dual_utuner", "lora") for m in match_rules(gm, load_rules(rules))}
    return gm, structure(model, inputs), matches


def test_check_passes_the_truth_and_fails_wrong_counts_and_stray_lora():
    gm, truth, matches = _traced_decoder()
    expected = {"self_attention": 2, "cross_attention": 2, "ffn": 2}
    result = check(expected, truth, matches)
    assert result["problems"] == [] and {c: result["found"][c] for c in COUNTS} == expected
    assert result["found"]["lora_elsewhere"] == 0 and result["found"]["lora_on_projections"] > 0

    wrong = check({**expected, "ffn": 3}, truth, matches)["problems"]
    assert wrong == [
        "expected 2 self_attention, 2 cross_attention, 3 ffn; found 2 self_attention, 2 cross_attention, 2 ffn"
    ]

    ffn_linear = next(n for n in gm.graph.nodes if n.op == "call_function" and node_info(n).scope == "layers.0.linear2")
    stray = SimpleNamespace(rule=SimpleNamespace(tuner="lora"), regions=[SimpleNamespace(anchor=ffn_linear)])
    problems = check(expected, truth, {**matches, "lora_extra": stray})["problems"]
    assert problems == ["LoRA on 1 layer(s) outside the attention projections, e.g. layers.0.linear2"]


def test_unknown_catalogue_models_are_one_line_errors(tmp_path, capsys):
    assert main(["zoo", "--catalog", "torchvision", "--models", "resnet18,resnet9", "-o", str(tmp_path)]) == 2
    assert "resnet9 is not a torchvision model" in capsys.readouterr().err


@pytest.mark.parametrize("catalog", ["transformers", "torchvision"])
def test_each_ci_sample_has_ten_models_of_its_catalogue(catalog):
    sample = select_models(catalog, "ci")
    assert len(set(sample)) >= 10 and set(sample) <= set(select_models(catalog, "all"))


CI_MODELS = [("transformers", name) for name in hf_catalog.CI_SAMPLE] + [
    ("torchvision", name) for name in torchvision_catalog.CI_SAMPLE
]


@pytest.mark.parametrize("catalog,name", CI_MODELS)
def test_the_ci_sample_runs_the_whole_chain_with_its_ground_truth(catalog, name, tmp_path, capsys):
    """One test per model, so pytest-xdist spreads the samples over its workers."""
    assert main(["zoo", "--catalog", catalog, "--models", name, "--jobs", "1", "-o", str(tmp_path), "--json"]) == 0
    rates = json.loads(capsys.readouterr().out)["pass_rates"]
    record = done_models(tmp_path / "results.jsonl")[name]
    assert record["last_stage"] == "parity", (name, record["error"])
    found = record["truth"]["found"]
    assert {c: found[c] for c in COUNTS} == record["truth"]["expected"], name
    assert found["attention_elsewhere"] == 0, name
    if record["truth"]["expected"]["self_attention"]:  # LoRA sits on the attention projections only
        assert found["lora_on_projections"] > 0 and record["placed"]["lora"], name
        assert found["lora_elsewhere"] == 0, name
    assert rates["parity"] == [1, 1]


def test_a_projection_mixes_channels():
    from torch import nn

    from utune_fx.zoo.truth import _is_projection

    assert _is_projection(nn.Linear(8, 8)) and _is_projection(nn.Conv2d(8, 8, 1))
    assert _is_projection(nn.Conv1d(8, 8, 3, groups=2))  # per-head grouped conv (Zaya)
    assert not _is_projection(nn.Conv1d(8, 8, 3, groups=8))  # depthwise: positions only (Inkling)
    assert not _is_projection(nn.Embedding(10, 8)) and not _is_projection(nn.LayerNorm(8))

    class RelativeBias(nn.Module):  # Inkling: its own bank of profiles, read by `states @ self.proj`
        def __init__(self):
            super().__init__()
            self.linear, self.proj = nn.Linear(8, 4), nn.Parameter(torch.zeros(4, 16))

    assert _is_projection(RelativeBias())
    assert not _is_projection(nn.Sequential(nn.Linear(8, 4)))  # a container is not one, its layers are

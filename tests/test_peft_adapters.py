"""PEFT adapter directories both ways, checked by PEFT itself: ``export --format peft`` loads with
PeftModel.from_pretrained and gives the tuned outputs; an adapter that PEFT saved imports as a tuned
artifact with PEFT's outputs, folded too; hostile adapter_config.json files are one line, exit 2."""

import copy
import json
import re
import shutil

import pytest
import safetensors.torch
import torch

from utune_fx.cli import main
from utune_fx.errors import UtuneError
from utune_fx.fold import fold
from utune_fx.match import load_rules
from utune_fx.peft_export import write_peft
from utune_fx.peft_import import imported
from utune_fx.peft_layers import CONFIG, WEIGHTS, peft_sites
from utune_fx.rewrite.artifact import TunedSource, build_tuned, load_tuned, save_tuned
from utune_fx.specs import load_model

peft = pytest.importorskip("peft")
VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2&num_classes=5"
GPT2 = "hf:gpt2/causal-lm?n_layer=1&n_embd=32&n_head=2&vocab_size=50&n_positions=16&bos_token_id=0&eos_token_id=0"
# LoRA of two ranks and alphas (rank_pattern, alpha_pattern) and the classifier (modules_to_save)
VIT_RULES = """version: 1
rules:
  - {name: qkv, match: {node: {kind: linear, scope: "**.qkv"}}, tuner: lora, settings: {rank: 4, alpha: 8}}
  - {name: fc1, match: {node: {kind: linear, scope: "**.fc1"}}, tuner: lora, settings: {rank: 2, alpha: 3}}
  - {name: classifier, match: head, tuner: head}
"""
EXACT = 1e-5


def _away_from_identity(result, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in result.module.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.1)
    return result


def _built(tmp_path, spec, rules_text, frontend="auto"):
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text)
    return _away_from_identity(build_tuned(TunedSource(spec, [], frontend), [load_rules(path)]))


def _first(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output[0]


def _peft_outputs(spec, directory, inputs):
    """PEFT's outputs with the adapter at ``directory`` on a freshly built base model, and the base's."""
    base = load_model(spec).model
    with torch.no_grad():
        plain = _first(base(*inputs))
        model = peft.PeftModel.from_pretrained(base, str(directory)).eval()
        return _first(model(*inputs)), plain


def _max_difference(a, b) -> float:
    return float((_first(a).double() - _first(b).double()).abs().max())


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A ViT LoRA artifact away from identity, and its tuned outputs."""
    tmp = tmp_path_factory.mktemp("vit")
    result = _built(tmp, VIT, VIT_RULES)
    directory = save_tuned(result, result.rule_sets, result.source, tmp / "tuned")
    with torch.no_grad():
        expected = result.module(*result.example_inputs)
    return directory, result.example_inputs, expected


@pytest.fixture(scope="module")
def peft_vit(tmp_path_factory):
    """An adapter made by PEFT itself: LoRA on every qkv (r 4) and fc2 (r 2 by rank_pattern), B away from zero."""
    tmp = tmp_path_factory.mktemp("peft_vit")
    loaded = load_model(VIT)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["qkv", "fc2"],
        rank_pattern={"fc2": 2},
        alpha_pattern={"blocks.1.attn.qkv": 5},
    )
    model = peft.get_peft_model(copy.deepcopy(loaded.model), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
        expected = model(*loaded.inputs)
        merged = copy.deepcopy(model).merge_and_unload()(*loaded.inputs)
    model.save_pretrained(tmp / "adapter")
    return tmp / "adapter", loaded.inputs, expected, merged


def test_export_of_a_vit_lora_artifact_loads_in_peft_with_the_tuned_outputs(vit, tmp_path, capsys):
    directory, inputs, expected = vit
    assert main(["export", str(directory), "--format", "peft", "-o", str(tmp_path / "adapter")]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == VIT
    assert (config["r"], config["lora_alpha"]) in ((4, 8), (2, 3)) and config["modules_to_save"] == ["head"]
    assert len(config["rank_pattern"]) == len(config["alpha_pattern"]) == 2  # the other rule's two modules
    keys = safetensors.torch.load_file(str(tmp_path / "adapter" / WEIGHTS))
    assert "base_model.model.blocks.0.attn.qkv.lora_A.weight" in keys and "base_model.model.head.weight" in keys
    actual, plain = _peft_outputs(VIT, tmp_path / "adapter", inputs)
    assert _max_difference(plain, expected) > 1e-2  # the tuners (and the head) change the outputs
    print(f"ViT, utune_fx -> PEFT: max abs difference {_max_difference(actual, expected):.1e}")
    torch.testing.assert_close(actual, expected, atol=EXACT, rtol=EXACT)


def test_gpt2_lora_round_trips_through_peft_both_ways(tmp_path):
    """transformers' Conv1D (fan_in_fan_out) under the torch.export front end: out to PEFT, and back."""
    pytest.importorskip("transformers")
    rules = "version: 1\nrules:\n  - {name: lora, match: {node: {kind: linear, scope: '**.attn.*'}}, tuner: lora}\n"
    result = _built(tmp_path, GPT2, rules, frontend="export")  # fx cannot trace GPT-2: skip its attempt
    with torch.no_grad():
        expected = _first(result.module(*result.example_inputs))
    report = write_peft(result, tmp_path / "adapter")
    assert report["peft_relative_difference"] <= EXACT and len(report["modules"]) == 2
    assert json.loads((tmp_path / "adapter" / CONFIG).read_text())["fan_in_fan_out"] is True
    actual, plain = _peft_outputs(GPT2, tmp_path / "adapter", result.example_inputs)
    assert _max_difference(plain, expected) > 1e-3
    print(f"GPT-2, utune_fx -> PEFT: max abs difference {_max_difference(actual, expected):.1e}")
    torch.testing.assert_close(actual, expected, atol=EXACT, rtol=EXACT)

    back, _ = imported(tmp_path / "adapter", model=GPT2, frontend="export")  # PEFT's directory -> utune_fx
    with torch.no_grad():
        again = _first(back.module(*result.example_inputs))
    print(f"GPT-2, PEFT -> utune_fx: max abs difference {_max_difference(again, actual):.1e}")
    torch.testing.assert_close(again, actual, atol=EXACT, rtol=EXACT)


def test_a_peft_made_adapter_imports_folds_and_exports_back(peft_vit, tmp_path, capsys):
    adapter, inputs, expected, merged = peft_vit
    out = tmp_path / "imported"
    assert main(["import-peft", str(adapter), "--model", VIT, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "LoRA on 4 modules" in text and "r = 2" in text
    result = load_tuned(out)  # an ordinary tuned artifact
    with torch.no_grad():
        ours = result.module(*inputs)
        folded = fold(result.module, result.summaries)
        ours_folded = folded.module(*inputs)
    print(f"ViT, PEFT -> utune_fx: max abs difference {_max_difference(ours, expected):.1e}")
    torch.testing.assert_close(ours, expected, atol=EXACT, rtol=EXACT)
    assert [entry.status for entry in folded.entries] == ["folded"] * 4
    print(f"ViT, PEFT -> utune_fx folded vs PEFT merged: {_max_difference(ours_folded, merged):.1e}")
    torch.testing.assert_close(ours_folded, merged, atol=EXACT, rtol=EXACT)

    write_peft(result, tmp_path / "again")  # and back: PEFT's own tensors, bit for bit
    original = safetensors.torch.load_file(str(adapter / WEIGHTS))
    again = safetensors.torch.load_file(str(tmp_path / "again" / WEIGHTS))
    assert original.keys() == again.keys()
    for key, tensor in original.items():
        assert torch.equal(tensor, again[key]), key


def test_ia3_style_scale_exports_as_peft_ia3(tmp_path):
    """scale_shift without shift after qkv (IA3 on its output) and on fc2's input (feedforward IA3)."""
    rules = """version: 1
rules:
  - {name: qkv, match: {node: {kind: linear, scope: "**.qkv"}}, tuner: scale_shift, settings: {shift: false}}
  - {name: ffn, match: {node: {kind: act, scope: "**.mlp.act"}}, tuner: scale_shift, settings: {shift: false}}
"""
    result = _built(tmp_path, VIT, rules)
    with torch.no_grad():
        expected = result.module(*result.example_inputs)
    report = write_peft(result, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / CONFIG).read_text())
    assert report["peft_type"] == config["peft_type"] == "IA3"
    assert config["feedforward_modules"] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    actual, plain = _peft_outputs(VIT, tmp_path / "adapter", result.example_inputs)
    assert _max_difference(plain, expected) > 1e-2
    print(f"ViT IA3, utune_fx -> PEFT: max abs difference {_max_difference(actual, expected):.1e}")
    torch.testing.assert_close(actual, expected, atol=EXACT, rtol=EXACT)


def test_tuners_peft_cannot_hold_are_refused_with_the_reason(tmp_path, capsys):
    adapter = _built(tmp_path, VIT, "version: 1\nrules:\n  - {name: mha, match: attention, tuner: parallel_adapter}\n")
    with pytest.raises(UtuneError, match=r"rule 'mha': the parallel_adapter tuner utune\.mha\.0 cannot be a PEFT"):
        peft_sites(adapter)
    shifted = _built(
        tmp_path, VIT, "version: 1\nrules:\n  - {name: ssf, match: {node: {kind: linear}}, tuner: scale_shift}\n"
    )
    with pytest.raises(UtuneError, match=r"its shift is not zero"):
        peft_sites(shifted)
    directory = save_tuned(adapter, adapter.rule_sets, adapter.source, tmp_path / "adapter_artifact")
    assert main(["export", str(directory), "--format", "peft", "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "parallel_adapter" in error and "PEFT" in error
    assert not (tmp_path / "out").exists()


def _hostile(peft_vit, tmp_path, edit=None, text=None):
    adapter = tmp_path / "hostile"
    shutil.copytree(peft_vit[0], adapter)
    config = json.loads((adapter / CONFIG).read_text())
    if edit is not None:
        edit(config)
    (adapter / CONFIG).write_text(text if text is not None else json.dumps(config))
    return adapter


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda c: c.update(r="4"), r"r: '4' is not of type 'integer'"),
        (lambda c: c.update(peft_type="IA3"), r"peft_type: 'LORA' was expected"),
        (lambda c: c.update(use_dora=True), r"use_dora: True is not one of"),
        (lambda c: c.update(bias="all"), r"bias: 'none' was expected"),
        (lambda c: c.update(init_lora_weights="pissa"), r"init_lora_weights: 'pissa' is not one of"),
        (lambda c: c.update(modules_to_save=["head"]), r"modules_to_save: \['head'\] is not one of"),
        (lambda c: c.update(layer_replication=[[0, 1]]), r"layer_replication"),
        (lambda c: c.update(use_some_future_feature={"on": True}), r"use_some_future_feature: .* is not one of"),
        (lambda c: c.update(target_modules=["fc2"]), r"qkv: target_modules .* does not select"),
        (lambda c: c.update(target_modules="(bad"), r"target_modules: not a regular expression"),
        (lambda c: c.update(rank_pattern={"fc2": 3}), r"fc2.lora_A.weight has shape \[2, 768\], .* r = 3 needs"),
    ],
)
def test_hostile_adapter_configs_are_one_line_and_exit_2(peft_vit, tmp_path, capsys, edit, expected):
    adapter = _hostile(peft_vit, tmp_path, edit)
    assert main(["import-peft", str(adapter), "--model", VIT, "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ")
    assert re.search(expected, error), error
    assert not (tmp_path / "out").exists()


def test_huge_configs_pickles_and_foreign_keys_are_refused(peft_vit, tmp_path, capsys):
    adapter = _hostile(peft_vit, tmp_path, text="{" + " " * (2**20 + 10) + "}")
    assert main(["import-peft", str(adapter), "--model", VIT, "-o", str(tmp_path / "out")]) == 2
    assert "over the limit of 1,048,576 bytes" in capsys.readouterr().err

    adapter = _hostile(peft_vit, tmp_path / "keys")
    tensors = safetensors.torch.load_file(str(adapter / WEIGHTS))
    tensors["base_model.model.blocks.7.attn.qkv.lora_A.weight"] = torch.zeros(4, 192)
    tensors["base_model.model.blocks.7.attn.qkv.lora_B.weight"] = torch.zeros(576, 4)
    safetensors.torch.save_file(tensors, str(adapter / WEIGHTS))
    assert main(["import-peft", str(adapter), "--model", VIT, "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "blocks.7.attn.qkv" in error and "names no module of the model" in error and error.count("\n") == 1

    (adapter / WEIGHTS).rename(adapter / "adapter_model.bin")
    assert main(["import-peft", str(adapter), "--model", VIT, "-o", str(tmp_path / "out")]) == 2
    assert "is a pickle, which utune_fx never loads" in capsys.readouterr().err

    adapter = _hostile(peft_vit, tmp_path / "code", lambda c: c.update(base_model_name_or_path="models/net.py:build"))
    assert main(["import-peft", str(adapter), "-o", str(tmp_path / "out")]) == 2
    assert "name the base model: --model SPEC" in capsys.readouterr().err


def test_a_pathological_pattern_stops_at_the_deadline(peft_vit, tmp_path, capsys, monkeypatch):
    import utune_fx.peft_import as peft_import

    monkeypatch.setattr(peft_import, "REGEX_SECONDS", 0.2)
    adapter = _hostile(peft_vit, tmp_path, lambda c: c.update(target_modules=r"(\w|\w|.)*Z"))
    assert main(["import-peft", str(adapter), "--model", VIT, "-o", str(tmp_path / "out")]) == 2
    assert "took more than 0.2 s" in capsys.readouterr().err

"""utune_fx's LoRA equals PEFT's on the same layers, rank, alpha and weights."""

import copy
import textwrap

import pytest
import timm
import torch

from utune_fx.match import load_rules
from utune_fx.rewrite import rewrite
from utune_fx.trace import trace

peft = pytest.importorskip("peft")
TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"  # PEFT full-matches a string


def _vit_twice():
    """A small ViT, an input, and an independent copy with the same weights for PEFT."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    return model, torch.randn(2, 3, 32, 32), copy.deepcopy(model)


def test_lora_matches_peft(tmp_path):
    model, x, same_weights = _vit_twice()
    rules = tmp_path / "lora.yaml"
    rules.write_text(
        textwrap.dedent("""
        version: 1
        patterns:
          transformer_linear:
            node: {kind: linear, scope: ["**.qkv", "**.proj", "**.fc1", "**.fc2"]}
        rules:
          - {name: lora, match: transformer_linear, tuner: lora, settings: {rank: 4, alpha: 8}}
        """)
    )
    ours = rewrite(trace(model, x), load_rules(rules))
    reference = peft.get_peft_model(
        same_weights, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    )

    # Same tuner weights, away from identity: copy ours (after randomising B) into PEFT's.
    torch.manual_seed(1)
    regions = ours.summaries[0].scopes
    assert len(regions) == 8
    peft_modules = dict(reference.base_model.model.named_modules())
    for index, scope in enumerate(regions):
        branch = ours.module.get_submodule(f"utune.lora.{index}")
        with torch.no_grad():
            branch.lora_B.weight.normal_(0, 0.1)
            target = peft_modules[scope]
            target.lora_A["default"].weight.copy_(branch.lora_A.weight)
            target.lora_B["default"].weight.copy_(branch.lora_B.weight)
    with torch.no_grad():
        ours_out, peft_out = ours.module(x), reference(x)
    assert not torch.allclose(ours_out, model(x), atol=1e-3)
    torch.testing.assert_close(ours_out, peft_out, atol=1e-6, rtol=1e-6)
    peft_trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert (
        ours.trainable_parameters
        == peft_trainable
        == sum(4 * (m.in_features + m.out_features) for s in regions for m in [model.get_submodule(s)])
    )


def test_ia3_matches_peft(tmp_path):
    """IA3 = scale_shift without shift: PEFT scales qkv's output and fc2's input by l;
    utune_fx scales qkv's output and the FFN activation (fc2's input) by 1 + g."""
    model, x, same_weights = _vit_twice()
    rules = tmp_path / "ia3.yaml"
    rules.write_text(
        textwrap.dedent("""
        version: 1
        patterns:
          qkv: {node: {kind: linear, scope: "**.qkv"}}
          ffn_act: {node: {kind: act, scope: "**.mlp.act"}}
        rules:
          - {name: attention, match: qkv, tuner: scale_shift, settings: {shift: false}}
          - {name: ffn, match: ffn_act, tuner: scale_shift, settings: {shift: false}}
        """)
    )
    ours = rewrite(trace(model, x), load_rules(rules))
    reference = peft.get_peft_model(
        same_weights,
        peft.IA3Config(
            target_modules=r"blocks\.\d+\.(attn\.qkv|mlp\.fc2)", feedforward_modules=r"blocks\.\d+\.mlp\.fc2"
        ),
    )
    peft_modules = dict(reference.base_model.model.named_modules())
    torch.manual_seed(2)
    for rule, suffix in (("attention", "attn.qkv"), ("ffn", "mlp.fc2")):
        for index in range(2):
            ours_scale = ours.module.get_submodule(f"utune.{rule}.{index}").scale
            with torch.no_grad():
                ours_scale.normal_(0, 0.2)
                target = peft_modules[f"blocks.{index}.{suffix}"].ia3_l["default"]
                target.copy_((1 + ours_scale).reshape(target.shape))
    with torch.no_grad():
        ours_out, peft_out = ours.module(x), reference(x)
    assert not torch.allclose(ours_out, model(x), atol=1e-3)
    torch.testing.assert_close(ours_out, peft_out, atol=1e-5, rtol=1e-5)  # y + y*g vs y*(1+g): rounding only
    assert (
        ours.trainable_parameters
        == sum(p.numel() for p in reference.parameters() if p.requires_grad)
        == 2 * (576 + 768)
    )

"""Structural operations: what counts as a residual, an mlp, a block."""

import pytest
import torch
from toy_models import GluMlp, TokensWithPosEmbed

from utune_fx.inspection import compress_scopes
from utune_fx.match import common_scope, find_operations
from utune_fx.trace import trace


@pytest.mark.parametrize(
    "scopes,expected",
    [
        ([f"blocks.{i}.attn" for i in range(12)], ["blocks.{0..11}.attn"]),
        (["blocks.0.attn", "blocks.2.attn"], ["blocks.{0,2}.attn"]),
        (["head"], ["head"]),
        (["layers.0.blocks.0.attn", "layers.1.blocks.1.attn"], ["layers.*.blocks.*.attn (2)"]),
        (["a.0", "a.1", "a.2", "b"], ["a.{0..2}", "b"]),
    ],
)
def test_compress_scopes(scopes, expected):
    assert compress_scopes(scopes) == expected


def test_common_scope():
    assert common_scope(["blocks.0.attn.qkv", "blocks.0.attn", "blocks.0.attn.proj"]) == "blocks.0.attn"
    assert common_scope(["blocks.1.mlp.fc1", "blocks.10.mlp.fc2"]) == "blocks"
    assert common_scope(["", "head"]) == ""


@pytest.mark.parametrize("batch", [1, 2])  # batch 1: x and pos_embed have one shape
def test_position_embedding_add_is_no_residual_but_the_mlp_add_is(batch):
    gm = trace(TokensWithPosEmbed().eval(), torch.randn(batch, 5, 16))
    residuals = find_operations(gm)["residual"]
    assert len(residuals) == 1
    assert residuals[0].anchor.name == "add_1" and [n.name for n in residuals[0].inputs] == ["add"]


def test_gated_mlp_is_one_mlp_with_both_paths():
    gm = trace(GluMlp().eval(), torch.randn(2, 5, 16))
    mlps = find_operations(gm)["mlp"]
    assert len(mlps) == 1
    assert mlps[0].anchor.name == "fc2" and [n.name for n in mlps[0].inputs] == ["x"]
    assert {"fc1", "silu", "mul", "fc2"} <= {n.name for n in mlps[0].nodes}


def test_attention_operation_spans_projections():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    gm = trace(model, torch.randn(2, 3, 32, 32))
    (attention,) = find_operations(gm)["attention"]
    assert attention.scope == "blocks.0.attn"
    assert attention.output.name == "blocks_0_attn_proj"
    names = {n.name for n in attention.nodes}
    assert "blocks_0_attn_qkv" in names and "blocks_0_norm1" not in names
    assert attention.in_shape == attention.out_shape == (2, 17, 192)

"""Trace equality and structure on timm architectures of many families.

Each row: timm name, kwargs that keep it small, input size, and the expected
counts of attention, mlp and block operations, plus how many blocks hold
exactly one attention and one mlp (a transformer block).
"""

import pytest
import timm
import torch

from utune_fx.match import find_operations
from utune_fx.trace import OP_KINDS, node_info, trace, trace_report

TIMM_CASES = [
    # name, kwargs, size, attention, mlp, block, transformer blocks
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32, 2, 2, 2, 2),
    ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32, 2, 2, 2, 2),
    ("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2), 32, 2, 2, 2, 2),
    ("eva02_tiny_patch14_224", dict(img_size=56, depth=2), 56, 2, 2, 2, 2),
    ("swin_tiny_patch4_window7_224", dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), 224, 4, 4, 4, 4),
    ("cait_xxs24_224", dict(img_size=32, patch_size=8, depth=2), 32, 4, 4, 4, 4),
    ("pit_ti_224", dict(depth=(1, 1, 1)), 224, 3, 3, 3, 3),
    # XCiT: x + pos_embed(B, H, W) (Fourier features of the grid size) is no residual: 2 + 2 blocks
    ("xcit_nano_12_p16_224", dict(img_size=64, depth=2), 64, 4, 4, 4, 4),
    ("maxvit_pico_rw_256", dict(img_size=64), 64, 22, 22, 33, 22),
    ("coatnet_nano_rw_224", dict(img_size=64), 64, 9, 9, 16, 9),
    # CoaT: each stage's one ConvPosEnc runs in every block, each call a block of its own (8 + 8)
    ("coat_lite_tiny", dict(img_size=64), 64, 8, 8, 16, 8),
    ("twins_svt_small", dict(depths=(1, 1, 1, 1)), 64, 4, 4, 8, 4),
    ("mobilevit_xxs", {}, 64, 9, 9, 12, 9),
    # LeViT: the MLP after each downsampling attention (which has no residual) joins its block (9 + 2)
    ("levit_128s", dict(img_size=64), 64, 11, 11, 12, 11),
    ("mixer_s16_224", dict(img_size=64), 64, 0, 16, 8, 0),
    ("poolformer_s12", {}, 64, 0, 12, 12, 0),
    ("convnext_atto", dict(depths=(1, 1, 1, 1)), 64, 0, 4, 4, 0),
    ("resnet18", {}, 64, 0, 0, 8, 0),
    ("efficientnet_b0", {}, 64, 0, 0, 9, 0),
    ("mobilenetv3_small_050", {}, 64, 0, 0, 7, 0),
]


@pytest.mark.parametrize(
    "name,kwargs,size,attention,mlp,blocks,transformer_blocks", TIMM_CASES, ids=[c[0] for c in TIMM_CASES]
)
def test_timm_trace_is_exact_and_structured(name, kwargs, size, attention, mlp, blocks, transformer_blocks):
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    gm = trace(model, x)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x)), "traced output differs from eager"
    assert trace_report(gm).frontend == "fx"
    assert trace_report(gm).opaque == []
    for node in gm.graph.nodes:
        info = node_info(node)
        assert info.op_kind in OP_KINDS
        if info.op_kind in ("linear", "conv", "norm", "attention"):
            assert info.scope, f"{node.name} ({info.op_kind}) has no module scope"
            assert info.shape is not None and info.dtype == "float32"

    ops = find_operations(gm)
    assert (len(ops["attention"]), len(ops["mlp"]), len(ops["block"])) == (attention, mlp, blocks)
    block_contents = [block.contains for block in ops["block"]]
    assert sum(c == {"attention": 1, "mlp": 1} for c in block_contents) == transformer_blocks


def test_vit_nodes_carry_scopes_shapes_and_kinds():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = trace(model, x)
    nodes = {n.name: n for n in gm.graph.nodes}

    qkv = node_info(nodes["blocks_0_attn_qkv"])
    assert (qkv.op_kind, qkv.op_name, qkv.scope, qkv.scope_class) == ("linear", "Linear", "blocks.0.attn.qkv", "Linear")
    assert [path for path, _ in qkv.scope_stack] == ["blocks", "blocks.0", "blocks.0.attn", "blocks.0.attn.qkv"]
    assert qkv.scope_stack[1][1] == "timm.models.vision_transformer.Block"
    assert qkv.shape == (2, 17, 576) and qkv.dtype == "float32"

    sdpa = [n for n in gm.graph.nodes if node_info(n).op_kind == "attention"]
    assert [node_info(n).scope for n in sdpa] == ["blocks.0.attn", "blocks.1.attn"]
    assert node_info(sdpa[0]).scope_class == "Attention"
    assert node_info(sdpa[0]).attention is not None

    # shapes agree with what the eager modules produce
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, tuple(out.shape)))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in seen:
            assert node_info(node).shape == seen[node.target]


def test_defaulted_inputs_are_specialised_away():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    gm = trace(model, torch.randn(2, 3, 32, 32))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert "def forward(self, x)" in gm.code.replace(" : torch.Tensor", "")
    y = torch.randn(3, 3, 32, 32)  # another batch size runs too
    with torch.no_grad():
        assert torch.equal(gm(y), model(y))


def test_trace_leaves_the_model_mode_and_batch_norm_statistics_alone():
    model = timm.create_model("resnet18", pretrained=False).train()
    before = model.bn1.running_mean.clone()
    gm = trace(model, torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.bn1.running_mean, before)
    assert gm.training

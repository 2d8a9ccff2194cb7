"""A parallel tuner beside an attention reads the tokens it produces outputs for: the query
projection's input (class attention, LeViT's subsampling attention), or among several region
inputs the one with the output's tokens (Twins' spatial reduction, SwinV2-CR's position MLP), or
what the attention module itself reads (MViT pools its queries with a conv, LowFormer attends at a
strided conv's resolution); when none has the output's tokens (Hiera pools its queries), the tuner
joins the residual add and reads the shortcut."""

import operator

import pytest
import timm
import torch

from utune_fx.match import load_rules
from utune_fx.match.predicates import data_inputs
from utune_fx.rewrite import rewrite
from utune_fx.trace import node_info, trace

RULES = load_rules("rules/utuner_mha.yaml")


def _tuner_reads(result, scope_of_query_linear):
    """The node each tuner call reads, and the data input of the given query projection."""
    graph = result.module.graph
    query = next(n for n in graph.nodes if n.op == "call_module" and n.target == scope_of_query_linear)
    calls = {
        str(n.target): n.args[0]
        for n in graph.nodes
        if n.op == "call_module" and str(n.target).startswith("utune.mha.")
    }
    return calls, data_inputs(query)[0]


@pytest.mark.parametrize(
    "name,kwargs,size,attention,query",
    [
        (
            "cait_xxs24_224",
            dict(depth=1, depth_token_only=1, img_size=32, patch_size=16),
            32,
            "blocks_token_only.0.attn",
            "blocks_token_only.0.attn.q",
        ),  # class attention: 1 query
        (
            "levit_128s",
            {},
            224,
            "stages.1.downsample.attn_downsample",
            "stages.1.downsample.attn_downsample.q.ln.linear",
        ),
        ("twins_pcpvt_small", dict(depths=(1, 1, 1, 1)), 64, "blocks.0.0.attn", "blocks.0.0.attn.q"),  # keys reduced
    ],
)
def test_parallel_tuners_read_the_query_tokens_and_start_as_identity(name, kwargs, size, attention, query):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    result = rewrite(trace(model, x), RULES)
    summary = next(s for s in result.summaries if s.rule == "mha")
    index = summary.scopes.index(attention)
    calls, query_input = _tuner_reads(result, query)
    assert calls[f"utune.mha.{index}"] is query_input
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


def test_class_attention_tuner_against_a_hook_reference():
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", depth=1, depth_token_only=1, img_size=32, patch_size=16).eval()
    with torch.no_grad():  # layer scales start at 1e-5: open them so the branches show in the output
        for name, parameter in model.named_parameters():
            if name.endswith("gamma_1") or name.endswith("gamma_2"):
                parameter.fill_(1.0)
    x = torch.randn(2, 3, 32, 32)
    result = rewrite(trace(model, x), RULES)
    with torch.no_grad():
        for n, p in result.module.named_parameters():
            if n.startswith("utune."):
                p.normal_(0, 0.1)
    tuners = dict(result.module.named_modules())
    scopes = next(s for s in result.summaries if s.rule == "mha").scopes
    attentions = [model.get_submodule(scope) for scope in scopes]
    hooks = []
    for i, attention in enumerate(attentions):
        seen = {}  # class attention: what its q projection reads; self-attention: its own input
        reads = attention.q if hasattr(attention, "q") else attention
        hooks.append(reads.register_forward_pre_hook(lambda mod, inp, seen=seen: seen.__setitem__("q", inp[0])))
        hooks.append(
            attention.register_forward_hook(
                lambda mod, inp, out, seen=seen, tuner=tuners[f"utune.mha.{i}"]: out + tuner(seen["q"]).reshape_as(out)
            )
        )
    model.head = result.module.get_submodule("head")
    with torch.no_grad():
        expected, actual = model(x), result.module(x)
    for hook in hooks:
        hook.remove()
    assert (expected - actual).abs().max() < 1e-5
    with torch.no_grad():
        assert (actual - model(x)).abs().max() > 1e-3  # the tuners act


def _tuner_calls(result):
    return [n for n in result.module.graph.nodes if n.op == "call_module" and str(n.target).startswith("utune.mha.")]


@pytest.mark.parametrize(
    "name,kwargs,joins",
    [
        ("hiera_tiny_224", dict(embed_dim=32, num_heads=1, stages=(1, 1, 1, 1)), 3),  # 3 stage changes pool queries
        ("sam2_hiera_tiny", dict(embed_dim=32, num_heads=1, stages=(1, 1, 1, 1), global_att_blocks=()), 3),  # windows
    ],
)
def test_tuners_beside_query_pooling_attention_join_the_residual_stream(name, kwargs, joins):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    with torch.no_grad():  # Hiera zero-initialises its classifier
        model.get_classifier().weight.normal_(0, 0.02)
    x = torch.randn(2, 3, 224, 224)
    result = rewrite(trace(model, x), RULES)
    joined = 0
    for call in _tuner_calls(result):
        (total,) = call.users  # add(branch, tuner)
        if any(u.target is operator.add and call.args[0] in u.args for u in total.users):  # x + (OP(x) + U(x))
            joined += 1
            assert node_info(call.args[0]).shape == node_info(total).shape
    assert joined == joins
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))
        for n, p in result.module.named_parameters():
            if n.startswith("utune."):
                p.normal_(0, 0.1)
        assert not torch.allclose(result.module(x), model(x))


@pytest.mark.parametrize(
    "name,attention,reads",
    [
        ("mvitv2_tiny", "stages.0.blocks.0.attn", "stages.0.blocks.0.attn.qkv"),  # not the pooling conv after it
        ("lowformer_b0", "stages.2.1.attn.main.1", "stages.2.1.attn.main.1.conv_proj.conv"),  # before the strided conv
    ],
)
def test_tuners_read_what_the_attention_module_reads(name, attention, reads):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    result = rewrite(trace(model, x), RULES)
    index = next(s for s in result.summaries if s.rule == "mha").scopes.index(attention)
    calls, layer_input = _tuner_reads(result, reads)
    assert calls[f"utune.mha.{index}"] is layer_input
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


def test_tuners_beside_a_strided_halo_attention_read_the_feature_map_not_its_blocks():
    """HaloNet's last stage attends with stride 2 over unfolded blocks ([64, 4, 4, C]): the tuner reads
    the [B, C, H, W] map the queries come from, downsampled by a whole factor, whatever order the
    region lists its inputs in."""
    torch.manual_seed(0)
    model = timm.create_model("sehalonet33ts", pretrained=False).eval()
    x = torch.randn(2, 3, 256, 256)
    result = rewrite(trace(model, x), load_rules("dual_utuner"))
    calls = _tuner_calls(result)
    assert len(calls) == 4
    for call in calls:
        reads = node_info(call.args[0]).shape
        assert len(reads) == 4 and reads[0] == 2, (call.target, reads)
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))

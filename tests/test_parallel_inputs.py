"""A parallel tuner beside an attention reads the tokens it produces outputs for: the query
projection's input (class attention, LeViT's subsampling attention), or among several region
inputs the one with the output's tokens (Twins' spatial reduction, SwinV2-CR's position MLP)."""

import pytest
import timm
import torch

from utune_fx.match import load_rules
from utune_fx.match.predicates import data_inputs
from utune_fx.rewrite import rewrite
from utune_fx.trace import trace

RULES = load_rules("rules/utuner_mha.yaml")


def _tuner_reads(result, scope_of_query_linear):
    """The node each tuner call reads, and the data input of the given query projection."""
    graph = result.module.graph
    query = next(n for n in graph.nodes if n.op == "call_module" and n.target == scope_of_query_linear)
    calls = {str(n.target): n.args[0] for n in graph.nodes if n.op == "call_module" and str(n.target).startswith("utune.mha.")}
    return calls, data_inputs(query)[0]


@pytest.mark.parametrize("name,kwargs,size,attention,query", [
    ("cait_xxs24_224", dict(depth=1, depth_token_only=1, img_size=32, patch_size=16), 32,
     "blocks_token_only.0.attn", "blocks_token_only.0.attn.q"),             # class attention: 1 query
    ("levit_128s", {}, 224, "stages.1.downsample.attn_downsample", "stages.1.downsample.attn_downsample.q.ln.linear"),
    ("twins_pcpvt_small", dict(depths=(1, 1, 1, 1)), 64, "blocks.0.0.attn", "blocks.0.0.attn.q"),  # keys reduced
])
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
        hooks.append(attention.register_forward_hook(
            lambda mod, inp, out, seen=seen, tuner=tuners[f"utune.mha.{i}"]: out + tuner(seen["q"]).reshape_as(out)))
    model.head = result.module.get_submodule("head")
    with torch.no_grad():
        expected, actual = model(x), result.module(x)
    for hook in hooks:
        hook.remove()
    assert (expected - actual).abs().max() < 1e-5
    with torch.no_grad():
        assert (actual - model(x)).abs().max() > 1e-3  # the tuners act

"""Written-out activations, RMSNorm and LayerNorm are one act / norm op; FFN, attention and block counts of
tiny Hugging Face transformers (random weights, torch.export) agree with their configs.

Truth from outside the code: the closed forms of GELU, SiLU, RMSNorm and LayerNorm (torch.nn.functional),
eager PyTorch's outputs, and each model's config (layers -> attentions, FFNs, blocks, norms)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toy_models import transformer_decoder

import utune_fx  # noqa: F401  (before transformers)
from utune_fx.match import find_operations, load_rules, match_rules
from utune_fx.match.predicates import data_inputs
from utune_fx.trace import node_info, trace

FRONTENDS = ("fx", "export")
DUAL = load_rules("dual_utuner")  # the shipped rules/dual_utuner.yaml


# -- written-out forms, as models spell them ---------------------------------------------------
def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x):  # GPT-2's gelu_new
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_fast(x):  # transformers' FastGELUActivation: the tanh form with x * x, rounded constants
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def quick_gelu(x):  # CLIP
    return x * torch.sigmoid(1.702 * x)


def silu(x):
    return x * torch.sigmoid(x)


def silu_flipped(x):
    return x.sigmoid() * x


def silu_exp(x):
    return x / (1 + torch.exp(-x))


ACTS = [
    (gelu_erf, "gelu", lambda x: F.gelu(x)),
    (gelu_tanh, "gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    (gelu_fast, "gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    (quick_gelu, "quick_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
    (silu, "silu", F.silu),
    (silu_flipped, "silu", F.silu),
    (silu_exp, "silu", F.silu),
]


class Mlp(nn.Module):
    def __init__(self, act, dim=16, hidden=32):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RMSNorm(nn.Module):
    """Spellings of Llama, T5, Gemma and a plain one, with or without a weight."""

    def __init__(self, dim, style="llama", eps=1e-6):
        super().__init__()
        self.style, self.eps = style, eps
        self.weight = nn.Parameter(torch.randn(dim)) if style != "plain" else None

    def forward(self, x):
        if self.style == "llama":
            dtype = x.dtype
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * h.to(dtype)
        if self.style == "t5":
            variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(variance + self.eps))
        if self.style == "gemma":
            h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return (h * (1.0 + self.weight.float())).type_as(x)
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + self.eps)


class NormedLinear(nn.Module):
    def __init__(self, norm, dim=16):
        super().__init__()
        self.proj, self.norm, self.out = nn.Linear(dim, dim), norm, nn.Linear(dim, dim)

    def forward(self, x):
        return self.out(self.norm(self.proj(x)))


def _traced(model, x, frontend):
    torch.manual_seed(0)
    model = model.eval()
    gm = trace(model, x, frontend=frontend)
    with torch.no_grad():  # numerics unchanged: the annotated graph still computes the model
        expected, got = model(x), gm(x)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7), (got - expected).abs().max()
    return gm


def _of_kind(gm, kind):
    return [n for n in gm.graph.nodes if node_info(n).op_kind == kind]


def _producer(gm, scope, kind):
    """The node of ``kind`` the module at ``scope`` computes last (the tensor an op reads)."""
    return [n for n in gm.graph.nodes if node_info(n).scope == scope and node_info(n).op_kind == kind][-1]


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("act,form,closed_form", ACTS, ids=[f"{a.__name__}" for a, _, _ in ACTS])
def test_written_out_activation_is_one_act_and_the_mlp_is_found(act, form, closed_form, frontend):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = Mlp(act)
    with torch.no_grad():  # the spelling is the activation (within float32 rounding)
        h = model.fc1(x)
        assert torch.allclose(act(h), closed_form(h), atol=1e-6)
    gm = _traced(model, x, frontend)
    acts = _of_kind(gm, "act")
    assert [(node_info(n).op_name, node_info(n).composite) for n in acts] == [(form, form)]
    assert data_inputs(acts[0]) == [_producer(gm, "fc1", "linear")]  # the composite reads fc1, one op
    assert {node_info(n).op_kind for n in gm.graph.nodes if node_info(n).part_of == acts[0].name} == {"arith"}
    assert [r.scope for r in find_operations(gm)["mlp"]] == [""]


class Gate(nn.Module):
    """x * sigmoid(y): a gate between two branches, not SiLU."""

    def __init__(self, dim=16):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.out(self.a(x) * torch.sigmoid(self.b(x)))


class LearntSwish(nn.Module):
    """x * sigmoid(beta x) with a trained beta: SiLU at beta = 1, but not once beta trains: a learnt act."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class XIELU(nn.Module):
    """transformers' xIELU (Apertus), its Python form: a piecewise activation with learnt slopes."""

    def __init__(self):
        super().__init__()
        self.alpha_p = nn.Parameter(torch.tensor([0.5]))
        self.alpha_n = nn.Parameter(torch.tensor([0.2]))
        self.register_buffer("beta", torch.tensor(0.5))
        self.register_buffer("eps", torch.tensor(-1e-6))

    def forward(self, x):
        alpha_p, alpha_n = F.softplus(self.alpha_p), self.beta + F.softplus(self.alpha_n)
        return torch.where(
            x > 0, alpha_p * x * x + self.beta * x, (torch.expm1(torch.min(x, self.eps)) - x) * alpha_n + self.beta * x
        )


class LearntScale(nn.Module):
    """x * gamma + beta x: learnt, but a line (layer scale), so no activation."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor([0.3]))

    def forward(self, x):
        return x * self.gamma + 0.5 * x


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("act", [XIELU, LearntSwish], ids=["xielu", "learnt_swish"])
def test_an_activation_with_learnt_parameters_is_one_learnt_act(act, frontend):
    """No fixed form, but one input, one output each, not a line: the FFN around it is found."""
    gm = _traced(Mlp(act()), torch.randn(2, 5, 16), frontend)
    acts = _of_kind(gm, "act")
    assert [(node_info(n).op_name, node_info(n).composite) for n in acts] == [("learnt", "learnt")]
    assert data_inputs(acts[0]) == [_producer(gm, "fc1", "linear")]
    assert [r.scope for r in find_operations(gm)["mlp"]] == [""]


NOT_ACTS = {
    "learnt_scale": LearntScale(),
    "swish_beta_2": lambda x: x * torch.sigmoid(2.0 * x),  # neither SiLU nor quick GELU
    "gelu_wrong_constant": lambda x: 0.5 * x * (1.0 + torch.erf(x / 2.0)),
    "square": lambda x: x * x,
}


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_gate_is_no_silu(frontend):
    gm = _traced(Gate(), torch.randn(2, 5, 16), frontend)
    assert [node_info(n).op_name for n in _of_kind(gm, "act")] == ["sigmoid"]  # the lone sigmoid, untouched
    assert not any(node_info(n).composite for n in gm.graph.nodes)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("name", NOT_ACTS)
def test_near_miss_activations_are_not_recognised(name, frontend):
    gm = _traced(Mlp(NOT_ACTS[name]), torch.randn(2, 5, 16), frontend)
    assert not any(node_info(n).composite for n in gm.graph.nodes)
    assert not any(node_info(n).part_of for n in gm.graph.nodes)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("style,eps", [("llama", 1e-6), ("t5", 1e-5), ("gemma", 1e-6), ("plain", 0.1)])
def test_written_out_rms_norm_is_one_norm(style, eps, frontend):
    torch.manual_seed(0)
    norm = RMSNorm(16, style, eps)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # the spelling is RMSNorm (gain w, 1 + w for Gemma, none)
        gain = None if style == "plain" else 1 + norm.weight if style == "gemma" else norm.weight
        assert torch.allclose(norm(x), F.rms_norm(x, (16,), gain, eps), atol=1e-5)
    gm = _traced(NormedLinear(norm), x, frontend)
    norms = _of_kind(gm, "norm")
    assert [node_info(n).op_name for n in norms] == ["rms_norm"]
    assert data_inputs(norms[0]) == [_producer(gm, "proj", "linear")]
    assert [r.output for r in find_operations(gm)["norm"]] == norms


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_rms_norm_of_one_row(frontend):
    gm = _traced(NormedLinear(RMSNorm(16, "llama")), torch.randn(16), frontend)
    assert [node_info(n).op_name for n in _of_kind(gm, "norm")] == ["rms_norm"]


class NotRms(nn.Module):
    def __init__(self, reduce):
        super().__init__()
        self.reduce = reduce
        self.weight = nn.Parameter(torch.randn(16))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(self.reduce(x) + 1e-6))


NOT_NORMS = {
    "wrong_axis": lambda x: x.pow(2).mean(1, keepdim=True),
    "no_square": lambda x: x.mean(-1, keepdim=True).abs(),
    "centred_layer_norm": lambda x: (x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True),
    "sum_not_mean_of_halves": lambda x: x[..., :8].pow(2).sum(-1, keepdim=True),
}


# on one row any f(x) is x / rms(x) times some g: the probe must not take that for RMSNorm
NEAR_MISS_NORMS = [
    (name, shape) for name in NOT_NORMS for shape in ((2, 5, 16), (16,)) if name != "wrong_axis" or shape != (16,)
]


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("name,shape", NEAR_MISS_NORMS, ids=[f"{n}-{len(s)}d" for n, s in NEAR_MISS_NORMS])
def test_near_miss_norms_are_not_recognised(name, shape, frontend):
    gm = _traced(NormedLinear(NotRms(NOT_NORMS[name])), torch.randn(shape), frontend)
    assert _of_kind(gm, "norm") == []
    assert not any(node_info(n).composite for n in gm.graph.nodes)


class LayerNorm(nn.Module):
    """LayerNorm written out: DeBERTa's (weight and bias), Cohere's (no bias, cast to float32)."""

    def __init__(self, dim, style="deberta", eps=1e-7):
        super().__init__()
        self.style, self.eps = style, eps
        self.weight = nn.Parameter(torch.randn(dim))
        self.bias = nn.Parameter(torch.randn(dim)) if style == "deberta" else None

    def forward(self, x):
        if self.style == "deberta":
            mean = x.mean(-1, keepdim=True)
            variance = (x - mean).pow(2).mean(-1, keepdim=True)
            return self.weight * ((x - mean) / torch.sqrt(variance + self.eps)) + self.bias
        h = x.to(torch.float32)
        centred = h - h.mean(-1, keepdim=True)
        h = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(torch.float32) * h).to(x.dtype)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("style", ["deberta", "cohere"])
def test_written_out_layer_norm_is_one_norm(style, frontend):
    torch.manual_seed(0)
    norm = LayerNorm(16, style)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(norm(x), F.layer_norm(x, (16,), norm.weight, norm.bias, norm.eps), atol=1e-5)
    gm = _traced(NormedLinear(norm), x, frontend)
    norms = _of_kind(gm, "norm")
    assert [node_info(n).op_name for n in norms] == ["layer_norm"]
    assert data_inputs(norms[0]) == [_producer(gm, "proj", "linear")]


class NotLayerNorm(nn.Module):
    def __init__(self, variance):
        super().__init__()
        self.variance = variance

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt(self.variance(centred) + 1e-6)


NOT_LAYER_NORMS = {
    "variance_squared": lambda c: c.pow(2).mean(-1, keepdim=True) ** 2,  # divides by the variance
    "variance_of_halves": lambda c: c[..., :8].pow(2).mean(-1, keepdim=True),
    "mean_absolute_deviation": lambda c: c.abs().mean(-1, keepdim=True) ** 2,
}


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("name", NOT_LAYER_NORMS)
def test_near_miss_layer_norms_are_not_recognised(name, frontend):
    gm = _traced(NormedLinear(NotLayerNorm(NOT_LAYER_NORMS[name])), torch.randn(2, 5, 16), frontend)
    assert _of_kind(gm, "norm") == []


# -- Hugging Face models: counts from their configs -------------------------------------------
def _counts(model, inputs):
    gm = trace(model.eval(), inputs, frontend="export")
    found = {match.rule.name: match.regions for match in match_rules(gm, DUAL)}
    operations = find_operations(gm)
    return gm, found, operations


def _cross(region) -> bool:
    """A cross-attention: its projections read two different tensors (queries, encoder states)."""
    return len({data_inputs(n)[0] for n in region.captures["qkv"]}) == 2


def _check_encoder_decoder(model, inputs, encoder: int, decoder: int) -> dict:
    """Self-attention in every layer, cross-attention in every decoder layer, one FFN per layer."""
    _, found, operations = _counts(model, inputs)
    cross = [_cross(r) for r in found["mha"]]
    assert (cross.count(False), cross.count(True)) == (encoder + decoder, decoder)
    assert len(found["ffn"]) == encoder + decoder
    return operations


def _layer_paths(model, class_name):
    return [name for name, module in model.named_modules() if type(module).__name__ == class_name]


def _check_blocks(operations, model, layers: dict[str, dict]):
    """One block per layer module (class -> what each holds), never spanning two layers."""
    expected = [(path, contains) for cls, contains in layers.items() for path in _layer_paths(model, cls)]
    got = [(b.scope, b.contains) for b in operations["block"]]
    assert sorted(got) == sorted(expected)


def test_gpt2_written_out_gelu_ffns():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=100, n_positions=32, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2Model(config)
    gm, found, operations = _counts(model, (torch.randint(0, 100, (2, 8)),))
    assert len(found["mha"]) == len(found["ffn"]) == config.n_layer
    forms = [node_info(n).composite for n in gm.graph.nodes if node_info(n).composite]
    assert forms == ["gelu_tanh"] * config.n_layer  # gelu_new, written out
    assert len(operations["norm"]) == 2 * config.n_layer + 1
    _check_blocks(operations, model, {"GPT2Block": {"attention": 1, "mlp": 1}})


def test_llama_rms_norm_and_swiglu_ffns():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=32,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaModel(config)
    gm, found, operations = _counts(model, (torch.randint(0, 100, (2, 8)),))
    assert len(found["mha"]) == len(found["ffn"]) == config.num_hidden_layers
    # silu(gate(x)) * up(x) -> down: the FFN runs from both gate and up to down
    assert all({node_info(n).scope for n in r.captures["fc1"]} >= {f"{r.scope}.gate_proj"} for r in found["ffn"])
    norms = operations["norm"]  # input and post-attention RMSNorm per layer, the final one
    assert len(norms) == 2 * config.num_hidden_layers + 1
    assert {node_info(r.output).composite for r in norms} == {"rms_norm"}
    _check_blocks(operations, model, {"LlamaDecoderLayer": {"attention": 1, "mlp": 1}})


@pytest.mark.parametrize("feed_forward", ["relu", "gated-gelu"])
def test_t5_encoder_decoder_blocks_and_cross_attention(feed_forward):
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        num_layers=2,
        num_decoder_layers=3,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_heads=4,
        vocab_size=100,
        feed_forward_proj=feed_forward,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.T5Model(config)
    inputs = (torch.randint(0, 100, (2, 8)), None, torch.randint(0, 100, (2, 6)))
    encoder, decoder = config.num_layers, config.num_decoder_layers
    operations = _check_encoder_decoder(model, inputs, encoder, decoder)
    # self-attention + FFN per encoder block, + cross-attention per decoder block; each stack's final norm
    assert len(operations["norm"]) == 2 * encoder + 3 * decoder + 2
    assert {node_info(r.output).composite for r in operations["norm"]} == {"rms_norm"}
    blocks = [b.contains for b in operations["block"]]
    assert blocks == [{"attention": 1, "mlp": 1}] * encoder + [{"attention": 2, "mlp": 1}] * decoder
    assert [b.scope for b in operations["block"]] == _layer_paths(model, "T5Block")


def test_bart_encoder_decoder_blocks_and_cross_attention():
    transformers = pytest.importorskip("transformers")
    config = transformers.BartConfig(
        encoder_layers=2,
        decoder_layers=3,
        d_model=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        vocab_size=100,
        max_position_embeddings=32,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.BartModel(config)
    encoder, decoder = config.encoder_layers, config.decoder_layers
    operations = _check_encoder_decoder(model, (torch.randint(0, 100, (2, 8)),), encoder, decoder)
    _check_blocks(
        operations,
        model,
        {"BartEncoderLayer": {"attention": 1, "mlp": 1}, "BartDecoderLayer": {"attention": 2, "mlp": 1}},
    )


def test_torch_transformer_decoder_blocks():
    torch.manual_seed(0)
    model = transformer_decoder(layers=2).eval()
    gm, found, operations = _counts(model, (torch.randn(2, 5, 32), torch.randn(2, 7, 32)))
    assert len(found["mha"]) == 4 and len(found["ffn"]) == 2
    _check_blocks(operations, model, {"TransformerDecoderLayer": {"attention": 2, "mlp": 1}})

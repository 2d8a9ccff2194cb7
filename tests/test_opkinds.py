"""One op kind however a model spells the operation, in both front ends."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utune_fx.trace import node_info, trace


class LinearSpellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.module = nn.Linear(8, 8)
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, x):
        a = self.module(x)
        b = F.linear(x, self.weight, self.bias)
        c = torch.addmm(self.bias, x, self.weight.t())
        d = x @ self.weight.t()
        e = torch.matmul(x, self.weight)
        not_linear = x @ x.t()  # two activations: a matmul, not a layer
        return a + b + c + d + e, not_linear


class EveryKind(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(8, 8, 1, 1))
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(8)
        self.embed = nn.Embedding(10, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, ids):
        y = F.conv2d(self.conv(x), self.weight)
        y = F.relu(self.bn(y))
        y = self.pool(y).flatten(1)
        tokens = self.embed(ids).permute(0, 2, 1).transpose(1, 2)
        z = torch.cat([y.unsqueeze(1), tokens], dim=1)
        z = self.drop(self.norm(z)) * 2.0
        return F.gelu(z)[:, 0]


def _kinds_by_name(gm):
    return [
        (node_info(n).op_name, node_info(n).op_kind)
        for n in gm.graph.nodes
        if n.op not in ("placeholder", "get_attr", "output")
    ]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_every_spelling_of_a_linear_layer_is_linear(frontend):
    gm = trace(LinearSpellings().eval(), torch.randn(4, 8), frontend=frontend)
    kinds = [kind for _, kind in _kinds_by_name(gm) if kind in ("linear", "matmul")]
    assert kinds == ["linear"] * 5 + ["matmul"]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_op_kind_vocabulary(frontend):
    gm = trace(EveryKind().eval(), (torch.randn(2, 3, 6, 6), torch.randint(0, 10, (2, 4))), frontend=frontend)
    kinds = {kind for _, kind in _kinds_by_name(gm)}
    assert {"conv", "norm", "act", "pool", "reshape", "permute", "embedding", "cat", "mul", "getitem"} <= kinds
    assert sum(kind == "conv" for _, kind in _kinds_by_name(gm)) == 2  # nn.Conv2d and F.conv2d


class SdpaAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)

    def split(self, x):
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)

    def merge(self, x):
        return x.transpose(1, 2).flatten(2)

    def forward(self, x):
        q, k, v = self.split(x)
        return self.proj(self.merge(F.scaled_dot_product_attention(q, k, v)))


class WrittenOutAttention(SdpaAttention):
    def forward(self, x):
        q, k, v = self.split(x)
        scores = (q * 8**-0.5) @ k.transpose(-2, -1)
        weights = F.dropout(scores.softmax(dim=-1), 0.0, self.training)
        return self.proj(self.merge(weights @ v))


class ClampedAttention(SdpaAttention):
    """XGLM: scores clamped from below with torch.max(scores, floor) before the softmax."""

    def forward(self, x):
        q, k, v = self.split(x)
        scores = torch.max(q @ k.transpose(-2, -1), torch.tensor(torch.finfo(torch.float32).min))
        return self.proj(self.merge(scores.softmax(dim=-1) @ v))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_max_of_two_tensors_is_elementwise_and_of_one_a_reduction(frontend):
    class Both(nn.Module):
        def forward(self, x, y):
            return torch.max(x, y) + torch.max(x, dim=-1, keepdim=True).values

    gm = trace(Both().eval(), (torch.randn(2, 4), torch.randn(2, 4)), frontend=frontend)
    maxima = [node_info(n).op_kind for n in gm.graph.nodes if node_info(n).op_name in ("max", "maximum")]
    assert maxima == ["arith", "reduce"]


class TorchMha(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("model", [SdpaAttention, WrittenOutAttention, ClampedAttention, TorchMha])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_attention_is_one_attention_node_with_its_inputs(model, frontend):
    module = model().eval()
    x = torch.randn(2, 5, 16)
    gm = trace(module, x, frontend=frontend)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel is not what a graph records
    try:
        with torch.no_grad():
            assert torch.equal(gm(x), module(x))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    attention = [n for n in gm.graph.nodes if node_info(n).op_kind == "attention"]
    assert len(attention) == 1
    info = node_info(attention[0]).attention
    names = {n.name for n in gm.graph.nodes}
    assert info is not None and {info.query, info.key, info.value} <= names
    parts = [n for n in gm.graph.nodes if node_info(n).part_of == attention[0].name]
    if model in (WrittenOutAttention, ClampedAttention):
        assert {node_info(p).op_kind for p in parts} >= {"matmul", "softmax"}
    else:
        assert parts == []

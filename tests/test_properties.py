"""Property tests: random transformer configurations trace exactly and show
one attention and one feed-forward network per layer."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from utune_fx.match import find_operations
from utune_fx.trace import trace, trace_report


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([4, 8]),
    norm_first=st.booleans(),
    activation=st.sampled_from(["relu", "gelu"]),
    batch=st.integers(1, 3),
    tokens=st.integers(1, 7),
)
def test_random_encoders_trace_exactly(layers, heads, head_dim, norm_first, activation, batch, tokens):
    width = heads * head_dim
    layer = nn.TransformerEncoderLayer(
        width, heads, 2 * width, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first
    )
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    x = torch.randn(batch, tokens, width)
    gm = trace(model, x, frontend="fx")  # auto takes torch.export, which sees inside nn.MultiheadAttention
    assert trace_report(gm).frontend == "fx"
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    ops = find_operations(gm)
    for kind in ("attention", "mlp", "ffn", "block"):
        assert len(ops[kind]) == layers, kind
    assert all(block.contains == {"attention": 1, "mlp": 1} for block in ops["block"])

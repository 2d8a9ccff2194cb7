"""Structural operations: what counts as a residual, an mlp, a block."""

import pytest
import torch
from toy_models import GluMlp, TokensWithPosEmbed, tiny_moe

from utune_fx.inspection import compress_scopes
from utune_fx.match import common_scope, find_operations
from utune_fx.trace import node_info, trace


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


class _MaskedAttention(torch.nn.Module):
    """Attention whose mask comes from the token ids (padding), as Hugging Face decoders build it."""

    def __init__(self, dim=16, context=8):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.register_buffer("causal", torch.ones(context, context, dtype=torch.bool).tril())

    def forward(self, x, keep):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, 2, dim // 2).permute(2, 0, 3, 1, 4)
        mask = keep[:, None, None, :] & self.causal[:length, :length]
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


class _Layer(torch.nn.Module):
    """'parallel': x + attn(ln x) + mlp(ln x) (Cohere, GPT-J); 'scaled': h * a + x * b with constant
    a, b after each sub-layer (Beam's depth-scaled residual add)."""

    def __init__(self, form, index, dim=16):
        super().__init__()
        self.form, self.index = form, index
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = _MaskedAttention(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x, keep):
        if self.form == "parallel":
            h = self.ln1(x)
            return x + self.attn(h, keep) + self.mlp(h)
        depth = 2 * self.index + 1
        x = self.attn(self.ln1(x), keep) / depth**0.5 + x * ((depth - 1) / depth) ** 0.5
        return self.mlp(self.ln2(x)) / (depth + 1) ** 0.5 + x * (depth / (depth + 1)) ** 0.5


class _TokenDecoder(torch.nn.Module):
    def __init__(self, form, layers=2, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(50, dim)
        self.layers = torch.nn.ModuleList(_Layer(form, i, dim) for i in range(layers))

    def forward(self, ids):
        keep, x = ids != 0, self.embed(ids)
        for layer in self.layers:
            x = layer(x, keep)
        return x


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("form", ["parallel", "scaled"])
def test_parallel_and_constant_scaled_residuals_make_one_block_per_layer(form, frontend):
    """The features flow from the embedding; the mask built from the token ids must not make the ids
    the only node dominating a parallel attention + FFN sum, and a constant scale on the skip is no
    new branch: one block per layer, holding its attention and its FFN."""
    gm = trace(_TokenDecoder(form).eval(), torch.randint(1, 50, (2, 6)), frontend=frontend)
    operations = find_operations(gm)
    assert [b.scope for b in operations["block"]] == ["layers.0", "layers.1"]
    assert [b.contains for b in operations["block"]] == [{"attention": 1, "mlp": 1}] * 2
    assert [r.scope for r in operations["ffn"]] == ["layers.0.mlp", "layers.1.mlp"]


class _TopKMaskAttention(torch.nn.Module):
    """DeepSeek-V3.2's sparse attention in small: a scorer picks the keys each query may see; its
    top-k indices fill a mask built by x.new_zeros, which reads x for its shape only."""

    def __init__(self, dim=16, keep=3):
        super().__init__()
        self.qkv, self.out, self.keep = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), keep
        self.scorer = torch.nn.Linear(dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        scores = self.scorer(x) @ x.transpose(1, 2)
        chosen = scores.topk(self.keep, dim=-1).indices
        mask = x.new_zeros(batch, length, length).scatter(-1, chosen, 1.0).bool()[:, None]
        q, k, v = self.qkv(x).reshape(batch, length, 3, 2, dim // 2).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


class _SparseLayer(torch.nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.ln1, self.ln2, self.attn = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim), _TopKMaskAttention(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_indices_and_metadata_reads_are_no_path_into_an_attention(frontend):
    """The attention's projections are the linears whose features reach it: not the scorer behind its
    top-k mask (integer indices), nor the previous layer's FFN (read by new_zeros for its shape)."""
    model = torch.nn.Sequential(_SparseLayer(), _SparseLayer()).eval()
    gm = trace(model, torch.randn(2, 6, 16), frontend=frontend)
    attentions = find_operations(gm)["attention"]
    assert [r.scope for r in attentions] == ["0.attn", "1.attn"]
    for layer, region in enumerate(attentions):
        scopes = {node_info(n).scope for n in region.captures["qkv"]}
        assert scopes == {f"{layer}.attn.qkv"}, scopes


class _XlmLike(torch.nn.Module):
    """XLM's and Flaubert's layout: the model's loop runs attentions[i] then ffns[i] (post-norm), and
    the position embeddings are expanded to the token embeddings' shape before the add."""

    def __init__(self, layers=2, dim=16):
        super().__init__()
        self.tokens, self.positions = torch.nn.Embedding(50, dim), torch.nn.Embedding(8, dim)
        self.attentions = torch.nn.ModuleList(
            torch.nn.MultiheadAttention(dim, 2, batch_first=True) for _ in range(layers)
        )
        self.norm1 = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(layers))
        self.ffns = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
            for _ in range(layers)
        )
        self.norm2 = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(layers))

    def forward(self, ids):
        x = self.tokens(ids)
        x = x + self.positions(torch.arange(ids.shape[1])).expand_as(x)
        for attention, norm1, ffn, norm2 in zip(self.attentions, self.norm1, self.ffns, self.norm2):
            x = norm1(x + attention(x, x, x, need_weights=False)[0])
            x = norm2(x + ffn(x))
        return x


def test_entries_of_sibling_module_lists_run_in_turn_are_one_layer():
    gm = trace(_XlmLike().eval(), torch.randint(0, 50, (2, 6)), frontend="export")
    operations = find_operations(gm)
    assert [r.scope for r in operations["residual"]] == ["attentions.0", "ffns.0", "attentions.1", "ffns.1"]
    assert [b.contains for b in operations["block"]] == [{"attention": 1, "mlp": 1}] * 2
    assert [r.scope for r in operations["ffn"]] == ["ffns.0", "ffns.1"]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("parallel", [False, True])
def test_a_mixture_of_experts_is_its_layers_one_ffn(shared, parallel):
    """A dense first layer keeps its mlp; a routed sub-layer (a top-k of router scores) is the FFN
    whole, its shared expert no second one; also where attention and experts read one norm and are
    summed with the skip (the experts' output passes chunk and topk tuples: features still)."""
    model = tiny_moe(shared, parallel).eval()
    gm = trace(model, torch.randn(2, 5, 16), frontend="export")
    ffns = find_operations(gm)["ffn"]
    assert [r.scope for r in ffns] == ["0.mlp", "1", "2"]
    assert [r.pattern for r in ffns] == ["ffn"] * 3
    for layer, region in zip("12", ffns[1:]):
        linears = {node_info(n).scope for n in region.nodes if node_info(n).op_kind == "linear"}
        shared_expert = {f"{layer}.mlp.shared.0", f"{layer}.mlp.shared.2"} if shared else set()
        beside = {f"{layer}.attn", f"{layer}.attn.out_proj"} if parallel else set()  # one sum, one sub-layer
        assert linears == {f"{layer}.mlp.router"} | shared_expert | beside


class _SlicedLayer(torch.nn.Module):
    """LUKE's layer, post-norm: the attention sub-layer's output is sliced back to the word tokens
    (all of them when there are no entities) before the FFN sub-layer reads it."""

    def __init__(self, dim=16):
        super().__init__()
        self.attention = _PostNorm(torch.nn.MultiheadAttention(dim, 2, batch_first=True), dim, attention=True)
        self.output = _PostNorm(
            torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim)), dim
        )

    def forward(self, x):
        words = x.shape[1]
        h = self.attention(x)[:, :words]
        return self.output(h)


class _PostNorm(torch.nn.Module):
    def __init__(self, inner, dim, attention=False):
        super().__init__()
        self.inner, self.norm, self.attention = inner, torch.nn.LayerNorm(dim), attention

    def forward(self, x):
        out = self.inner(x, x, x, need_weights=False)[0] if self.attention else self.inner(x)
        return self.norm(x + out)


def test_a_slice_that_keeps_every_token_joins_two_sub_layers():
    model = torch.nn.Sequential(_SlicedLayer(), _SlicedLayer()).eval()
    gm = trace(model, torch.randn(2, 6, 16), frontend="export")
    blocks = find_operations(gm)["block"]
    assert [(b.scope, b.contains) for b in blocks] == [
        ("0", {"attention": 1, "mlp": 1}),
        ("1", {"attention": 1, "mlp": 1}),
    ]


class _ShortConvAttention(torch.nn.Module):
    """Keys and values pass a causal depthwise conv after their projections (Inkling)."""

    def __init__(self, dim=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.k_conv, self.v_conv = (torch.nn.Conv1d(dim, dim, 4, padding=3, groups=dim) for _ in range(2))

    def forward(self, x):
        batch, length, dim = x.shape

        def heads(t):
            return t.reshape(batch, length, 2, dim // 2).transpose(1, 2)

        def short_conv(conv, t):
            return conv(t.transpose(1, 2))[..., :length].transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(short_conv(self.k_conv, self.k(x))), heads(short_conv(self.v_conv, self.v(x)))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(batch, length, dim))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_depthwise_conv_after_a_projection_is_no_projection(frontend):
    gm = trace(_ShortConvAttention().eval(), torch.randn(2, 6, 16), frontend=frontend)
    (attention,) = find_operations(gm)["attention"]
    assert {node_info(n).scope for n in attention.captures["qkv"]} == {"q", "k", "v"}
    assert {node_info(n).scope for n in attention.captures["proj"]} == {"o"}


class _DifferentialAttention(torch.nn.Module):
    """DiffLlama: two attention maps over one value, the second subtracted, one output projection."""

    def __init__(self, dim=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.mix = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        batch, length, dim = x.shape
        q1, q2 = self.q(x).reshape(batch, length, 2, dim // 2).transpose(1, 2).chunk(2, dim=1)
        k1, k2 = self.k(x).reshape(batch, length, 2, dim // 2).transpose(1, 2).chunk(2, dim=1)
        v = self.v(x).reshape(batch, length, 1, dim).transpose(1, 2)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        y = sdpa(q1, k1, v) - self.mix * sdpa(q2, k2, v)
        return self.o(y.transpose(1, 2).reshape(batch, length, dim))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_attention_maps_that_meet_before_one_projection_are_one_attention(frontend):
    gm = trace(_DifferentialAttention().eval(), torch.randn(2, 6, 16), frontend=frontend)
    (attention,) = find_operations(gm)["attention"]
    assert len(attention.captures["attn"]) == 2
    assert {node_info(n).scope for n in attention.captures["qkv"]} == {"q", "k", "v"}
    assert [node_info(n).scope for n in attention.captures["proj"]] == ["o"]


class _DisentangledAttention(torch.nn.Module):
    """DeBERTa/SEW-D: content-to-position and position-to-content terms, summed, then added to Q K^T."""

    def __init__(self, dim=16, length=6):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.positions = torch.nn.Parameter(torch.randn(length, dim))
        self.pos_q, self.pos_k = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        c2p = q @ self.pos_k(self.positions).transpose(0, 1)
        p2c = (k @ self.pos_q(self.positions).transpose(0, 1)).transpose(1, 2)
        scores = q @ k.transpose(1, 2) + (c2p + p2c) / 2.0
        return self.o(scores.softmax(-1) @ v)


class _DisentangledLayer(torch.nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.attention, self.norm1, self.norm2 = (
            _DisentangledAttention(dim),
            torch.nn.LayerNorm(dim),
            torch.nn.LayerNorm(dim),
        )
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.mlp(x))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_sum_that_only_feeds_attention_scores_is_no_residual(frontend):
    gm = trace(
        torch.nn.Sequential(_DisentangledLayer(), _DisentangledLayer()).eval(), torch.randn(2, 6, 16), frontend=frontend
    )
    operations = find_operations(gm)
    assert [b.contains for b in operations["block"]] == [{"attention": 1, "mlp": 1}] * 2
    assert [r.scope for r in operations["residual"]] == ["0", "0", "1", "1"]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_grouped_experts_make_a_mixture_of_experts_where_routing_is_out_of_sight(frontend):
    from toy_models import GroupedMoeLayer

    model = torch.nn.Sequential(GroupedMoeLayer(), GroupedMoeLayer()).eval()
    x = torch.randn(2, 4, 16)
    gm = trace(model, x, frontend=frontend)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x))
    assert [r.scope for r in find_operations(gm)["ffn"]] == ["0", "1"]


class _AttentionWithConvOfValues(_MaskedAttention):
    """Nystromformer: the attention module adds a depthwise conv of its values to its context."""

    def __init__(self, dim=16):
        super().__init__(dim)
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))  # separate: x dominates the sum
        self.conv = torch.nn.Conv1d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, keep):
        batch, length, dim = x.shape

        def heads(t):
            return t.reshape(batch, length, 2, dim // 2).transpose(1, 2)

        values = self.v(x)
        y = torch.nn.functional.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(values))
        y = y.transpose(1, 2).reshape(batch, length, dim) + self.conv(values.transpose(1, 2)).transpose(1, 2)
        return self.out(y)


def test_an_attention_modules_own_sum_is_no_residual():
    model = _TokenDecoder("scaled").eval()
    for layer in model.layers:
        layer.attn = _AttentionWithConvOfValues()
    gm = trace(model, torch.randint(1, 50, (2, 6)), frontend="export")
    operations = find_operations(gm)
    assert [b.contains for b in operations["block"]] == [{"attention": 1, "mlp": 1}] * 2
    assert [r.scope for r in operations["ffn"]] == ["layers.0.mlp", "layers.1.mlp"]


class _StreamLayer(torch.nn.Module):
    """'carried': Zaya, skips shifted and scaled by weights, (x + c) * t, and a router state that each
    layer passes to the next; 'hyper': DeepSeek-V4's hyper-connections, two residual streams mixed by
    a matrix computed from them, comb^T @ x, with each sub-layer's output weighted per stream."""

    def __init__(self, form, dim=16):
        super().__init__()
        self.form = form
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = _MaskedAttention(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
        self.shift = torch.nn.ParameterList(torch.randn(dim) for _ in range(2))
        self.scale = torch.nn.ParameterList(torch.randn(dim) for _ in range(2))
        self.router, self.state_scale = torch.nn.Linear(dim, 4), torch.nn.Parameter(torch.randn(4))
        self.mixer = torch.nn.Linear(2 * dim, 6)

    def _connect(self, x, sub_layer):
        """Hyper-connection around one sub-layer: x holds two streams [B, T, 2, D]."""
        weights = self.mixer(x.flatten(2))
        pre, post, comb = weights[..., :2].sigmoid(), weights[..., 2:4].sigmoid(), weights[..., 4:]
        comb = torch.stack([comb, comb.flip(-1)], -1).sigmoid()
        comb = comb / comb.sum(-1, keepdim=True)  # DeepSeek-V4 normalises by Sinkhorn iterations
        out = sub_layer((pre.unsqueeze(-1) * x).sum(2))
        return post.unsqueeze(-1) * out.unsqueeze(-2) + comb.transpose(-1, -2) @ x

    def forward(self, x, state, keep):
        if self.form == "hyper":
            x = self._connect(x, lambda h: self.attn(self.ln1(h), keep))
            return self._connect(x, lambda h: self.mlp(self.ln2(h))), state
        x = self.attn(self.ln1(x), keep) + (x + self.shift[0]) * self.scale[0]
        routed = self.router(self.ln2(x)) + (0 if state is None else state * self.state_scale)
        gate = routed.softmax(-1)[..., :1]
        return self.mlp(self.ln2(x)) * gate + (x + self.shift[1]) * self.scale[1], routed[:, -x.shape[1] :].clone()


class _StreamDecoder(torch.nn.Module):
    def __init__(self, form, layers=2, dim=16):
        super().__init__()
        self.form, self.embed = form, torch.nn.Embedding(50, dim)
        self.layers = torch.nn.ModuleList(_StreamLayer(form, dim) for _ in range(layers))

    def forward(self, ids):
        keep, x, state = ids != 0, self.embed(ids), None
        x = torch.stack([x, x], 2) if self.form == "hyper" else x
        for layer in self.layers:
            x, state = layer(x, state, keep)
        return x.sum(2) if self.form == "hyper" else x


@pytest.mark.parametrize("form", ["carried", "hyper"])
def test_residual_streams_that_are_shifted_mixed_or_carry_state_make_one_block_per_layer(form):
    """A skip seen through a shift by a weight; a second sub-layer that starts at its first one's sum
    (hyper-connections: comb^T @ x is no plain skip); a router state from the layer before meets its
    own but is no residual, so no region spans two layers."""
    gm = trace(_StreamDecoder(form).eval(), torch.randint(1, 50, (2, 6)), frontend="export")
    operations = find_operations(gm)
    assert [b.scope for b in operations["block"]] == ["layers.0", "layers.1"]
    assert [b.contains for b in operations["block"]] == [{"attention": 1, "mlp": 1}] * 2
    assert [r.scope for r in operations["ffn"]] == ["layers.0.mlp", "layers.1.mlp"]
